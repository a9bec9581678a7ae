r"""
PPO fine-tuning of a GPT-2 policy, measured on HellaSwag.

    python train_ppo.py configs/demo.py  # offline, CPU, a few minutes
    torchrun --standalone --nproc_per_node=8 train_ppo.py configs/gpt2_hellaswag_teacher.py \
        --learning_rate=5e-6

Every step: rollout -> reward -> advantages -> PPO epochs -> log / eval / checkpoint. Two rollout
kinds share the update:
- choice:   the policy scores the 4 endings of a training example exactly as the HellaSwag scorer
            does (mean log-prob per ending token) and samples one from
            softmax(scores / choice_temperature). One action per example; the reward is the
            teacher's or the label's; the value head (gae), read at the context's last token,
            predicts it.
- generate: the policy samples a continuation of the context; the reward model's likelihood of it
            is the score at the last token (or spread over the tokens, likelihood_dense), and the
            KL to the reference is estimated per token.

Estimators, one table each (ADV_ESTIMATORS, KL_ESTIMATORS; reward kinds: reward.REWARD_KINDS).
Advantages: "gae" takes the value head as its baseline and fits it; the others leave the head
frozen. "expected" (choice) subtracts the policy's exact expected reward over the 4 endings;
"rloo" and "grpo" (generate, group_size samples a prompt) judge a sample's total reward against
its group: minus the mean of the others, or minus the group's mean over its std; "reinforce++"
(generate) takes each token's return minus the batch's mean return over all ranks. Every
estimator's advantages are then whitened across ranks (whiten_advantages). The KL to the
reference: "sampled" is the sampled actions' log-ratio, a penalty in each action's reward; "k3"
(never negative, as GRPO) and "exact" (choice: the KL over the 4 endings) are added to the loss.
Simplifications: one policy and value in one module (one optimizer, no separate critic); the
reference is frozen; a choice rollout is one action.
"""

import contextlib
import copy
import dataclasses
import gc
import hashlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import hellaswag
import synthetic
from causal_lm import CausalLM, padded
from common import UserError, all_reduce_sum, autocast, run_cli
from config import describe, parse_config, setting
from hellaswag import load_examples
from hf_policy import HFPolicy
from model import GPT, GPTConfig
from reward import DEFAULT_REWARD_MODEL, REWARD_KINDS
from run_management import (Batches, Reference, RunManager, Shown, StoppedAtOnce,
                            TrainingState, absolute_paths, check_sources,
                            log_changed_settings, lost_rank_error, out_dir_lock, prepare_out_dir,
                            seed_everything, setup_distributed, synthetic_dir)
from weights import (check_finite_weights, checkpoint_source, step_checkpoints,
                     weights_fingerprint)


# --------------------------------------------------------------------------------------------------
# PPO math: small pure functions, float32


def masked_mean(x, mask, across_ranks=False):
    """The mean of x weighed by mask (0/1, or any weights: loss_weights' are below 1); 0 where
    there is nothing to average."""
    total, count = (x * mask).sum(), mask.sum()
    if across_ranks:
        total, count = all_reduce_sum(total, count)
    return total / count.clamp(min=1e-12)


def masked_whiten(x, mask, shift_mean=True, across_ranks=False):
    """Whiten x over the entries where mask is 1 (mean and unbiased variance over all ranks if
    across_ranks)."""
    x, mask = x.float(), mask.float()
    mean = masked_mean(x, mask, across_ranks)
    total_sq, count = (((x - mean) ** 2) * mask).sum(), mask.sum()
    if across_ranks:
        total_sq, count = all_reduce_sum(total_sq, count)
    var = total_sq / (count - 1).clamp(min=1)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def compute_gae(rewards, values, mask, gamma, gae_lambda):
    """Generalised advantage estimation over (B, T) sequences whose valid steps are a prefix
    (mask 1). The step after the last valid one is terminal. -> advantages, returns (both 0 where
    mask is 0)."""
    rewards, values, mask = rewards.float(), values.float(), mask.float()
    next_mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1) * next_mask
    deltas = rewards + gamma * next_values - values
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        last = deltas[:, t] + gamma * gae_lambda * next_mask[:, t] * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def sampled_kl(logprobs, ref_logprobs):
    """Per-action estimate of KL(policy || reference) from log-probs of actions sampled from the
    policy: the log ratio (unbiased; negative for some samples)."""
    return logprobs.float() - ref_logprobs.float()


def k3_kl(logprobs, ref_logprobs):
    """Per-action estimate of KL(policy || reference) that is never negative (k3, as GRPO uses it):
    r - 1 - log r with r = pi_ref / pi, from actions sampled from the policy; unbiased in the
    mean, with less variance than the log ratio."""
    log_ratio = ref_logprobs.float() - logprobs.float()
    return log_ratio.exp() - 1 - log_ratio


def exact_kl(logprobs, ref_logprobs):
    """KL(policy || reference) over a small set of actions: (..., K) log-probs -> (...)."""
    logprobs = logprobs.float()
    return (logprobs.exp() * (logprobs - ref_logprobs.float())).sum(-1)


def expected_advantages(rewards, logprobs):
    """Every action's reward minus the policy's expected reward, the exact baseline when each
    action's reward is known: (B, K) rewards and log-probs -> (B, K), whose expectation under
    the policy is 0 in every row."""
    rewards = rewards.float()
    return rewards - (logprobs.float().exp() * rewards).sum(-1, keepdim=True)


def rloo_advantages(rewards, group_size):
    """(B,) rewards of consecutive groups of group_size samples of one prompt -> each minus the
    mean of its group's other samples (REINFORCE leave-one-out)."""
    rewards = rewards.float().view(-1, group_size)
    others = (rewards.sum(1, keepdim=True) - rewards) / (group_size - 1)
    return (rewards - others).view(-1)


def grpo_advantages(rewards, group_size, eps=1e-4):
    """(B,) rewards of consecutive groups of group_size samples of one prompt -> each minus its
    group's mean, over the group's standard deviation (GRPO)."""
    rewards = rewards.float().view(-1, group_size)
    mean, std = rewards.mean(1, keepdim=True), rewards.std(1, keepdim=True)
    return ((rewards - mean) / (std + eps)).view(-1)


def reinforce_pp_advantages(rewards, mask, gamma, across_ranks=False):
    """REINFORCE++: each action's return (its reward and the later ones, discounted by gamma) minus
    the batch's mean return over every rank's actions. -> advantages, returns (B, L), 0 at
    padding."""
    returns = compute_gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)[1]
    return (returns - masked_mean(returns, mask.float(), across_ranks)) * mask, returns


def zero_std_groups(scores, group_size):
    """(B,) scores of consecutive groups of group_size samples -> (B,) bool: the sample's group got
    one score for all its samples (no signal for a group estimator)."""
    groups = scores.view(-1, group_size)
    return (groups == groups[:, :1]).all(1).repeat_interleave(group_size)


def loss_weights(mask, loss_agg, horizon):
    """How a minibatch's losses average over its actions: -> (B, L) each action's weight and (B,)
    each rollout's count; a minibatch's loss is sum(weight x loss) / sum(count) over its rollouts.
    "token-mean": every action weighs the same. "seq-mean-token-mean": every rollout weighs the
    same, its actions' mean. "seq-mean-token-sum-norm" (Dr. GRPO): a rollout's summed losses over
    a constant, horizon (its most actions), so a long rollout's tokens weigh no less than a short
    one's. A rollout without actions (mask all 0) counts for nothing."""
    mask = mask.float()
    if loss_agg == "token-mean":
        return mask, mask.sum(1)
    has_actions = (mask.sum(1) > 0).float()
    if loss_agg == "seq-mean-token-mean":
        return mask / mask.sum(1, keepdim=True).clamp(min=1), has_actions
    return mask / horizon, has_actions


def ppo_losses(new_logprobs, old_logprobs, advantages, new_values, old_values, returns, mask,
               clip_coef, vf_clip_coef):
    """Clipped PPO policy and value losses, averaged over mask (0/1, or loss_weights' weights); plus
    approx_kl and clipfrac (as in cleanrl)."""
    new_logprobs, new_values = new_logprobs.float(), new_values.float()
    log_ratio = new_logprobs - old_logprobs
    ratio = log_ratio.exp()
    pg_losses = torch.max(-advantages * ratio,
                          -advantages * ratio.clamp(1 - clip_coef, 1 + clip_coef))
    pg_loss = masked_mean(pg_losses, mask)
    vf_losses = (new_values - returns) ** 2
    if vf_clip_coef > 0:
        clipped = old_values + (new_values - old_values).clamp(-vf_clip_coef, vf_clip_coef)
        vf_losses = torch.max(vf_losses, (clipped - returns) ** 2)
    vf_loss = 0.5 * masked_mean(vf_losses, mask)
    with torch.no_grad():
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
        clipfrac = masked_mean(((ratio - 1).abs() > clip_coef).float(), mask)
    return {"pg_loss": pg_loss, "vf_loss": vf_loss, "approx_kl": approx_kl, "clipfrac": clipfrac}


def explained_variance(values, returns, mask):
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return (1 - var_residual / var_returns).item() if var_returns > 0 else float("nan")


class AdaptiveKLController:
    """Ziegler et al. 2019: move the KL coefficient so that the KL tracks a target."""

    def __init__(self, kl_coef, target, horizon):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, current_kl, n_steps):
        if not math.isfinite(current_kl):  # a skipped step's: a NaN would stay in the coefficient
            return
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


class FixedKLController(AdaptiveKLController):

    def update(self, current_kl, n_steps):
        pass


def learning_rate_at(step, cfg):
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    if cfg.lr_decay_steps <= 0:
        return cfg.learning_rate
    progress = min(1.0, (step - cfg.warmup_steps) / cfg.lr_decay_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


# --------------------------------------------------------------------------------------------------
# the estimators: one table per choice. An advantage estimator turns a batch's per-action rewards
# into advantages (and the returns the value head is fit to); a KL estimator measures the KL to the
# reference, and enters the reward or the loss. Adding one is a function, an entry and its test.


@dataclass(frozen=True)
class AdvantageEstimator:
    # (batch, rewards (B, L), the KL coefficient in the reward, cfg) -> advantages, returns (B, L)
    advantages: Callable
    rollouts: tuple  # the rollout kinds it fits
    value_head: bool  # its baseline is the value head, which it trains; else the head is frozen
    grouped: bool = False  # judges each sample against its group (group_size samples of a prompt)
    every_choice_scored: bool = False  # needs every ending's reward (choice rollouts)


def gae_estimate(batch, rewards, kl_coef, cfg):
    return compute_gae(rewards, batch.values, batch.mask, cfg.gamma, cfg.gae_lambda)


def expected_estimate(batch, rewards, kl_coef, cfg):
    # every ending's reward, shaped as the chosen one's was (kl_coef: 0 when the KL is in the loss)
    choice_rewards = batch.choice_scores - kl_coef * sampled_kl(batch.choice_logprobs,
                                                                batch.choice_ref_logprobs)
    advantages = expected_advantages(choice_rewards, batch.choice_logprobs)
    return advantages.gather(1, batch.actions["choices"]), rewards


def per_sample(group_advantages, batch, rewards, cfg):
    """A group estimator's advantage of each sample's total reward (its score and its tokens' KL
    penalties), given to every token of the sample; the totals are the returns (logged only)."""
    totals = rewards.sum(1)
    return (group_advantages(totals, cfg.group_size)[:, None] * batch.mask,
            totals[:, None] * batch.mask)


def rloo_estimate(batch, rewards, kl_coef, cfg):
    return per_sample(rloo_advantages, batch, rewards, cfg)


def grpo_estimate(batch, rewards, kl_coef, cfg):
    return per_sample(grpo_advantages, batch, rewards, cfg)


def reinforce_pp_estimate(batch, rewards, kl_coef, cfg):
    return reinforce_pp_advantages(rewards, batch.mask, cfg.gamma, across_ranks=True)


ADV_ESTIMATORS = {
    "gae": AdvantageEstimator(gae_estimate, ("choice", "generate"), value_head=True),
    "expected": AdvantageEstimator(expected_estimate, ("choice",), value_head=False,
                                   every_choice_scored=True),
    "rloo": AdvantageEstimator(rloo_estimate, ("generate",), value_head=False, grouped=True),
    "grpo": AdvantageEstimator(grpo_estimate, ("generate",), value_head=False, grouped=True),
    "reinforce++": AdvantageEstimator(reinforce_pp_estimate, ("generate",), value_head=False),
}


@dataclass(frozen=True)
class KLEstimator:
    # (log-probs (B, L) of the actions under the policy and the reference, and (B, 4) of every
    # ending, or None) -> (B, L) the KL of each action, as this estimator measures it
    estimate: Callable
    enters: str  # "reward" (-kl_coef x it in each action's reward) or "loss" (+kl_coef x its mean)
    rollouts: tuple  # the rollout kinds it fits


KL_ESTIMATORS = {
    "sampled": KLEstimator(lambda lp, ref_lp, lps, ref_lps: sampled_kl(lp, ref_lp), "reward",
                           ("choice", "generate")),
    "k3": KLEstimator(lambda lp, ref_lp, lps, ref_lps: k3_kl(lp, ref_lp), "loss",
                      ("choice", "generate")),
    # the whole distribution's KL, at the example's one action
    "exact": KLEstimator(lambda lp, ref_lp, lps, ref_lps: exact_kl(lps, ref_lps)[:, None],
                         "loss", ("choice",)),
}


# --------------------------------------------------------------------------------------------------
# config


@dataclass
class Config:
    # ---- run
    # checkpoints, train_config.json, metrics.jsonl, samples.jsonl, eval/, the export (hf/)
    out_dir: str = setting("out/ppo", path="folder", run=True)
    # a fresh run refuses an out_dir that holds another run; start_over moves that run's files to
    # out_dir/previous/
    start_over: bool = False
    # hub name, transformers dir, build-nanogpt/nanoGPT .pt, project checkpoint or run dir, "resume"
    # (this out_dir), "scratch" (random weights of the size below), "synthetic" (the demo task's
    # starting policy)
    init_from: str = setting("gpt2", path="source")
    seed: int = setting(1337, low=0, high=2**31 - 1)  # numpy takes seeds below 2**32
    # auto | cpu | cuda | cuda:N | mps (under torchrun: cuda:LOCAL_RANK)
    device: str = setting("auto", run=True)
    # autocast dtype: auto = bfloat16 on CUDA, float32 elsewhere; bfloat16 on a CPU pays where it
    # has bf16 units (docs/results.md); float16 (CUDA only) adds a GradScaler. Log-probs, ratios,
    # KL and advantages are float32 whatever it is
    dtype: str = setting("auto", choices=("auto", "bfloat16", "float16", "float32"))
    # torch.compile the training forward (rollouts and eval stay eager)
    compile: bool = setting(False, run=True)
    # a rank that waits this long on a dead one stops the run
    ddp_timeout_s: float = setting(600.0, low=10.0, high=1e7,  # torch's own limit is near 1e9
                                   run=True)
    # a policy built from scratch (init_from = "scratch"): its transformer blocks
    n_layer: int = setting(2, low=1, high=1000)
    # the scratch policy's attention heads per block; n_embd must be a multiple of n_head
    n_head: int = setting(2, low=1, high=1000)
    n_embd: int = setting(64, low=1, high=100_000)  # the scratch policy's width
    # the scratch policy's context window, in tokens
    block_size: int = setting(256, low=2, high=1_000_000)
    # ---- data
    # the examples the rollouts act on: "hellaswag:<split>" (downloaded) or a jsonl file in
    # HellaSwag's schema
    train_data: str = setting("hellaswag:train", path="source")
    val_data: str = setting("hellaswag:val", path="source")  # the evaluation's, as train_data
    # download folder for the HellaSwag splits ("" = hellaswag.py's default)
    data_cache: str = setting("", path="folder")
    # the offline demo task (synthetic.py): its train/val data and its tiny teacher
    synthetic: bool = False
    # where the demo task is written ("" = out_dir/synthetic)
    synthetic_dir: str = setting("", path="folder")
    # HellaSwag rendering for choice rollouts, the teacher and eval
    style: str = setting("completion", choices=("completion", "lm-eval"))
    # ---- rollouts
    # what the policy does with an example: choice picks one of its 4 endings, generate writes a
    # continuation (the module's docstring)
    rollout: str = setting("choice", choices=("choice", "generate"))
    batch_size: int = setting(64, low=1)  # rollouts per rank per step
    # choice: softmax temperature over the 4 endings' scores
    choice_temperature: float = setting(1.0, low=0.01, high=100.0)
    # choice: an ending's score is its summed log-prob divided by what the style's acc_norm divides
    # it by (style: tokens in the completion style, characters in lm-eval's, as the evaluator) or
    # by its tokens (token: the same in the completion style; in lm-eval's a sharper policy, about
    # as many times sharper as a token has characters)
    choice_norm: str = setting("style", choices=("style", "token"))
    # generate: the prompt is the context's last tokens (fewer if the window needs it; the judge
    # sees the whole context)
    max_prompt_tokens: int = setting(128, low=1)
    max_new_tokens: int = setting(24, low=1)  # generate: the longest continuation sampled
    # generate: sampling temperature, also applied to the log-probs PPO optimises
    temperature: float = setting(1.0, low=0.01, high=100.0)
    # generate: top-k / top-p sample from a truncated distribution while PPO and the KL use the full
    # one (slightly off-policy); leave them off unless samples degenerate
    top_k: int = setting(0, low=0)  # 0 = off
    top_p: float = setting(1.0, above=0.0, high=1.0)  # 1.0 = off
    # generate: stop at ".", "!", "?" or a newline as well as <|endoftext|>
    stop_at_sentence_end: bool = True
    # generate: taken from a sample that never stopped
    no_stop_penalty: float = setting(1.0, low=0.0, high=1000.0)
    # generate: the rollout's log-probs and values from a forward over prompt + response, as the
    # update computes them (its first ratios are exactly 1); False keeps those the sampling loop
    # computed on its way (one policy forward less a step, as TRL's PPOTrainer does; float32 only:
    # they differ from the update's by rounding, about 2e-5 there on a CPU, up to 0.2 under bf16;
    # unmeasured on CUDA, whose float32 matmuls run in TF32 here)
    rollout_forward: bool = True
    # ---- reward
    # teacher | label (choice rollouts), likelihood (generate rollouts)
    reward_kind: str = setting("teacher", choices=tuple(REWARD_KINDS))
    # any transformers causal LM: hub name or local directory
    reward_model: str = setting(DEFAULT_REWARD_MODEL, path="source")
    # auto = bfloat16 on CUDA, float32 on CPU
    reward_dtype: str = setting("auto", choices=("auto", "bfloat16", "float16", "float32"))
    # examples in one forward of the reward model (memory)
    reward_batch_size: int = setting(32, low=1, run=True)
    # teacher: prob = teacher's probability of the chosen ending, agree = 1/0
    teacher_mode: str = setting("prob", choices=("prob", "agree"))
    # teacher: softmax temperature over its normalised ending scores
    teacher_temperature: float = setting(1.0, low=0.01, high=100.0)
    # teacher: folder for cached teacher scores ("" = out_dir/teacher_cache)
    teacher_cache: str = setting("", path="folder")
    # likelihood: mean log-prob per token | char
    likelihood_per: str = setting("token", choices=("token", "char"))
    # likelihood: clip the normalised score to [-clip, clip]; 0 = off
    reward_clip: float = setting(0.0, low=0.0, high=1000.0)
    reward_normalize: bool = True  # likelihood: running mean/std normalisation
    # likelihood: each sampled token gets its share of the score (the judge's log-prob of it,
    # normalised like the score; the shares sum to it) instead of the whole score at the last token
    likelihood_dense: bool = False
    # ---- KL to the frozen reference
    # initial coefficient of the KL penalty
    kl_coef: float = setting(0.05, low=0.0, high=100.0)
    # how the KL is estimated, and where it enters (KL_ESTIMATORS; the module's docstring)
    kl_estimator: str = setting("sampled", choices=tuple(KL_ESTIMATORS))
    adaptive_kl: bool = False  # Ziegler et al. 2019 controller: steer the KL towards kl_target
    # adaptive_kl: the KL (a rollout's sum over its actions, the mean over the batch) it steers to
    kl_target: float = setting(6.0, above=0.0, high=10_000.0)
    # adaptive_kl: the rollouts over which the coefficient moves by at most 20%
    kl_horizon: int = setting(10000, low=1)
    # ---- advantages
    # the advantages' baseline (ADV_ESTIMATORS; the module's docstring). Only gae uses the value
    # head: the others leave it frozen (no loss, no backward; saved and exported as it was)
    adv_estimator: str = setting("gae", choices=tuple(ADV_ESTIMATORS))
    # rloo / grpo: samples per prompt. batch_size counts samples and must be a multiple: each rank
    # draws batch_size / group_size prompts a step, and keeps each group
    group_size: int = setting(1, low=1, high=1024)
    # rloo / grpo: leave out of the loss the groups whose samples all got the same score (no
    # signal); their share is logged as frac_zero_std_groups either way
    drop_zero_std_groups: bool = False
    # ---- PPO
    ppo_epochs: int = setting(4, low=1, high=1000)  # passes over each step's rollouts
    minibatch_size: int = setting(16, low=1)  # per rank; one optimizer step per minibatch
    # per rank; gradient accumulation inside a minibatch: a memory setting, the update is the same
    # for any value
    micro_batch_size: int = setting(8, low=1, run=True)
    # train only the top N transformer blocks (and the final norm and value head); the embeddings
    # and the blocks below stay frozen, so the backward stops above them: an update costs a
    # fraction of a full one (docs/results.md). 0 = train every parameter
    train_top_blocks: int = setting(0, low=0, high=1000)
    # AdamW's peak rate (the value head's: value_lr_scale times it)
    learning_rate: float = setting(1e-5, low=0.0, high=1.0)
    warmup_steps: int = setting(0, low=0)  # a linear warm-up to learning_rate over the first steps
    # cosine decay to min_lr over this many steps after warmup; 0 = constant
    lr_decay_steps: int = setting(0, low=0)
    min_lr: float = setting(0.0, low=0.0, high=1.0)  # where the decay ends
    # AdamW's, on the matrices and embeddings (not on biases and LayerNorm gains)
    weight_decay: float = setting(0.0, low=0.0, high=10.0)
    # AdamW's decay of its mean gradient, and of its mean squared gradient (below 1: its limits)
    beta1: float = setting(0.9, low=0.0, below=1.0)
    beta2: float = setting(0.95, low=0.0, below=1.0)  # as beta1
    grad_clip: float = setting(1.0, low=0.0, high=1e6)  # 0 = off
    clip_coef: float = setting(0.2, above=0.0, high=10.0)  # policy ratio clipping
    vf_coef: float = setting(0.1, low=0.0, high=1000.0)  # weight of the value loss
    # value clipping around the rollout's values; 0 = off
    vf_clip_coef: float = setting(0.2, low=0.0, high=1000.0)
    ent_coef: float = setting(0.0, low=0.0, high=10.0)  # entropy bonus
    # how a minibatch's losses average over its actions (loss_weights): every token the same, every
    # rollout the same, or a rollout's summed losses over its most tokens (Dr. GRPO); verl's names
    loss_agg: str = setting("token-mean", choices=("token-mean", "seq-mean-token-mean",
                                                   "seq-mean-token-sum-norm"))
    # gae: the first this many steps train the value head alone, the policy untouched (a fresh
    # head's values are noise, and so would the first advantages be)
    value_warmup_steps: int = setting(0, low=0)
    value_lr_scale: float = setting(1.0, above=0.0, high=1000.0)  # gae: value head's lr / policy's
    gamma: float = setting(1.0, low=0.0, high=1.0)  # gae, reinforce++: discount; 1 = none
    # gae: 1 = the whole return minus the value, 0 = one step's reward plus the next value
    gae_lambda: float = setting(0.95, low=0.0, high=1.0)
    # stop the step's PPO epochs once approx_kl exceeds this; 0 = off
    target_kl: float = setting(0.0, low=0.0, high=1000.0)
    whiten_advantages: bool = True  # across the batch (all ranks); grpo's are per group already
    max_steps: int = setting(1000, low=0, run=True)  # the step the run ends at, resumed or not
    # stop after this many steps in a row whose losses or gradients are not finite (each one
    # skipped whole)
    max_bad_steps: int = setting(3, low=1, run=True)
    # ---- logging, evaluation, checkpoints
    # the console line every this many steps (metrics.jsonl has every step)
    log_interval: int = setting(1, low=1, run=True)
    # write a few rollouts to samples.jsonl every this many steps
    sample_interval: int = setting(10, low=0, run=True)
    # HellaSwag at step 0, every eval_interval steps and at the end; 0 = only start and end
    eval_interval: int = setting(50, low=0, run=True)
    eval_limit: int = setting(0, low=0, run=True)  # evaluate the first N examples only; 0 = all
    eval_batch_size: int = setting(32, low=1, run=True)  # examples in one forward (memory)
    # ckpt_<step>.pt every this many steps, and at the end
    checkpoint_interval: int = setting(100, low=1, run=True)
    keep_last: int = setting(2, low=1, run=True)  # step checkpoints kept (best.pt is kept besides)
    # export the final policy as a transformers directory out_dir/hf
    export_hf: bool = setting(True, run=True)
    wandb_log: bool = setting(False, run=True)  # the metrics to Weights & Biases too
    wandb_project: str = setting("gpt2-ppo-hellaswag", run=True)  # wandb_log: its project
    wandb_run_name: str = setting("", run=True)  # wandb_log: the run's name ("" = wandb's pick)


def load_config(argv):
    """Config from defaults, then config files and --key=value overrides in the order given; then
    the checks that involve several settings."""
    cfg = parse_config(argv, Config)
    if cfg.batch_size % cfg.minibatch_size or cfg.minibatch_size % cfg.micro_batch_size:
        raise UserError(f"config: batch_size ({cfg.batch_size}) must be a multiple of "
                        f"minibatch_size ({cfg.minibatch_size}), and that of micro_batch_size "
                        f"({cfg.micro_batch_size})")
    dense = [name for name, kind in REWARD_KINDS.items() if kind.rollout == "generate"]
    if cfg.likelihood_dense and REWARD_KINDS[cfg.reward_kind].rollout != "generate":
        raise UserError("config: likelihood_dense is for reward_kind="
                        f"{' or '.join(map(repr, dense))}, not {cfg.reward_kind!r}")
    if not cfg.rollout_forward and cfg.rollout != "generate":
        raise UserError("config: rollout_forward=False is for generate rollouts (a choice "
                        "rollout's forward is its sampling); leave it True")
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"config: n_embd ({cfg.n_embd}) must be a multiple of n_head "
                        f"({cfg.n_head})")
    if cfg.init_from == "synthetic" and not cfg.synthetic:
        raise UserError("config: init_from='synthetic' is the demo task's policy and needs "
                        "synthetic=True")
    if cfg.adaptive_kl and cfg.kl_coef == 0:
        raise UserError("config: adaptive_kl scales kl_coef, which is 0 and would stay 0; give "
                        "kl_coef a starting value above 0")
    if cfg.lr_decay_steps and cfg.min_lr > cfg.learning_rate:
        raise UserError(f"config: min_lr ({cfg.min_lr:g}) is above learning_rate "
                        f"({cfg.learning_rate:g}): the decay would raise the rate")
    for key, table in (("adv_estimator", ADV_ESTIMATORS), ("kl_estimator", KL_ESTIMATORS)):
        name = getattr(cfg, key)
        if cfg.rollout not in table[name].rollouts:
            fitting = [n for n, entry in table.items() if cfg.rollout in entry.rollouts]
            raise UserError(f"config: {key} {name!r} is for {' or '.join(table[name].rollouts)} "
                            f"rollouts, not {cfg.rollout!r}; use one of {', '.join(fitting)}")
    estimator = ADV_ESTIMATORS[cfg.adv_estimator]
    grouped = [name for name, entry in ADV_ESTIMATORS.items() if entry.grouped]
    if estimator.grouped != (cfg.group_size > 1) or cfg.batch_size % cfg.group_size:
        raise UserError(f"config: group_size ({cfg.group_size}) is for adv_estimator "
                        f"{' or '.join(grouped)}, which need it at 2 or more and dividing "
                        f"batch_size ({cfg.batch_size})")
    if cfg.drop_zero_std_groups and not estimator.grouped:
        raise UserError("config: drop_zero_std_groups is for adv_estimator "
                        f"{' or '.join(grouped)}, not {cfg.adv_estimator!r}")
    with_value_head = [name for name, entry in ADV_ESTIMATORS.items() if entry.value_head]
    for key in ("value_warmup_steps", "value_lr_scale"):
        if getattr(cfg, key) != getattr(Config, key) and not estimator.value_head:
            raise UserError(f"config: {key} is for adv_estimator {' or '.join(with_value_head)} "
                            f"(the others leave the value head frozen), not {cfg.adv_estimator!r}")
    if cfg.value_warmup_steps and cfg.value_warmup_steps >= cfg.max_steps:
        raise UserError(f"config: value_warmup_steps ({cfg.value_warmup_steps}) must be below "
                        f"max_steps ({cfg.max_steps}): the policy would never train; lower it or "
                        "raise max_steps")
    wanted = [name for name, kind in REWARD_KINDS.items() if kind.rollout == cfg.rollout]
    if REWARD_KINDS[cfg.reward_kind].rollout != cfg.rollout:
        raise UserError(f"config: rollout {cfg.rollout!r} takes reward_kind {' or '.join(wanted)}, "
                        f"got {cfg.reward_kind!r}")
    return cfg


# --------------------------------------------------------------------------------------------------
# rollouts: two kinds behind one interface. collect() acts on a batch of examples and scores it;
# forward() recomputes, with gradients, the log-probs, values and entropies of the actions of a
# minibatch. Tensors are (B, L): one column per action, L = 1 for a choice and up to max_new_tokens
# for a generated continuation.


@dataclass
class Rollouts:
    examples: list  # the training examples acted on
    # what was done, as forward() needs it: {"choices"} or {"prompts", "prompt_mask", "responses"}
    actions: dict
    logprobs: torch.Tensor  # (B, L) under the acting policy
    ref_logprobs: torch.Tensor  # (B, L) under the frozen reference
    values: torch.Tensor  # (B, L) the value head's estimate in the state each action was taken in
    mask: torch.Tensor  # (B, L) 1 for an action, 0 for padding
    scores: torch.Tensor  # (B,) the task's reward for the whole rollout
    n_tokens: int  # tokens through the policy, for tok/s
    samples: list  # one dict per rollout for samples.jsonl
    # (B,) long, on the CPU: the tokens forward() runs for each rollout, to group rollouts of
    # similar length into micro-batches (micro_batches)
    lengths: torch.Tensor
    # (B, L) the score split over the actions (sums to scores), or None: at the last
    score_shares: torch.Tensor = None
    # choice rollouts: (B, 4) every ending's log-prob under the policy and the reference, and
    # (with adv_estimator "expected") every ending's score
    choice_logprobs: torch.Tensor = None
    choice_ref_logprobs: torch.Tensor = None
    choice_scores: torch.Tensor = None
    # (B, L) what PPO learns from, set once the rewards are in (the advantage estimator)
    advantages: torch.Tensor = None
    returns: torch.Tensor = None
    # (B, L) each action's weight in the losses and (B,) each rollout's count (loss_weights)
    loss_weights: torch.Tensor = None
    loss_counts: torch.Tensor = None


def choice_forward(model, encoded, normalisers, choice_temperature, device, rows):
    """
    Score the 4 endings of each encoded example (policy.encode_choices) as the HellaSwag scorer
    does (each ending's summed log-prob over its normaliser, (N, 4): choice_normalisers') and
    turn them into the policy over endings, with gradients. rows: the policy (unwrapped) whose
    rows these are: its choice_inputs lays them out for its forward (GPT: each context once, its
    endings packed after it). -> log-probs (N, 4), values (N,), all float32.
    """
    inputs = {name: t.to(device) for name, t in rows.choice_inputs(encoded).items()}
    # through forward(), so that DDP syncs the gradients
    sum_logprobs, values = model(**inputs)
    scores = sum_logprobs / normalisers.to(device)  # (N, 4)
    return F.log_softmax(scores / choice_temperature, dim=-1), values


def choice_normalisers(examples, cfg):
    """What choice_forward divides each ending's summed log-prob by where it is not the ending's
    tokens (the completion style's acc_norm, and choice_norm "token"): the lm-eval style's
    characters, (N, 4) float32; else None."""
    if cfg.choice_norm == "token" or cfg.style == "completion":
        return None
    return hellaswag.ending_characters(examples, cfg.style)


class ChoiceRollouts:
    """The policy picks one of an example's 4 endings, sampled from softmax(its HellaSwag scores /
    temperature); the reward (teacher or label) is for that choice. The value head is read at the
    context's last token."""
    max_actions = 1  # per rollout

    def __init__(self, encoded, reward_fn, choice_temperature, micro_batch_size, device,
                 score_every_ending=False, *, rows, normalisers=None):
        # every training example, encoded once at setup as the evaluator encodes it
        # (policy.encode_choices); rows: that policy, unwrapped (choice_forward); what each
        # example's endings' summed log-probs are divided by, (N, 4): normalisers
        # (choice_normalisers) or, if None, their tokens
        self.encoded, self.rows = encoded, rows
        self.per_token = normalisers is None
        self.normalisers = rows.choice_lengths(encoded)[0] if self.per_token else normalisers
        self.reward_fn, self.temperature = reward_fn, choice_temperature
        self.micro_batch_size, self.device = micro_batch_size, device
        # whether the reward of every ending is wanted (AdvantageEstimator.every_choice_scored)
        self.score_every_ending = score_every_ending
        # the frozen reference's distribution over each example's endings depends on the example
        # alone: computed the first time the example is met, then kept (4 floats an example, saved
        # with the checkpoint)
        self.reference_logprobs = torch.full((len(encoded), 4), float("nan"))

    def reference(self, reference, indices):
        missing = torch.tensor(sorted({i for i in indices
                                       if torch.isnan(self.reference_logprobs[i, 0])}),
                               dtype=torch.long)
        encoded = [self.encoded[i] for i in missing.tolist()]
        for group in micro_batches(torch.arange(len(encoded)), self.lengths(encoded),
                                   self.micro_batch_size):
            lp = choice_forward(reference, [encoded[j] for j in group.tolist()],
                                self.normalisers[missing[group]], self.temperature,
                                self.device, self.rows)[0]
            self.reference_logprobs[missing[group]] = lp.float().cpu()
        return self.reference_logprobs[indices].to(self.device)

    def cache_key(self):
        """What the cached reference scores depend on besides the reference itself: the encoded
        training examples (data, style, window), what their scores are divided by (unless their
        tokens) and the temperature."""
        if not hasattr(self, "_cache_key"):
            scored = (self.encoded if self.per_token
                      else [self.encoded, self.normalisers.tolist()])
            digest = hashlib.sha256(json.dumps(scored).encode()).hexdigest()
            self._cache_key = f"{digest}/{self.temperature!r}"
        return self._cache_key

    def state_dict(self):
        return {"reference_logprobs": self.reference_logprobs, "key": self.cache_key()}

    def load_state_dict(self, state):
        """Keep the checkpoint's cached reference scores if they were computed for these examples
        at this temperature. -> whether they were kept (else they are computed again as met)."""
        cached = state["reference_logprobs"]
        if (cached.shape != self.reference_logprobs.shape
                or state.get("key", self.cache_key()) != self.cache_key()):
            return False
        self.reference_logprobs = cached.clone()
        return True

    @torch.no_grad()
    def collect(self, policy, reference, examples, indices, generator, timer):
        encoded = [self.encoded[i] for i in indices]
        normalisers = self.normalisers[indices]
        lengths = self.lengths(encoded)
        policy_lp = torch.zeros(len(encoded), 4, device=self.device)
        values = torch.zeros(len(encoded), device=self.device)
        with timer("rollout"):
            for group in micro_batches(torch.arange(len(encoded)), lengths,
                                       self.micro_batch_size):
                lp, v = choice_forward(policy, [encoded[j] for j in group.tolist()],
                                       normalisers[group], self.temperature, self.device,
                                       self.rows)
                group = group.to(self.device)
                policy_lp[group], values[group] = lp, v
        with timer("reference"):
            ref_lp = self.reference(reference, indices)
        # an example whose scores are not finite (an overflow in a low-precision forward: the
        # weights are checked after every step) is sampled uniformly; its log-prob keeps the step
        # non-finite, so the step is skipped as a generate rollout's would be, on every rank
        probs = torch.where(torch.isfinite(policy_lp).all(dim=1, keepdim=True), policy_lp.exp(),
                            torch.ones_like(policy_lp))
        choices = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
        with timer("reward"):
            scores = self.reward_fn(indices, choices.squeeze(1).cpu()).to(self.device).float()
            every_score = None
            if self.score_every_ending:
                every_score = torch.stack([self.reward_fn(indices, torch.full((len(indices),), i))
                                           for i in range(4)], 1).to(self.device).float()
        samples = [{"ctx": ex["ctx"], "chosen": ex["endings"][c], "label": ex.get("label")}
                   for ex, c in zip(examples, choices.squeeze(1).tolist())]
        return Rollouts(examples=examples, actions={"choices": choices, "encoded": encoded,
                                                    "normalisers": normalisers},
                        logprobs=policy_lp.gather(1, choices),
                        ref_logprobs=ref_lp.gather(1, choices),
                        values=values[:, None],
                        mask=torch.ones(choices.shape, device=self.device), scores=scores,
                        n_tokens=int(lengths.sum()),
                        samples=samples, lengths=lengths, choice_logprobs=policy_lp,
                        choice_ref_logprobs=ref_lp, choice_scores=every_score)

    def forward(self, model, rollouts, micro):
        """-> the chosen endings' log-probs, values and entropies (N, 1), and every ending's
        log-probs (N, 4)."""
        encoded = [rollouts.actions["encoded"][j] for j in micro.tolist()]
        lp, v = choice_forward(model, encoded, rollouts.actions["normalisers"][micro.cpu()],
                               self.temperature, self.device, self.rows)
        entropy = -(lp.exp() * lp).sum(1, keepdim=True)
        chosen = lp.gather(1, rollouts.actions["choices"][micro])
        return chosen, v[:, None], entropy, lp

    def lengths(self, encoded):
        """(N,) long: the tokens each encoded example's choice forward runs (micro_batches)."""
        return self.rows.choice_lengths(encoded)[1]

    def metrics(self, rollouts):
        """The share of this rank's choices that were the gold ending (when the data has labels)."""
        labels = [ex.get("label") for ex in rollouts.examples]
        if any(label is None for label in labels):
            return {}
        labels = torch.tensor(labels, device=self.device)
        chosen = rollouts.actions["choices"].squeeze(1)
        return {"train/chosen_acc": (chosen == labels).float().mean().item()}


def sequence_forward(model, prompts, prompt_mask, responses, response_mask, temperature,
                     entropy_grad=True):
    """
    Log-probs (temperature applied), values and entropies of the response tokens: (B, N) each,
    float32; the entropies carry no gradient unless entropy_grad. The value of token t is read at
    the position before it (the state it was chosen in). Prompts are left-padded, responses
    right-padded, and every prompt has a token.
    Each row runs packed: its prompt's tokens, then its response's, from column 0, with all its
    padding at the end. So a micro-batch runs as many columns as its longest prompt + response
    (not its longest prompt plus its longest response), and attention is plain causal (padding at
    a row's end is never attended to), with the positions the row would have alone.
    """
    P, N = prompts.size(1), responses.size(1)
    prompt_len, response_len = prompt_mask.sum(1), response_mask.sum(1)  # (B,), (B,)
    T, W = torch.stack([(prompt_len + response_len).max(),
                        response_len.max().clamp(min=1)]).tolist()
    col = torch.arange(T, device=prompts.device)
    # (B, T) packed column j of a row holds column j + (its left padding) of prompt + response
    source = (col + (P - prompt_len)[:, None]).clamp(max=P + N - 1)
    idx = torch.cat([prompts, responses], 1).gather(1, source)
    response_mask = response_mask[:, :W]
    # response token t of a row is predicted at column prompt_len - 1 + t
    first = (prompt_len - 1)[:, None]  # (B, 1)
    at = (col >= first) & (col < first + response_len[:, None])  # (B, T)
    predictor = (first + torch.arange(W, device=prompts.device)).clamp(max=T - 1)  # (B, W)
    selected = response_mask.bool()
    # logits (K, V) at the response positions, row by row in order
    logits, values = model(idx, logits_at=at)
    logits = logits.float()
    if temperature != 1:
        logits = logits / temperature
    # (K, V), once for the log-probs and the entropy
    logp = F.log_softmax(logits, dim=-1)
    responses = responses[:, :W]
    logprobs = torch.zeros(responses.shape, device=idx.device).masked_scatter(
        selected, logp.gather(1, responses[selected][:, None]).squeeze(1))
    # without an entropy bonus its (K, V) backward would be wasted work
    with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
        entropy = torch.zeros(responses.shape, device=idx.device).masked_scatter(
            selected, -(logp.exp() * logp).sum(-1))
    values = values.gather(1, predictor) * response_mask
    return tuple(F.pad(x, (0, N - W)) for x in (logprobs, values, entropy))


def prompt_ids(tokens, context, budget):
    """A generate rollout's prompt: the context's (token ids) last tokens, after the BOS the
    policy puts before a text (if any), budget tokens in all."""
    head = [] if tokens.bos_id is None else [tokens.bos_id]
    return head + context[max(0, len(context) - budget + len(head)):]


class GenerateRollouts:
    """The policy writes a continuation of the context (its last prompt_budget tokens); the judge's
    likelihood of it, given the whole context, is the score. A sample that never stopped loses
    no_stop_penalty, and an empty one gets -no_stop_penalty without asking the judge. Text goes in
    and out through the policy's tokens (policy.Tokens)."""

    def __init__(self, reward_fn, cfg, prompt_budget, stop_tokens, device, tokens):
        self.reward_fn, self.cfg = reward_fn, cfg
        self.max_actions = cfg.max_new_tokens  # per rollout
        self.prompt_budget, self.device = prompt_budget, device
        self.stop_tokens = torch.tensor(stop_tokens, device=device)
        self.tokens = tokens

    @torch.no_grad()
    def collect(self, policy, reference, examples, indices, generator, timer):
        cfg = self.cfg
        contexts = [self.tokens.encode(ex["ctx"]) for ex in examples]
        prompt_tokens = [prompt_ids(self.tokens, c, self.prompt_budget) for c in contexts]
        prompts, prompt_mask = (t.to(self.device)
                                for t in padded(prompt_tokens, self.tokens.pad_id, left=True))
        with timer("rollout"):
            responses, response_mask, *sampled = policy.generate(
                prompts, prompt_mask, max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p,
                stop_tokens=self.stop_tokens.tolist(), generator=generator,
                with_values=not cfg.rollout_forward)
            lengths = (prompt_mask.sum(1) + response_mask.sum(1)).cpu()
            groups = micro_batches(torch.arange(len(examples)), lengths, cfg.micro_batch_size)
            sequences = (prompts, prompt_mask, responses, response_mask)
            # the sampling loop's log-probs and values (rollout_forward=False), or a forward's
            logprobs, values = (self.scored_by(policy, groups, *sequences) if cfg.rollout_forward
                                else sampled)
        with timer("reference"):
            ref_logprobs = self.scored_by(reference, groups, *sequences)[0]
        with timer("reward"):
            scores, shares, samples = self.score(examples, contexts, responses, response_mask)
        actions = {"prompts": prompts, "prompt_mask": prompt_mask, "responses": responses}
        return Rollouts(examples=examples, actions=actions, logprobs=logprobs,
                        ref_logprobs=ref_logprobs, values=values, mask=response_mask.float(),
                        scores=scores, n_tokens=int(lengths.sum()), samples=samples,
                        lengths=lengths, score_shares=shares)

    def scored_by(self, model, groups, prompts, prompt_mask, responses, response_mask):
        """sequence_forward's log-probs and values of every response (B, N), run a group of rows
        (micro_batches) at a time."""
        logprobs, values = (torch.zeros(responses.shape, device=self.device) for _ in "lv")
        for group in groups:
            group = group.to(self.device)
            logprobs[group], values[group], _ = sequence_forward(
                model, prompts[group], prompt_mask[group], responses[group], response_mask[group],
                self.cfg.temperature)
        return logprobs, values

    def score(self, examples, contexts, responses, response_mask):
        """-> (B,) scores, (B, L) their shares per token (None unless likelihood_dense) and the
        samples (text, whether it stopped, the judge's raw score or None if not judged). The judge
        scores the sampled token ids themselves when it shares the policy's vocabulary, and their
        text otherwise. With dense shares, the penalties (an empty or unstopped sample) go to the
        last token."""
        lengths = response_mask.sum(1)
        last = (lengths - 1).clamp(min=0)
        stopped = torch.isin(responses.gather(1, last[:, None]).squeeze(1), self.stop_tokens)
        eos = self.tokens.eos_id
        samples = [[t for t in row[:n] if t != eos]
                   for row, n in zip(responses.tolist(), lengths.tolist())]
        texts = [self.tokens.decode(tokens) for tokens in samples]
        nonempty = [i for i, text in enumerate(texts) if text.strip()]
        scores = torch.full((len(examples),), -self.cfg.no_stop_penalty, device=self.device)
        # every rank calls the reward, even with nothing to score: it may all-reduce its running
        # statistics
        judge_args = ([contexts[i] for i in nonempty], [samples[i] for i in nonempty],
                      self.tokens)
        shares = None
        if self.cfg.likelihood_dense:
            judged, judged_shares = self.reward_fn.dense(*judge_args)
            shares = torch.zeros(responses.shape, device=self.device)
            for i, share in zip(nonempty, judged_shares):
                # the judge scored the sample without its EOS, so the shares go to the other
                # tokens
                at = (responses[i, :lengths[i]] != eos).nonzero().squeeze(1)
                shares[i, at] = share.to(self.device)
        else:
            judged = self.reward_fn(*judge_args)
        scores[nonempty] = judged.to(self.device).float()
        # the judge's own scale, for the logs: normalised rewards hide whether samples got likelier
        judge_scores = dict(zip(nonempty, self.reward_fn.last_raw.tolist()))
        scores = scores - self.cfg.no_stop_penalty * (~stopped).float()
        if shares is not None:
            rows = torch.arange(len(examples), device=self.device)
            shares[rows, last] += scores - shares.sum(1)
        samples = [{"ctx": ex["ctx"], "continuation": text, "stopped": stop,
                    "judge_score": judge_scores.get(i)}
                   for i, (ex, text, stop) in enumerate(zip(examples, texts, stopped.tolist()))]
        return scores, shares, samples

    def state_dict(self):
        return None  # nothing cached: every rollout is new text

    def load_state_dict(self, state):
        return True

    def forward(self, model, rollouts, micro):
        """-> the response tokens' log-probs, values and entropies (N, L), and None (no other
        actions were open to it than the vocabulary's)."""
        actions = rollouts.actions
        logprobs, values, entropy = sequence_forward(
            model, actions["prompts"][micro], actions["prompt_mask"][micro],
            actions["responses"][micro], rollouts.mask[micro].long(), self.cfg.temperature,
            entropy_grad=self.cfg.ent_coef > 0)
        return logprobs, values, entropy, None

    def metrics(self, rollouts):
        """This rank's mean response length in tokens, the share of responses that stopped by
        themselves, and the judge's mean raw score (its mean log-prob per token or char, before
        normalising, clipping and penalties) of the non-empty responses."""
        stopped = [sample["stopped"] for sample in rollouts.samples]
        judged = [s["judge_score"] for s in rollouts.samples if s["judge_score"] is not None]
        metrics = {"train/response_length": rollouts.mask.sum(1).mean().item(),
                   "train/stop_rate": sum(stopped) / max(len(stopped), 1)}
        if judged:
            metrics["train/judge_score"] = sum(judged) / len(judged)
        return metrics


def micro_batches(indices, lengths, size):
    """indices (n,) long, split into micro-batches of at most size, longest first by lengths (a
    long tensor indexed by them). A micro-batch is padded to its longest row, so rows of similar
    length waste less of a forward on padding; the longest first, so a micro-batch too big for
    the memory fails at once. -> list of long tensors."""
    order = lengths[indices].argsort(descending=True, stable=True)
    return list(indices[order].split(size)) if len(indices) else []


# --------------------------------------------------------------------------------------------------
# setup: named steps, in the order train() takes them


def load_examples_from(spec, cache_dir):
    if spec.startswith("hellaswag:"):
        return load_examples(split=spec.split(":", 1)[1], cache_dir=cache_dir or None)
    return load_examples(data_file=spec)

def load_data(cfg, run, log):
    """-> train examples, val examples, and where the run's models come from: {"init_from",
    "reward_source", "train_data"} (the demo's synthetic task brings its own data, policy and
    teacher)."""
    sources = {"init_from": cfg.init_from, "reward_source": cfg.reward_model,
               "train_data": cfg.train_data}
    train_data, val_data = cfg.train_data, cfg.val_data
    if cfg.synthetic:
        if run.local_master:
            synthetic.prepare(synthetic_dir(cfg), seed=cfg.seed, log=log)
        run.barrier()
        # already there: only returns the paths
        paths = synthetic.prepare(synthetic_dir(cfg), seed=cfg.seed)
        train_data, val_data = paths["train"], paths["val"]
        sources.update(reward_source=paths["teacher"], train_data=train_data)
        if cfg.init_from == "synthetic":
            sources["init_from"] = paths["policy"]
    if run.local_master:  # one download per node, then every rank reads the cached file
        load_examples_from(train_data, cfg.data_cache)
        load_examples_from(val_data, cfg.data_cache)
    run.barrier()
    train_examples = load_examples_from(train_data, cfg.data_cache)
    val_examples = load_examples_from(val_data, cfg.data_cache)[:cfg.eval_limit or None]
    unlabelled = sum(ex["label"] is None for ex in val_examples)
    if unlabelled:  # found now, not by the first evaluation after the models have loaded
        raise UserError(f"config: val_data={cfg.val_data!r}: {unlabelled} of its examples have no "
                        "label (HellaSwag's test split is unlabelled); evaluate on val")
    return train_examples, val_examples, sources


# what a policy built from scratch is made of
SCRATCH_SETTINGS = ("seed", "n_layer", "n_head", "n_embd", "block_size")


def build_policy(source, cfg):
    if source == "scratch":
        # the same weights on every rank, and again when the reference is rebuilt
        torch.manual_seed(cfg.seed)
        return GPT(GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                             block_size=cfg.block_size))
    # a GPT-2 as hellaswag.py tells one (exactly GPT-2, GPT-2's tokens) loads into GPT, any other
    # causal LM is wrapped by the adapter
    model, tokenizer = hellaswag.load_model(source)
    return model if tokenizer is None else HFPolicy.wrap(model, tokenizer, source)


def policy_from_checkpoint(model_config, state_dict, where):
    """The policy a checkpoint holds (its model_config: the policy's checkpoint_fields)."""
    if HFPolicy.records(model_config):
        return HFPolicy.from_checkpoint(model_config, state_dict, where)
    policy = GPT(GPTConfig(**model_config))
    policy._load_state_dict(state_dict, where)
    return policy


def load_models(cfg, init_from, ckpt, resume_path, device):
    """-> (policy with its value head, frozen reference, what a checkpoint keeps of the reference
    (a Reference: where it came from, the settings of a scratch one, a fingerprint of its
    weights)). ckpt: the Checkpoint resumed (read_checkpoint), or None. A resumed run
    rebuilds the reference from the source its checkpoint names (a scratch one from the settings
    the run began with, whatever the config says today), refuses one whose weights changed since,
    and builds the policy from the checkpoint. A run directory as the source is pinned to its
    newest checkpoint file, which later saves of that run do not change."""
    reference_from = ckpt.reference.source if ckpt else checkpoint_source(init_from)
    scratch = None
    if reference_from == "scratch":
        # checkpoints from before reference_settings: their config is the first run's
        saved = ((ckpt.reference.settings or ckpt.config) if ckpt
                 else dataclasses.asdict(cfg))
        scratch = {k: saved[k] for k in SCRATCH_SETTINGS if k in saved}
        cfg = dataclasses.replace(cfg, **scratch)
    reference = build_policy(reference_from, cfg)
    fingerprint = weights_fingerprint(reference)
    if ckpt and ckpt.reference.fingerprint not in (None, fingerprint):
        raise UserError(f"{reference_from}: not the weights this run started from as its "
                        "reference (rewritten since?), so its KL penalty and cached reference "
                        "scores would change; put the original back, or start a new run from "
                        f"{resume_path}")
    reference.to(device).eval().requires_grad_(False)
    if ckpt:
        policy = policy_from_checkpoint(ckpt.model_config, ckpt.model, resume_path)
        if type(policy) is not type(reference) or policy.tokens.vocab() != reference.tokens.vocab():
            raise UserError(f"{resume_path}: its policy and its reference ({reference_from}) are "
                            "not the same kind of model with the same tokenizer; resume with the "
                            "reference the run started from")
    else:
        policy = copy.deepcopy(reference).requires_grad_(True)
    policy.to(device).eval()  # eval mode throughout: PPO wants no dropout in rollouts or updates
    return policy, reference, Reference(reference_from, scratch, fingerprint)


def build_reward(cfg, train_examples, sources, run):
    """The reward kind's reward (REWARD_KINDS), with its judge loaded if it has one. -> the reward,
    and the teacher whose own picks the run evaluates (the judge, if it picks endings), or None."""
    kind = REWARD_KINDS[cfg.reward_kind]
    judge = None
    if kind.judge:
        judge = CausalLM.load(sources["reward_source"], device=run.device,
                              dtype=None if cfg.reward_dtype == "auto" else cfg.reward_dtype)
    cache_dir = cfg.teacher_cache or os.path.join(cfg.out_dir, "teacher_cache")
    # every rank keeps the same running statistics
    reward_fn = kind.build(judge, train_examples, cfg, cache_dir=cache_dir,
                           data_id=os.path.basename(sources["train_data"]),
                           all_reduce=dist.all_reduce if run.ddp else None)
    return reward_fn, judge if kind.picks else None


def build_rollouts(cfg, policy, train_examples, reward_fn, device):
    if cfg.rollout == "choice":
        # choice rollouts score the endings as the evaluator does (one function: the policy's
        # encode_choices), contexts cut to the window; encoding every training example once here
        # makes a bad one an error at setup, the same on every rank
        encoded = policy.encode_choices(train_examples, cfg.style)
        return ChoiceRollouts(encoded, reward_fn, cfg.choice_temperature, cfg.micro_batch_size,
                              device, ADV_ESTIMATORS[cfg.adv_estimator].every_choice_scored,
                              rows=policy, normalisers=choice_normalisers(train_examples, cfg))
    # fit the window
    prompt_budget = min(cfg.max_prompt_tokens, policy.block_size - cfg.max_new_tokens)
    if prompt_budget < 1:
        raise UserError(f"config: max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt "
                        f"in the policy's block_size {policy.block_size}")
    stop_tokens = policy.tokens.stop_tokens(cfg.stop_at_sentence_end)
    return GenerateRollouts(reward_fn, cfg, prompt_budget, stop_tokens, device, policy.tokens)


# --------------------------------------------------------------------------------------------------
# the PPO update


def shaped_rewards(scores, kl, kl_coef, mask, score_shares=None):
    """Per-action rewards (B, L): the KL penalty on every action, plus the task's score at the last
    one, or, given score_shares (B, L), each action's share of it."""
    rewards = -kl_coef * kl
    if score_shares is not None:
        return rewards + score_shares * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards


def kl_estimate(estimator, logprobs, ref_logprobs, mask, choice_logprobs, choice_ref_logprobs):
    """(B, L) the KL to the reference of each action as the KL estimator measures it, 0 at
    padding; choice_logprobs and choice_ref_logprobs are every ending's (choice rollouts) or
    None."""
    return estimator.estimate(logprobs, ref_logprobs, choice_logprobs, choice_ref_logprobs) * mask


def learning_mask(batch, cfg, run):
    """(B, L) the actions the loss learns from: all of them, but (drop_zero_std_groups) not those
    of a group whose samples all got one score. -> the mask, and for a group estimator the share
    of such groups over every rank, for the log."""
    if not ADV_ESTIMATORS[cfg.adv_estimator].grouped:
        return batch.mask, {}
    zero_std = zero_std_groups(batch.scores, cfg.group_size).float()
    n_zero, n_samples = all_reduce_sum(zero_std.sum(), zero_std.new_tensor(len(zero_std)))
    metrics = {"frac_zero_std_groups": (n_zero / n_samples).item()}
    if cfg.drop_zero_std_groups:
        return batch.mask * (1 - zero_std)[:, None], metrics
    return batch.mask, metrics


# a minibatch's statistics: ppo_losses' and the entropy's means
LOSS_NAMES = ("pg_loss", "vf_loss", "approx_kl", "clipfrac", "entropy")


def ppo_update(model, raw_model, state, rollout_kind, batch, cfg, run):
    """ppo_epochs passes over the batch in shuffled minibatches: one optimizer step per minibatch
    (minibatch_gradients, then optimizer_step). During value warm-up only the value head steps.
    Stops early once approx_kl passes target_kl, and at the first non-finite gradient, whose update
    is not applied (the optimizer's state is not touched).
    -> (mean statistics, epochs done, whether every gradient was finite)."""
    value_warmup = in_value_warmup(state.step, cfg)
    stats = {k: [] for k in LOSS_NAMES + ("grad_norm",)}
    summary = lambda: {k: float(np.mean(v)) for k, v in stats.items() if v}  # noqa: E731
    for epoch in range(cfg.ppo_epochs):
        permutation = torch.randperm(len(batch.scores), generator=state.shuffle_generator)
        for minibatch in permutation.split(cfg.minibatch_size):
            counts = batch.loss_counts[minibatch.to(run.device)].sum()
            # every rank reaches this all-reduce: each has the same number of minibatches
            # (batch_size and minibatch_size are per rank), and the setting is the same on all
            if cfg.drop_zero_std_groups and all_reduce_sum(counts)[0] == 0:
                continue  # all of it dropped, on every rank: no step (Adam's momentum would move)
            minibatch_stats = minibatch_gradients(model, rollout_kind, batch, minibatch,
                                                  counts.clamp(min=1), state, cfg, run,
                                                  value_warmup)
            for k, value in zip(LOSS_NAMES, minibatch_stats):
                stats[k].append(value)
            grad_norm, applied = optimizer_step(raw_model, state, cfg, value_warmup)
            stats["grad_norm"].append(grad_norm)
            if not applied:
                return summary(), epoch + 1, False
            # every rank reaches this all-reduce: the step above was applied on all of them or on
            # none (the gradient norm is the same everywhere); and every rank sees the same mean,
            # so every rank stops at the same point
            if (cfg.target_kl > 0 and all_reduce_sum(torch.tensor(stats["approx_kl"][-1]))[0]
                    / run.world_size > cfg.target_kl):
                return summary(), epoch + 1, True
    return summary(), cfg.ppo_epochs, True


def minibatch_gradients(model, rollout_kind, batch, minibatch, n_actions, state, cfg, run,
                        value_warmup):
    """A minibatch's gradients, accumulated over its micro-batches. A minibatch's losses are means
    over its actions, weighed as loss_agg says (loss_weights), each micro-batch's by its share of
    the minibatch's n_actions (its loss_counts' sum), so micro_batch_size (a memory setting) does
    not change the update; that is also what lets each micro-batch take rollouts of similar length
    (micro_batches). -> the minibatch's mean of each of LOSS_NAMES."""
    micros = micro_batches(minibatch, batch.lengths, cfg.micro_batch_size)
    minibatch_stats = torch.zeros(len(LOSS_NAMES), device=run.device)
    for i, micro in enumerate(micros):
        micro = micro.to(run.device)
        # DDP all-reduces the gradients in the backward of the minibatch's last micro-batch only;
        # every rank reaches it at the same micro-batch: each has minibatch_size rollouts, so as
        # many micro-batches
        no_sync = (model.no_sync() if run.ddp and i < len(micros) - 1
                   else contextlib.nullcontext())
        with no_sync, autocast(run.device, run.dtype):
            loss, losses = micro_batch_loss(model, rollout_kind, batch, micro,
                                            state.kl_controller.value, cfg, value_warmup)
        # this micro-batch's share of the minibatch's weight: its means weigh that much
        share = batch.loss_weights[micro].sum() / n_actions
        state.scaler.scale(loss * share).backward()
        minibatch_stats += torch.stack([losses[k].detach().float() for k in LOSS_NAMES]) * share
    return minibatch_stats.tolist()


def micro_batch_loss(model, rollout_kind, batch, micro, kl_coef, cfg, value_warmup):
    """-> (what a micro-batch minimises (step_loss), its LOSS_NAMES: means over its actions)."""
    kl_estimator = KL_ESTIMATORS[cfg.kl_estimator]
    new_logprobs, new_values, entropy, new_choice_logprobs = rollout_kind.forward(model, batch,
                                                                                  micro)
    weights = batch.loss_weights[micro]
    losses = ppo_losses(new_logprobs, batch.logprobs[micro], batch.advantages[micro], new_values,
                        batch.values[micro], batch.returns[micro], weights, cfg.clip_coef,
                        cfg.vf_clip_coef)
    losses["entropy"] = masked_mean(entropy, weights)
    kl = None
    if kl_estimator.enters == "loss":
        kl = kl_estimate(kl_estimator, new_logprobs, batch.ref_logprobs[micro], batch.mask[micro],
                         new_choice_logprobs, rows(batch.choice_ref_logprobs, micro))
    return step_loss(losses, kl, weights, kl_coef, cfg, value_warmup), losses


def optimizer_step(raw_model, state, cfg, value_warmup):
    """Apply the accumulated gradients, clipped to grad_clip, and clear them. A non-finite gradient
    norm (the same on every rank: the gradients were all-reduced) is not applied and leaves the
    optimizer's state untouched, but for a float16 overflow, which the scaler skips and answers
    with a lower scale. -> (the gradient norm, whether the update may go on)."""
    optimizer, scaler = state.optimizer, state.scaler
    scaler.unscale_(optimizer)
    if value_warmup:  # the value loss's gradients in the shared trunk are not applied
        for p in policy_parameters(raw_model):
            p.grad = None
    max_norm = cfg.grad_clip or float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), max_norm)
    norm = grad_norm.item()
    finite = bool(torch.isfinite(grad_norm))
    fp16_overflow = not finite and scaler.is_enabled() and scaler.get_scale() > 1.0
    if finite or fp16_overflow:
        # after a float16 overflow the scaler skips the step and lowers its scale
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm, finite or fp16_overflow


def set_learning_rate(optimizer, lr, value_lr_scale):
    """lr for the policy's parameter groups, lr x value_lr_scale for the value head's."""
    for group in optimizer.param_groups:
        group["lr"] = lr * value_lr_scale if group["value_head"] else lr


def in_value_warmup(step, cfg):
    """Whether the step after `step` steps trains the value head alone."""
    return step < cfg.value_warmup_steps


def rows(x, indices):
    """x[indices], for a tensor that may be None."""
    return None if x is None else x[indices]


def policy_parameters(model):
    """Every parameter but the value head's."""
    return [p for name, p in model.named_parameters() if not name.startswith("value_head.")]


def trains_value_head(adv_estimator):
    """An estimator that takes its baseline from the value head fits it; the others need none,
    and leave it frozen (outside the optimizer)."""
    return ADV_ESTIMATORS[adv_estimator].value_head


def step_loss(losses, kl, mask, kl_coef, cfg, value_warmup=False):
    """What a minibatch minimises: the clipped policy loss, the value loss when the estimator uses
    the value head, the entropy bonus, and the KL to the reference when its estimator puts it in
    the loss; during value warm-up, the value loss alone."""
    if value_warmup:
        return cfg.vf_coef * losses["vf_loss"]
    if trains_value_head(cfg.adv_estimator):
        loss = (losses["pg_loss"] + cfg.vf_coef * losses["vf_loss"]
                - cfg.ent_coef * losses["entropy"])
    else:  # no loss, so no backward, through the value head
        loss = losses["pg_loss"] - cfg.ent_coef * losses["entropy"]
    if kl is not None:
        loss = loss + kl_coef * masked_mean(kl, mask)
    return loss


def guarded_update(model, raw_model, state, rollout_kind, batch, cfg, run):
    """ppo_update, but a step whose rollout (on any rank) or gradient is not finite is skipped
    whole, and max_bad_steps of them in a row stop the run; the weights are checked after every
    step, before they are sampled from or saved. -> (mean statistics, epochs done)."""
    finite_ranks = all_reduce_sum(torch.isfinite(batch.advantages).all().float())[0].item()
    finite_rollout = finite_ranks == run.world_size
    stats, epochs_done, finite = {}, 0, False
    if finite_rollout:
        stats, epochs_done, finite = ppo_update(model, raw_model, state, rollout_kind, batch, cfg,
                                                run)
    count_bad_steps(raw_model, state, finite, "gradient" if finite_rollout else "rollout", cfg,
                    run)
    return stats, epochs_done


def count_bad_steps(raw_model, state, finite, what, cfg, run):
    """Count the step about to end as bad unless finite (what: the non-finite part), stop the run
    at max_bad_steps in a row, and check the weights, before they are sampled from or saved."""
    state.bad_steps = 0 if finite else state.bad_steps + 1
    step = state.step + 1
    if state.bad_steps:
        run.warn(f"step {step}: non-finite {what} ({state.bad_steps} step(s) in a row); the rest "
                 "of the step's update is skipped")
    if state.bad_steps >= cfg.max_bad_steps:
        raise UserError(f"{state.bad_steps} steps in a row with non-finite losses or gradients at "
                        f"step {step}; stopping (the last checkpoint is kept; try a lower "
                        "learning_rate)")
    # the same on every rank
    check_finite_weights(raw_model, f"step {step}: the policy (try a lower learning_rate)")


# --------------------------------------------------------------------------------------------------
# training


def check_same_trained_blocks(saved, cfg, resume_path):
    """A resume that trains other blocks than its checkpoint's run (train_top_blocks) cannot load
    that run's optimizer state: refused before any work."""
    blocks = saved.get("train_top_blocks", 0)
    if blocks != cfg.train_top_blocks:
        raise UserError(f"init_from=resume: {resume_path} was trained with train_top_blocks="
                        f"{blocks} and this run asks for {cfg.train_top_blocks}, so its optimizer "
                        f"state cannot go on; resume with --train_top_blocks={blocks}, or start a "
                        f"new run from its weights with --init_from={resume_path} and another "
                        "out_dir")


def check_same_trained_parameters(saved, cfg, resume_path):
    """A checkpoint's optimizer state holds the parameters its run trained: a resume that trains
    other blocks (train_top_blocks), or whose estimator freezes the value head that run trained or
    trains the one it left frozen, cannot load it, and is refused before any work."""
    check_same_trained_blocks(saved, cfg, resume_path)
    before = saved.get("adv_estimator", "gae")  # checkpoints from before the estimators: GAE
    if trains_value_head(before) == trains_value_head(cfg.adv_estimator):
        return
    role = {True: "trains the value head", False: "leaves the value head frozen"}
    raise UserError(f"init_from=resume: {resume_path} was trained with adv_estimator {before!r}, "
                    f"which {role[trains_value_head(before)]}, and this run asks for "
                    f"{cfg.adv_estimator!r}, which {role[trains_value_head(cfg.adv_estimator)]}, "
                    "so its optimizer state cannot go on; resume with "
                    f"--adv_estimator={before}, or start a new run from its weights with "
                    f"--init_from={resume_path} and another out_dir")


# a step's console line: the metrics of the dict that run_ppo logs, in order
CONSOLE_LINE = (Shown("step", "step {}"), Shown("reward", "reward {:.4f}"),
                Shown("kl", "kl {:.4f}"), Shown("pg_loss", "pg {:.4f}"),
                Shown("vf_loss", "vf {:.4f}"),
                Shown("clipfrac", "clipfrac {:.3f}"), Shown("approx_kl", "approx_kl {:.4f}"),
                Shown("entropy", "ent {:.3f}"), Shown("explained_var", "ev {:.3f}"),
                Shown("samples_per_s", "{:.1f} samples/s"), Shown("tokens_per_s", "{:.0f} tok/s"),
                Shown("dt", "dt {:.0f}ms", scale=1000), Shown("peak_mem_gb", "mem {:.2f}GB"))


def training_wrappers(raw_model, cfg, run):
    """-> the policy as the update calls it (DDP-wrapped under torchrun, so the gradients sync),
    that one compiled if cfg.compile, and the optimizer over the raw model's parameters."""
    device_type = torch.device(run.device).type
    if cfg.train_top_blocks:  # frozen before DDP and the optimizer take the trainable parameters
        raw_model.train_top_blocks(cfg.train_top_blocks)
    model = raw_model
    if run.ddp:
        model = torch.nn.parallel.DistributedDataParallel(raw_model, device_ids=[run.local_rank]
                                                          if device_type == "cuda" else None)
    train_model = torch.compile(model) if cfg.compile else model
    optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                               (cfg.beta1, cfg.beta2), device_type)
    return model, train_model, optimizer


def run_ppo(cfg, run):
    """PPO as configured, in the process `run` describes, out_dir held. -> a summary: final step,
    last eval, last metrics, the policy and the signal that stopped the run early (or None)."""
    # ---- setup: seeds, out_dir, data, models, reward, optimizer, resume
    if not cfg.rollout_forward and run.dtype != "float32":
        raise UserError(f"config: rollout_forward=False keeps the sampling loop's log-probs, which "
                        f"under {run.dtype} autocast are the update's only to about 0.2 (ratios "
                        "past clip_coef before any update); use it with dtype=float32, or leave "
                        "it True")
    sample_generator, shuffle_generator = seed_everything(cfg.seed, run)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    resume_path, ckpt = prepare_out_dir(cfg, run, run.log)
    if ckpt:
        check_same_trained_parameters(ckpt.config, cfg, resume_path)
    os.makedirs(cfg.out_dir, exist_ok=True)
    run.log(json.dumps(dataclasses.asdict(cfg), indent=2))
    if ckpt:
        log_changed_settings(ckpt.config, cfg, run)
    train_examples, val_examples, sources = load_data(cfg, run, run.log)
    raw_model, reference, reference_state = load_models(cfg, sources["init_from"], ckpt,
                                                        resume_path, run.device)
    check_finite_weights(raw_model, resume_path or reference_state.source)
    estimator, kl_estimator = ADV_ESTIMATORS[cfg.adv_estimator], KL_ESTIMATORS[cfg.kl_estimator]
    if not estimator.value_head:  # frozen, as saved
        raw_model.value_head.requires_grad_(False)
    run.log(f"policy: {raw_model.num_params() / 1e6:.2f}M parameters from "
            f"{reference_state.source}; "
            f"device {run.device}, {run.world_size} process(es), autocast {run.dtype}")
    reward_fn, teacher = build_reward(cfg, train_examples, sources, run)
    rollout_kind = build_rollouts(cfg, raw_model, train_examples, reward_fn, run.device)
    device_type = torch.device(run.device).type
    model, train_model, optimizer = training_wrappers(raw_model, cfg, run)
    controller = AdaptiveKLController if cfg.adaptive_kl else FixedKLController
    state = TrainingState(
        optimizer=optimizer,
        scaler=torch.amp.GradScaler(device_type, enabled=(run.dtype == "float16")),
        kl_controller=controller(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon),
        reward_fn=reward_fn, rollout_kind=rollout_kind,
        sample_generator=sample_generator, shuffle_generator=shuffle_generator,
        batches=Batches(len(train_examples), cfg.batch_size // cfg.group_size, cfg.seed, run,
                        cfg.group_size),
        reference=reference_state)
    if ckpt:
        state.resume(ckpt, resume_path, cfg, run)
        del ckpt
    manager = RunManager(cfg, run, state, raw_model, val_examples, CONSOLE_LINE)
    manager.evaluations_before_the_loop(teacher)
    timer = manager.timer

    while state.step < cfg.max_steps:
        t0 = time.time()
        lr = learning_rate_at(state.step, cfg)
        set_learning_rate(optimizer, lr, cfg.value_lr_scale)
        indices = state.next_batch()
        # counted in the log: a value warm-up step leaves the policy as it was
        warmup = {"value_warmup": 1} if in_value_warmup(state.step, cfg) else {}

        # ---- rollout and reward: act, score, and record log-probs, values and reference log-probs
        with autocast(run.device, run.dtype):
            batch = rollout_kind.collect(raw_model, reference, [train_examples[i] for i in indices],
                                         indices, state.sample_generator, timer)

        # ---- advantages: the KL (in the reward or the loss), the score at the last action, the
        # estimator's baseline, the actions learnt from, whitening
        kl = kl_estimate(kl_estimator, batch.logprobs, batch.ref_logprobs, batch.mask,
                         batch.choice_logprobs, batch.choice_ref_logprobs)
        in_reward = state.kl_controller.value if kl_estimator.enters == "reward" else 0.0
        rewards = shaped_rewards(batch.scores, kl, in_reward, batch.mask, batch.score_shares)
        batch.advantages, batch.returns = estimator.advantages(batch, rewards, in_reward, cfg)
        mask, group_metrics = learning_mask(batch, cfg, run)
        batch.loss_weights, batch.loss_counts = loss_weights(mask, cfg.loss_agg,
                                                             rollout_kind.max_actions)
        if cfg.whiten_advantages:
            batch.advantages = masked_whiten(batch.advantages, mask, across_ranks=run.ddp)

        # ---- PPO epochs (a step whose rollout or gradient is not finite is skipped), KL control
        with timer("update"):
            stats, epochs_done = guarded_update(train_model, raw_model, state, rollout_kind, batch,
                                                cfg, run)
        state.step += 1
        score_mean, kl_mean = (x / run.world_size
                               for x in all_reduce_sum(batch.scores.mean(), kl.sum(1).mean()))
        state.kl_controller.update(kl_mean.item(), cfg.batch_size * run.world_size)

        # ---- log / eval / checkpoint / stop
        metrics = {"step": state.step, "reward": score_mean.item(), "kl": kl_mean.item(),
                   "kl_coef": state.kl_controller.value, "lr": lr, **stats,
                   "explained_var": explained_variance(batch.values, batch.returns, batch.mask),
                   "ppo_epochs_done": epochs_done, **warmup, **group_metrics,
                   **manager.throughput(t0, len(indices), batch.n_tokens),
                   **rollout_kind.metrics(batch)}
        if manager.end_of_step(metrics, batch):
            break

    stopped_by = manager.finish()
    return {"step": state.step, "eval": manager.last_eval, "metrics": manager.metrics,
            "model": raw_model, "stopped_by": stopped_by}


def train(cfg, loop=run_ppo):
    """Run PPO (or another loop of run_ppo's shape: train_sft.run_sft) as configured: the
    processes set up, out_dir held for the run's life (a second run into it is refused), and torn
    down at the end. -> the loop's summary."""
    cfg = absolute_paths(cfg)
    check_sources(cfg)
    run = setup_distributed(cfg)
    with out_dir_lock(cfg.out_dir, run):
        try:
            summary = loop(cfg, run)
        except RuntimeError as e:  # a collective failed: one line, naming the lost rank
            raise lost_rank_error(run, e) or e from None
    if run.ddp:
        # every rank done with every collective first: tearing gloo down mid-way can abort a rank
        dist.barrier()
        # the DDP wrapper went with run_ppo; collected now: were its reducer the last owner of the
        # process group, the group's destructor would run holding the GIL and could wait forever
        # on a gloo thread that needs the GIL to free a tensor (a rare hang at exit on a busy CPU)
        gc.collect()
        dist.destroy_process_group()
    return summary


def main(argv=None, loop=run_ppo):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nusage: train_ppo.py [configs/X.py ...] [--key=value ...]; the settings, their "
              "defaults and limits:")
        print(describe(Config))
        return None
    cfg = absolute_paths(load_config(argv))
    try:
        summary = train(cfg, loop)
    except StoppedAtOnce as e:
        print(f"error: {stopped_at_once(e.signum, cfg.out_dir)}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:  # Ctrl-C before the run's stop handler is in place: the setup
        print(f"error: interrupted by signal {signal.SIGINT:d} during the setup, before the first "
              "step; nothing was trained: run the command again", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    if summary["stopped_by"] is not None:  # a stop is not a finished run: 128 + the signal
        sys.exit(128 + summary["stopped_by"])
    return summary


def stopped_at_once(signum, out_dir):
    """What a second stop signal leaves, and how to go on from it."""
    if step_checkpoints(out_dir):
        return (f"stopped at once by a second signal ({signum}); the last complete checkpoint is "
                "kept: resume with --init_from=resume")
    return (f"stopped at once by a second signal ({signum}) before the run's first checkpoint, "
            "so there is nothing to resume: start it again with --start_over=True")


if __name__ == "__main__":
    run_cli(main)
