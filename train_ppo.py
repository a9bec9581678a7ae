"""
PPO fine-tuning of a GPT-2 policy, measured on HellaSwag.

    python train_ppo.py configs/demo.py                                        # offline, CPU, a few minutes
    torchrun --standalone --nproc_per_node=8 train_ppo.py configs/gpt2_hellaswag_teacher.py --learning_rate=5e-6

Every step: rollout -> reward -> advantages -> PPO epochs -> log / eval / checkpoint. Two rollout kinds share the
update:
- choice:   the policy scores the 4 endings of a training example exactly as the HellaSwag scorer does (mean log-prob
            per ending token) and samples one from softmax(scores / choice_temperature). One action per example; the
            reward is the teacher's or the label's, minus the KL penalty to the reference; the value head, read at the
            context's last token, predicts it.
- generate: the policy samples a continuation of the context; the reward model's likelihood of it is the score at
            the last token, a per-token KL penalty to the reference is added everywhere, advantages come from GAE.
"""

import ast
import contextlib
import copy
import dataclasses
import difflib
import json
import math
import os
import random
import re
import resource
import signal
import sys
import time
import typing
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import UserError, atomic_torch_save, atomic_write_text, autocast, resolve_device, run_cli
from model import CHECKPOINT_FORMAT, GPT, GPTConfig, latest_checkpoint, logprobs_from_logits


# ----------------------------------------------------------------------------------------------------------------
# config


@dataclass
class Config:
    # run
    out_dir: str = "out/ppo"  # checkpoints, train_config.json, metrics.jsonl, samples.jsonl, the exported policy (hf/)
    # hub name, transformers dir, build-nanogpt/nanoGPT .pt, project checkpoint or run dir, "resume" (this out_dir),
    # "scratch" (random weights of the size below), "synthetic" (the demo task's starting policy)
    init_from: str = "gpt2"
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps (under torchrun: cuda:LOCAL_RANK)
    dtype: str = "bfloat16"  # autocast dtype on CUDA: bfloat16 | float16 (with a GradScaler) | float32; float32 on CPU
    compile: bool = False  # torch.compile the training forward (rollouts and eval stay eager)
    # policy built from scratch (init_from = "scratch")
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    block_size: int = 256
    # data
    train_data: str = "hellaswag:train"  # "hellaswag:<split>" (downloaded) or a jsonl file in HellaSwag's schema
    val_data: str = "hellaswag:val"
    data_cache: str = ""  # download folder for the HellaSwag splits ("" = hellaswag.py's default)
    synthetic: bool = False  # the offline demo task (synthetic.py): its train/val data and its tiny teacher
    synthetic_dir: str = ""  # where the demo task is written ("" = out_dir/synthetic)
    style: str = "completion"  # HellaSwag rendering for choice rollouts, the teacher and eval: completion | lm-eval
    # rollouts
    rollout: str = "choice"  # choice | generate
    batch_size: int = 64  # rollouts per rank per step
    choice_temperature: float = 1.0  # softmax temperature over the 4 endings' scores (choice rollouts)
    max_prompt_tokens: int = 128  # generate: the prompt is the context's last tokens (fewer if the window needs it;
    # the reward model sees the whole context)
    max_new_tokens: int = 24  # generate
    temperature: float = 1.0  # generate: sampling temperature, also applied to the log-probs PPO optimises
    # generate: top-k / top-p sample from a truncated distribution while PPO and the KL use the full one (slightly
    # off-policy); leave them off unless samples degenerate
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    stop_at_sentence_end: bool = True  # generate: stop at ".", "!", "?" or a newline as well as <|endoftext|>
    no_stop_penalty: float = 1.0  # generate: subtracted from the score of a sample that never stopped
    # reward
    reward_kind: str = "teacher"  # teacher | label (choice rollouts), likelihood (generate rollouts)
    reward_model: str = "EleutherAI/gpt-neo-2.7B"  # any transformers causal LM: hub name or local directory
    reward_dtype: str = "auto"  # auto = bfloat16 on CUDA, float32 on CPU
    reward_batch_size: int = 32
    teacher_mode: str = "prob"  # teacher: prob = teacher's probability of the chosen ending, agree = 1/0
    teacher_temperature: float = 1.0  # teacher: softmax temperature over its normalised ending scores
    teacher_cache: str = ""  # teacher: folder for cached teacher scores ("" = out_dir/teacher_cache)
    likelihood_per: str = "token"  # likelihood: mean log-prob per token | char
    reward_clip: float = 0.0  # likelihood: clip the normalised score to [-clip, clip]; 0 = off
    reward_normalize: bool = True  # likelihood: running mean/std normalisation
    # KL to the frozen reference
    kl_coef: float = 0.05  # initial coefficient of the KL penalty in the reward
    adaptive_kl: bool = False  # Ziegler et al. 2019 controller: steer the KL towards kl_target
    kl_target: float = 6.0
    kl_horizon: int = 10000
    # PPO
    ppo_epochs: int = 4
    minibatch_size: int = 16  # per rank; one optimizer step per minibatch
    micro_batch_size: int = 8  # per rank; gradient accumulation inside a minibatch
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    lr_decay_steps: int = 0  # cosine decay to min_lr over this many steps after warmup; 0 = constant
    min_lr: float = 0.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    clip_coef: float = 0.2  # policy ratio clipping
    vf_coef: float = 0.1  # weight of the value loss
    vf_clip_coef: float = 0.2  # value clipping around the rollout's values; 0 = off
    ent_coef: float = 0.0  # entropy bonus
    gamma: float = 1.0
    gae_lambda: float = 0.95
    target_kl: float = 0.0  # stop the step's PPO epochs once approx_kl exceeds this; 0 = off
    whiten_advantages: bool = True
    max_steps: int = 1000
    max_bad_steps: int = 3  # stop after this many non-finite losses in a row
    # logging, evaluation, checkpoints
    log_interval: int = 1
    sample_interval: int = 10  # write a few rollouts to samples.jsonl every this many steps
    eval_interval: int = 50  # HellaSwag at step 0, every eval_interval steps and at the end; 0 = only start and end
    eval_limit: int = 0  # evaluate the first N examples only; 0 = all
    eval_batch_size: int = 32
    checkpoint_interval: int = 100
    keep_last: int = 2  # step checkpoints kept (best.pt is kept besides)
    export_hf: bool = True  # export the final policy as a transformers directory out_dir/hf
    wandb_log: bool = False
    wandb_project: str = "gpt2-ppo-hellaswag"
    wandb_run_name: str = ""


CHOICES = {
    "rollout": ("choice", "generate"),
    "reward_kind": ("teacher", "label", "likelihood"),
    "style": ("completion", "lm-eval"),
    "dtype": ("bfloat16", "float16", "float32"),
    "reward_dtype": ("auto", "bfloat16", "float16", "float32"),
    "teacher_mode": ("prob", "agree"),
    "likelihood_per": ("token", "char"),
}


def read_config_file(path):
    """A config file is plain `name = literal` assignments (comments and docstrings allowed); nothing is executed."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
    except OSError as e:
        raise UserError(f"{path}: cannot read config file ({e.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: config file is not UTF-8 text") from None
    except SyntaxError as e:
        raise UserError(f"{path}:{e.lineno}: syntax error in config file") from None
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            continue  # a docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise UserError(f"{path}:{node.lineno}: config files hold only `name = value` lines")
        try:
            value = ast.literal_eval(node.value)
        except (ValueError, TypeError, MemoryError, RecursionError):
            raise UserError(f"{path}:{node.lineno}: the value of {node.targets[0].id} must be a literal "
                            "(number, string, True/False/None)") from None
        yield node.targets[0].id, value, f"{path}:{node.lineno}"


def parse_override(arg):
    key, sep, text = arg[2:].partition("=")
    if not sep or not key:
        raise UserError(f"{arg}: command-line overrides are written --key=value")
    if typing.get_type_hints(Config).get(key) is str:
        return key, text  # --out_dir=1e3 is the folder "1e3"
    lowered = text.lower()
    if lowered in ("true", "false"):
        return key, lowered == "true"
    if lowered == "none":
        return key, None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return key, text  # not a literal: check_value reports the type
    return key, value


def check_value(key, value, where):
    """Check a value against Config's field type; int -> float allowed, nothing else converted."""
    expected = typing.get_type_hints(Config)[key]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not expected:
        raise UserError(f"{where}: {key} must be {expected.__name__}, got {value!r}")
    if expected is float and not math.isfinite(value):
        raise UserError(f"{where}: {key} must be a finite number, got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise UserError(f"{where}: {key} must be one of {', '.join(CHOICES[key])}, got {value!r}")
    return value


def load_config(argv):
    """Config from defaults, then config files and --key=value overrides in the order given."""
    fields = {f.name for f in dataclasses.fields(Config)}
    values = {}
    for arg in argv:
        items = [(*parse_override(arg), arg)] if arg.startswith("--") else read_config_file(arg)
        for key, value, where in items:
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise UserError(f"{where}: unknown config key {key!r}{hint}")
            values[key] = check_value(key, value, where)
    cfg = Config(**values)
    for name in ("batch_size", "minibatch_size", "micro_batch_size", "ppo_epochs", "max_new_tokens", "keep_last",
                 "max_prompt_tokens", "log_interval", "checkpoint_interval", "eval_batch_size", "reward_batch_size",
                 "max_bad_steps", "kl_horizon"):
        if getattr(cfg, name) < 1:
            raise UserError(f"config: {name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("choice_temperature", "temperature", "teacher_temperature", "clip_coef", "kl_target", "top_p"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"config: {name} must be positive, got {getattr(cfg, name)}")
    for name in ("learning_rate", "min_lr", "weight_decay", "kl_coef", "vf_coef", "vf_clip_coef", "ent_coef",
                 "grad_clip", "target_kl", "reward_clip", "no_stop_penalty", "top_k", "seed", "max_steps",
                 "warmup_steps", "lr_decay_steps", "eval_interval", "eval_limit", "sample_interval"):
        if getattr(cfg, name) < 0:
            raise UserError(f"config: {name} must not be negative, got {getattr(cfg, name)}")
    for name in ("gamma", "gae_lambda", "top_p", "beta1", "beta2"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise UserError(f"config: {name} must be in [0, 1], got {getattr(cfg, name)}")
    if cfg.batch_size % cfg.minibatch_size or cfg.minibatch_size % cfg.micro_batch_size:
        raise UserError(f"config: batch_size ({cfg.batch_size}) must be a multiple of minibatch_size "
                        f"({cfg.minibatch_size}), and that of micro_batch_size ({cfg.micro_batch_size})")
    if cfg.init_from == "synthetic" and not cfg.synthetic:
        raise UserError("config: init_from='synthetic' is the demo task's policy and needs synthetic=True")
    wanted = {"choice": ("teacher", "label"), "generate": ("likelihood",)}[cfg.rollout]
    if cfg.reward_kind not in wanted:
        raise UserError(f"config: rollout {cfg.rollout!r} takes reward_kind {' or '.join(wanted)}, "
                        f"got {cfg.reward_kind!r}")
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# PPO math: small pure functions, float32


def all_reduce_sum(*tensors):
    """Sum float tensors across ranks (no-op without torch.distributed)."""
    stacked = torch.stack([t.float().reshape(()) for t in tensors])
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
            stacked = stacked.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(stacked)
    return stacked.unbind(0)


def masked_mean(x, mask, across_ranks=False):
    total, count = (x * mask).sum(), mask.sum()
    if across_ranks:
        total, count = all_reduce_sum(total, count)
    return total / count.clamp(min=1)


def masked_whiten(x, mask, shift_mean=True, across_ranks=False):
    """Whiten x over the entries where mask is 1 (mean and unbiased variance over all ranks if across_ranks)."""
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
    """Generalised advantage estimation over (B, T) sequences whose valid steps are a prefix (mask 1).
    The step after the last valid one is terminal. -> advantages, returns (both 0 where mask is 0)."""
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


def kl_penalty(logprobs, ref_logprobs, kind="k1"):
    """Per-sample estimates of KL(policy || reference) from log-probs of tokens sampled from the policy.
    k1 = log ratio (unbiased, can be negative), k2 = half its square, k3 = (r - 1) - log r (unbiased, >= 0)."""
    log_ratio = logprobs.float() - ref_logprobs.float()
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}")


def ppo_losses(new_logprobs, old_logprobs, advantages, new_values, old_values, returns, mask, clip_coef, vf_clip_coef):
    """Clipped PPO policy and value losses, averaged over mask; plus approx_kl and clipfrac (as in cleanrl)."""
    new_logprobs, new_values = new_logprobs.float(), new_values.float()
    log_ratio = new_logprobs - old_logprobs
    ratio = log_ratio.exp()
    pg_losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_coef, 1 + clip_coef))
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


# ----------------------------------------------------------------------------------------------------------------
# rollouts: forward passes that give log-probs, values and entropies of the actions


def choice_forward(model, encoded, choice_temperature, device):
    """
    Score the 4 endings of each encoded example as the HellaSwag scorer does (mean log-prob per ending token) and
    turn them into the policy over endings. -> log-probs (N, 4), values (N,), all float32.
    """
    from hellaswag import choice_logprobs, pad_choices

    idx, attention_mask, target_mask = (t.to(device) for t in pad_choices(encoded))
    logits, values = model(idx, attention_mask, logits_at=target_mask.bool())  # logits (K, V) at ending positions
    sum_logprobs, n_tokens = choice_logprobs(logits, idx, target_mask)
    scores = sum_logprobs / n_tokens  # (N, 4) mean log-prob per ending token
    policy_logprobs = F.log_softmax(scores / choice_temperature, dim=-1)
    last_context = torch.tensor([len(context) - 1 for context, _ in encoded], device=device)
    context_values = values.view(-1, 4, values.size(1))[:, 0].gather(1, last_context[:, None]).squeeze(1)
    return policy_logprobs, context_values


def sequence_forward(model, prompts, prompt_mask, responses, response_mask, temperature):
    """
    Log-probs (temperature applied), values and entropies of the response tokens: (B, N) each, float32.
    The value of token t is read at the position before it (the state it was chosen in).
    """
    P = prompts.size(1)
    idx = torch.cat([prompts, responses], 1)
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    at = torch.zeros_like(idx, dtype=torch.bool)
    at[:, P - 1:-1] = response_mask.bool()
    logits, values = model(idx, attention_mask, logits_at=at)  # logits (K, V) at the response positions
    logits = logits.float() / temperature
    selected = response_mask.bool()
    logprobs = torch.zeros(responses.shape, device=idx.device).masked_scatter(
        selected, logprobs_from_logits(logits, responses[selected]))
    logp = F.log_softmax(logits, dim=-1)
    entropy = torch.zeros(responses.shape, device=idx.device).masked_scatter(selected, -(logp.exp() * logp).sum(-1))
    return logprobs, values[:, P - 1:-1] * response_mask, entropy


def left_pad(rows, pad_token):
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad_token, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, T - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, T - len(r):] = 1
    return idx, mask


def sentence_stop_tokens(enc):
    """<|endoftext|> plus the single tokens that end a sentence: '.', '!', '?' and newlines."""
    from tokenizer import EOT_TOKEN

    stops = {EOT_TOKEN}
    for text in (".", "!", "?", "\n", "\n\n", ".\n", ".\n\n", '."', "!\"", "?\""):
        tokens = enc.encode_ordinary(text)
        if len(tokens) == 1:
            stops.add(tokens[0])
    return sorted(stops)


def chunked(n, size):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


# ----------------------------------------------------------------------------------------------------------------
# checkpoints


def gather_rng_states(sample_generator, shuffle_generator, world_size):
    """Every rank's RNG states (rank order), so that a resumed run samples exactly what an uninterrupted one would."""
    state = {"sample": sample_generator.get_state(), "shuffle": shuffle_generator.get_state(),
             "torch": torch.get_rng_state(), "device_type": sample_generator.device.type}
    if world_size == 1:
        return [state]
    states = [None] * world_size
    dist.all_gather_object(states, state)
    return states


def save_checkpoint(out_dir, step, raw_model, optimizer, scaler, state, cfg, keep_last, best):
    """ckpt_<step>.pt written atomically; older step checkpoints beyond keep_last removed; best.pt linked."""
    ckpt = {"format": CHECKPOINT_FORMAT, "model_config": dataclasses.asdict(raw_model.config),
            "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "step": step, "config": dataclasses.asdict(cfg), **state}
    path = os.path.join(out_dir, f"ckpt_{step:06d}.pt")
    atomic_torch_save(ckpt, path)
    steps = sorted((int(m.group(1)), f) for f in os.listdir(out_dir) if (m := re.fullmatch(r"ckpt_(\d+)\.pt", f)))
    for _, old in steps[:-keep_last]:
        os.remove(os.path.join(out_dir, old))
    if best:  # a hard link: the step file can be rotated away, best.pt stays
        tmp = os.path.join(out_dir, ".best.pt.tmp")
        if os.path.exists(tmp):
            os.remove(tmp)
        try:
            os.link(path, tmp)
        except OSError:
            atomic_torch_save(ckpt, tmp)
        os.replace(tmp, os.path.join(out_dir, "best.pt"))
    return path


def drop_lines_after(path, step):
    """Keep the JSON lines of path whose "step" is at most step (rewritten atomically)."""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(path, "".join(kept))


def eval_predictions_path(out_dir, step):
    return os.path.join(out_dir, "eval", f"step_{step:06d}.jsonl")


def drop_evaluations_after(out_dir, step):
    """Remove the prediction files of evaluations after step (a resumed run redoes those steps)."""
    eval_dir = os.path.join(out_dir, "eval")
    for name in os.listdir(eval_dir) if os.path.isdir(eval_dir) else []:
        match = re.fullmatch(r"step_(\d+)\.jsonl", name)
        if match and int(match.group(1)) > step:
            os.remove(os.path.join(eval_dir, name))


def load_examples_from(spec, cache_dir):
    from hellaswag import load_examples

    if spec.startswith("hellaswag:"):
        return load_examples(split=spec.split(":", 1)[1], cache_dir=cache_dir or None)
    return load_examples(data_file=spec)


def peak_memory_gb(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


# ----------------------------------------------------------------------------------------------------------------
# training


def train(cfg):
    """Run PPO as configured. Returns a summary: final step, last eval, last metrics and the policy."""
    from hellaswag import encode_for_model, evaluate, write_predictions
    from reward import LabelReward, LikelihoodReward, RewardModel, TeacherReward
    from tokenizer import EOT_TOKEN, gpt2_encoding

    # ---- setup: distributed, device, precision, seeds
    requested_device = resolve_device(cfg.device)  # a device this machine lacks is an error here, on every rank
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        ddp_rank, ddp_local_rank, ddp_world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        backend = "nccl" if requested_device.startswith("cuda") else "gloo"
        device = resolve_device(f"cuda:{ddp_local_rank}") if backend == "nccl" else "cpu"  # one GPU per process
        dist.init_process_group(backend=backend)
        if backend == "nccl":
            torch.cuda.set_device(device)
    else:
        ddp_rank, ddp_local_rank, ddp_world_size = 0, 0, 1
        device = requested_device
        if device == "cuda":
            device = f"cuda:{torch.cuda.current_device()}"  # set_device needs an index
        if device.startswith("cuda"):
            torch.cuda.set_device(device)  # memory stats and synchronize follow the chosen GPU
    master_process = ddp_rank == 0
    device_type = torch.device(device).type
    dtype = cfg.dtype if device_type == "cuda" else "float32"
    log = print if master_process else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed + ddp_rank)
    np.random.seed(cfg.seed + ddp_rank)
    random.seed(cfg.seed + ddp_rank)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    sample_generator = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + ddp_rank)
    shuffle_generator = torch.Generator().manual_seed(cfg.seed * 1000 + 500 + ddp_rank)
    os.makedirs(cfg.out_dir, exist_ok=True)
    if master_process:
        log(json.dumps(dataclasses.asdict(cfg), indent=2))
        atomic_write_text(os.path.join(cfg.out_dir, "train_config.json"),
                          json.dumps(dataclasses.asdict(cfg), indent=2))

    # ---- data
    if cfg.synthetic:
        import synthetic

        synthetic_dir = cfg.synthetic_dir or os.path.join(cfg.out_dir, "synthetic")
        if master_process:
            synthetic.prepare(synthetic_dir, seed=cfg.seed, log=log)
        if ddp:
            dist.barrier()
        paths = synthetic.prepare(synthetic_dir, seed=cfg.seed)  # already there: only returns the paths
        train_data, val_data, reward_source = paths["train"], paths["val"], paths["teacher"]
        init_from = paths["policy"] if cfg.init_from == "synthetic" else cfg.init_from
    else:
        train_data, val_data, reward_source, init_from = cfg.train_data, cfg.val_data, cfg.reward_model, cfg.init_from
    if master_process:  # one download, then every rank reads the cached file
        load_examples_from(train_data, cfg.data_cache)
        load_examples_from(val_data, cfg.data_cache)
    if ddp:
        dist.barrier()
    train_examples = load_examples_from(train_data, cfg.data_cache)
    val_examples = load_examples_from(val_data, cfg.data_cache)
    if cfg.eval_limit:
        val_examples = val_examples[:cfg.eval_limit]
    enc = gpt2_encoding()
    encode = enc.encode_ordinary

    # ---- models: policy (+ value head), frozen reference, reward
    resume_path = None
    if cfg.init_from == "resume":
        resume_path = latest_checkpoint(cfg.out_dir) if os.path.isdir(cfg.out_dir) else None
        if resume_path is None:
            raise UserError(f"init_from=resume: no checkpoint (ckpt_*.pt) in {cfg.out_dir}")
    ckpt = torch.load(resume_path, map_location="cpu", weights_only=True) if resume_path else None
    reference_from = ckpt["reference_from"] if ckpt else init_from

    def build_policy(source):
        if source == "scratch":
            torch.manual_seed(cfg.seed)  # the same weights on every rank, and again when the reference is rebuilt
            return GPT(GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size))
        return GPT.from_pretrained(source)

    reference = build_policy(reference_from).to(device).eval().requires_grad_(False)
    raw_model = build_policy(resume_path) if ckpt else copy.deepcopy(reference).requires_grad_(True)
    raw_model.to(device).eval()  # eval mode throughout: PPO wants no dropout in rollouts or updates
    log(f"policy: {raw_model.num_params() / 1e6:.2f}M parameters from {reference_from}; device {device}, "
        f"{ddp_world_size} process(es), autocast {dtype}")
    prompt_budget = min(cfg.max_prompt_tokens, raw_model.config.block_size - cfg.max_new_tokens)  # fit the window
    if cfg.rollout == "generate" and prompt_budget < 1:
        raise UserError(f"config: max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in the policy's "
                        f"block_size {raw_model.config.block_size}")
    # choice rollouts score the endings as the evaluator does, contexts cut to the window; encoding every training
    # example once here makes a bad one an error at setup, the same on every rank
    train_encoded = ([encode_for_model(ex, encode, raw_model.config.block_size, cfg.style) for ex in train_examples]
                     if cfg.rollout == "choice" else None)
    model = torch.nn.parallel.DistributedDataParallel(raw_model, device_ids=[ddp_local_rank] if device_type == "cuda"
                                                      else None) if ddp else raw_model
    train_model = torch.compile(model) if cfg.compile else model
    optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    kl_controller = (AdaptiveKLController if cfg.adaptive_kl else FixedKLController)(cfg.kl_coef, cfg.kl_target,
                                                                                     cfg.kl_horizon)
    reward_dtype = None if cfg.reward_dtype == "auto" else cfg.reward_dtype
    if cfg.reward_kind == "label":
        reward_fn = LabelReward(train_examples)
    else:
        reward_model = RewardModel(reward_source, device=device, dtype=reward_dtype)
        if cfg.reward_kind == "teacher":
            reward_fn = TeacherReward(reward_model, train_examples, style=cfg.style, mode=cfg.teacher_mode,
                                      temperature=cfg.teacher_temperature, batch_size=cfg.reward_batch_size,
                                      cache_dir=cfg.teacher_cache or os.path.join(cfg.out_dir, "teacher_cache"),
                                      data_id=train_data)
        else:
            reward_fn = LikelihoodReward(reward_model, per=cfg.likelihood_per, clip=cfg.reward_clip or None,
                                         normalize=cfg.reward_normalize, batch_size=cfg.reward_batch_size,
                                         all_reduce=dist.all_reduce if ddp else None)  # same statistics on every rank
    stop_tokens = sentence_stop_tokens(enc) if cfg.stop_at_sentence_end else [EOT_TOKEN]

    step, data_position, best_acc_norm = 0, 0, -1.0
    if ckpt:  # ---- resume
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        kl_controller.load_state_dict(ckpt["kl_controller"])
        if kl_controller.value != cfg.kl_coef:
            log(f"KL coefficient {kl_controller.value:.4g} restored from the checkpoint (config kl_coef {cfg.kl_coef})")
        if hasattr(reward_fn, "load_state_dict") and ckpt.get("reward") is not None:
            reward_fn.load_state_dict(ckpt["reward"])
        step, data_position, best_acc_norm = ckpt["step"], ckpt["data_position"], ckpt["best_acc_norm"]
        rng = ckpt["rng"]
        if len(rng) == ddp_world_size and rng[ddp_rank].get("device_type") == sample_generator.device.type:
            mine = rng[ddp_rank]
            sample_generator.set_state(mine["sample"])
            shuffle_generator.set_state(mine["shuffle"])
            torch.set_rng_state(mine["torch"])
        else:
            log(f"warning: checkpoint has RNG states of {len(rng)} rank(s) on {rng[0].get('device_type')}, this run "
                f"has {ddp_world_size} on {sample_generator.device.type}; sampling is reseeded, not continued")
        log(f"resumed from {resume_path} at step {step}")
        if master_process:  # steps logged after that checkpoint are about to be redone
            for name in ("metrics.jsonl", "samples.jsonl"):
                drop_lines_after(os.path.join(cfg.out_dir, name), step)
            drop_evaluations_after(cfg.out_dir, step)
        del ckpt

    def run_eval(step):
        """Evaluate, and keep the per-example predictions as out_dir/eval/step_NNNNNN.jsonl (master only)."""
        raw_model.eval()
        with torch.no_grad():
            result = evaluate(raw_model, val_examples, style=cfg.style, batch_size=cfg.eval_batch_size,
                              device=device, dtype=dtype, return_predictions=True)
        if master_process:
            os.makedirs(os.path.join(cfg.out_dir, "eval"), exist_ok=True)
            write_predictions(eval_predictions_path(cfg.out_dir, step), result["predictions"])
        return {"eval/acc": result["acc"], "eval/acc_norm": result["acc_norm"], "eval/n": result["n"]}

    def next_batch(position):
        """This rank's slice of the next global batch: an epoch-seeded permutation, so resuming needs only the
        position."""
        global_batch = cfg.batch_size * ddp_world_size
        indices = []
        for i in range(position + ddp_rank * cfg.batch_size, position + (ddp_rank + 1) * cfg.batch_size):
            epoch, offset = divmod(i, len(train_examples))
            permutation = np.random.RandomState(cfg.seed + epoch).permutation(len(train_examples))
            indices.append(int(permutation[offset]))
        return indices, position + global_batch

    # ---- stop cleanly on SIGTERM / SIGINT: finish the step, write a checkpoint, exit 0
    stop_signal = {"received": None}

    def on_signal(signum, frame):
        if stop_signal["received"] is not None:  # a second signal: stop at once, without a checkpoint
            raise KeyboardInterrupt
        stop_signal["received"] = signum
        log(f"signal {signum}: finishing this step, then writing a checkpoint (signal again to stop at once)")

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)

    wandb_run = None
    if cfg.wandb_log and master_process:
        try:
            import wandb
            wandb_run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None,
                                   config=dataclasses.asdict(cfg))
        except ImportError:
            log("warning: wandb_log=True but wandb is not installed; logging to metrics.jsonl only")
    metrics_file = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") if master_process else None

    def log_metrics(metrics):
        if master_process:
            metrics_file.write(json.dumps(metrics) + "\n")
            metrics_file.flush()
            if wandb_run:
                wandb_run.log(metrics, step=metrics["step"])

    last_eval = None
    if step == 0:
        last_eval = run_eval(0)
        log(f"step 0 | eval acc {last_eval['eval/acc']:.4f} | acc_norm {last_eval['eval/acc_norm']:.4f}")
        log_metrics({"step": 0, **last_eval})
    bad_steps, metrics = 0, {}
    while step < cfg.max_steps:
        t0 = time.time()
        lr = learning_rate_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices, data_position = next_batch(data_position)
        examples = [train_examples[i] for i in indices]
        B = len(examples)

        # ---- rollout: act, and record log-probs, values and reference log-probs with one forward each
        with torch.no_grad(), autocast(device, dtype):
            if cfg.rollout == "choice":
                encoded = [train_encoded[i] for i in indices]
                policy_lp, ref_lp, old_values = [], [], []
                for s in chunked(B, cfg.micro_batch_size):
                    lp, v = choice_forward(raw_model, encoded[s], cfg.choice_temperature, device)
                    policy_lp.append(lp)
                    old_values.append(v)
                    ref_lp.append(choice_forward(reference, encoded[s], cfg.choice_temperature, device)[0])
                policy_lp, ref_lp = torch.cat(policy_lp), torch.cat(ref_lp)
                actions = torch.multinomial(policy_lp.exp(), 1, generator=sample_generator).squeeze(1)  # (B,)
                old_logprobs = policy_lp.gather(1, actions[:, None])  # (B, 1): one action per example
                ref_logprobs = ref_lp.gather(1, actions[:, None])
                old_values = torch.cat(old_values)[:, None]
                action_mask = torch.ones_like(old_logprobs)
                n_tokens = sum(4 * len(c) + sum(len(e) for e in es) for c, es in encoded)
            else:
                prompts = [encode(ex["ctx"])[-prompt_budget:] for ex in examples]
                prompt_idx, prompt_mask = (t.to(device) for t in left_pad(prompts, EOT_TOKEN))
                responses, response_mask, _ = raw_model.generate(
                    prompt_idx, prompt_mask, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                    top_k=cfg.top_k or None, top_p=cfg.top_p, stop_tokens=stop_tokens, generator=sample_generator)
                old_logprobs, old_values, ref_logprobs = [], [], []
                for s in chunked(B, cfg.micro_batch_size):
                    args = (prompt_idx[s], prompt_mask[s], responses[s], response_mask[s], cfg.temperature)
                    lp, v, _ = sequence_forward(raw_model, *args)
                    old_logprobs.append(lp)
                    old_values.append(v)
                    ref_logprobs.append(sequence_forward(reference, *args)[0])
                old_logprobs, old_values, ref_logprobs = (torch.cat(x)
                                                          for x in (old_logprobs, old_values, ref_logprobs))
                action_mask = response_mask.float()
                n_tokens = int(prompt_mask.sum() + response_mask.sum())

        # ---- reward: the task's score at the last action, minus the KL penalty on every action
        if cfg.rollout == "choice":
            scores = reward_fn(indices, actions.cpu()).to(device).float()
            sample_texts = [{"ctx": ex["ctx"], "chosen": ex["endings"][a], "label": ex.get("label")}
                            for ex, a in zip(examples, actions.tolist())]
        else:
            lengths = response_mask.sum(1)
            stopped = torch.isin(responses.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1),
                                 torch.tensor(stop_tokens, device=device))
            texts = [enc.decode([t for t in row[:n] if t != EOT_TOKEN])
                     for row, n in zip(responses.tolist(), lengths.tolist())]
            nonempty = [i for i, text in enumerate(texts) if text.strip()]
            scores = torch.full((B,), -cfg.no_stop_penalty, device=device)  # an empty sample gets the penalty
            # every rank calls the reward, even with nothing to score: it may all-reduce its running statistics
            nonempty_scores = reward_fn([examples[i]["ctx"] for i in nonempty], [texts[i] for i in nonempty])
            scores[nonempty] = nonempty_scores.to(device).float()
            scores = scores - cfg.no_stop_penalty * (~stopped).float()
            sample_texts = [{"ctx": ex["ctx"], "continuation": text} for ex, text in zip(examples, texts)]
        kl = kl_penalty(old_logprobs, ref_logprobs) * action_mask  # (B, L) per action
        rewards = -kl_controller.value * kl
        last = action_mask.sum(1).long() - 1
        rewards[torch.arange(B, device=device), last.clamp(min=0)] += scores

        # ---- advantages
        advantages, returns = compute_gae(rewards, old_values, action_mask, cfg.gamma, cfg.gae_lambda)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, action_mask, across_ranks=ddp)

        # ---- PPO epochs: minibatches, gradient accumulation over micro-batches, clipped losses
        stats = {k: [] for k in ("pg_loss", "vf_loss", "approx_kl", "clipfrac", "entropy", "grad_norm")}
        stop_early = False
        for epoch in range(cfg.ppo_epochs):
            permutation = torch.randperm(B, generator=shuffle_generator)
            for minibatch in permutation.split(cfg.minibatch_size):
                micro_batches = minibatch.split(cfg.micro_batch_size)
                for i, micro in enumerate(micro_batches):
                    sync = i == len(micro_batches) - 1
                    with (contextlib.nullcontext() if sync or not ddp else model.no_sync()), autocast(device, dtype):
                        if cfg.rollout == "choice":
                            lp, v = choice_forward(train_model, [encoded[j] for j in micro.tolist()],
                                                   cfg.choice_temperature, device)
                            new_logprobs, new_values = lp.gather(1, actions[micro.to(device), None]), v[:, None]
                            entropy = -(lp.exp() * lp).sum(1, keepdim=True)
                        else:
                            new_logprobs, new_values, entropy = sequence_forward(
                                train_model, prompt_idx[micro], prompt_mask[micro], responses[micro],
                                response_mask[micro], cfg.temperature)
                        micro = micro.to(device)
                        mask = action_mask[micro]
                        losses = ppo_losses(new_logprobs, old_logprobs[micro], advantages[micro], new_values,
                                            old_values[micro], returns[micro], mask, cfg.clip_coef, cfg.vf_clip_coef)
                        entropy = masked_mean(entropy, mask)
                        loss = losses["pg_loss"] + cfg.vf_coef * losses["vf_loss"] - cfg.ent_coef * entropy
                    scaler.scale(loss * len(micro) / len(minibatch)).backward()
                    for k in ("pg_loss", "vf_loss", "approx_kl", "clipfrac"):
                        stats[k].append(losses[k].item())
                    stats["entropy"].append(entropy.item())
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float("inf"))
                if torch.isfinite(grad_norm):  # identical on every rank: the gradients were all-reduced
                    scaler.step(optimizer)
                    bad_steps = 0
                elif scaler.is_enabled() and scaler.get_scale() > 1.0:
                    scaler.step(optimizer)  # a float16 overflow: the scaler skips this step and lowers its scale
                else:
                    bad_steps += 1
                    log(f"warning: step {step}: non-finite loss or gradient ({bad_steps} in a row); update skipped")
                    if bad_steps >= cfg.max_bad_steps:
                        raise RuntimeError(f"{bad_steps} non-finite updates in a row at step {step}; stopping "
                                           "(the last good checkpoint is kept)")
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                stats["grad_norm"].append(grad_norm.item())
                if cfg.target_kl > 0:  # every rank sees the same mean, so every rank stops at the same point
                    approx_kl = all_reduce_sum(torch.tensor(stats["approx_kl"][-len(micro_batches):]).mean())[0]
                    if approx_kl / ddp_world_size > cfg.target_kl:
                        stop_early = True
                        break
            if stop_early:
                break

        # ---- log / eval / checkpoint
        step += 1
        score_mean, kl_mean = (x / ddp_world_size for x in all_reduce_sum(scores.mean(), kl.sum(1).mean()))
        kl_controller.update(kl_mean.item(), cfg.batch_size * ddp_world_size)
        if device_type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        metrics = {"step": step, "reward": score_mean.item(), "kl": kl_mean.item(), "kl_coef": kl_controller.value,
                   "lr": lr, **{k: float(np.mean(v)) for k, v in stats.items() if v},
                   "explained_var": explained_variance(old_values, returns, action_mask),
                   "ppo_epochs_done": epoch + 1, "samples_per_s": B * ddp_world_size / dt,
                   "tokens_per_s": n_tokens * ddp_world_size / dt, "dt": dt, "peak_mem_gb": peak_memory_gb(device)}
        if cfg.rollout == "choice" and all(ex.get("label") is not None for ex in examples):
            labels = torch.tensor([ex["label"] for ex in examples], device=device)
            metrics["train/chosen_acc"] = (actions == labels).float().mean().item()  # this rank's batch
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            log(f"step {step} | reward {metrics['reward']:.4f} | kl {metrics['kl']:.4f} | "
                f"pg {metrics['pg_loss']:.4f} | vf {metrics['vf_loss']:.4f} | clipfrac {metrics['clipfrac']:.3f} | "
                f"approx_kl {metrics['approx_kl']:.4f} | ent {metrics['entropy']:.3f} | "
                f"ev {metrics['explained_var']:.3f} | {metrics['samples_per_s']:.1f} samples/s | "
                f"{metrics['tokens_per_s']:.0f} tok/s | dt {dt * 1000:.0f}ms | mem {metrics['peak_mem_gb']:.2f}GB")
        if master_process and cfg.sample_interval and step % cfg.sample_interval == 0:
            with open(os.path.join(cfg.out_dir, "samples.jsonl"), "a") as f:
                for sample, score in list(zip(sample_texts, scores.tolist()))[:4]:
                    f.write(json.dumps({"step": step, **sample, "reward": score}) + "\n")
        stop_now = all_reduce_sum(torch.tensor(float(stop_signal["received"] is not None)))[0].item() > 0
        if (cfg.eval_interval and step % cfg.eval_interval == 0) or step == cfg.max_steps:
            last_eval = run_eval(step)
            metrics.update(last_eval)
            log(f"step {step} | eval acc {last_eval['eval/acc']:.4f} | acc_norm {last_eval['eval/acc_norm']:.4f}")
        log_metrics(metrics)
        is_best = "eval/acc_norm" in metrics and metrics["eval/acc_norm"] > best_acc_norm
        if step % cfg.checkpoint_interval == 0 or step == cfg.max_steps or stop_now or is_best:
            if is_best:
                best_acc_norm = metrics["eval/acc_norm"]
            state = {"data_position": data_position, "best_acc_norm": best_acc_norm,
                     "kl_controller": kl_controller.state_dict(), "reference_from": reference_from,
                     "reward": reward_fn.state_dict() if hasattr(reward_fn, "state_dict") else None,
                     "rng": gather_rng_states(sample_generator, shuffle_generator, ddp_world_size)}
            if not all(torch.isfinite(p).all() for p in raw_model.parameters()):  # the same on every rank
                raise RuntimeError(f"non-finite weights at step {step}; no checkpoint written")
            if master_process:
                path = save_checkpoint(cfg.out_dir, step, raw_model, optimizer, scaler, state, cfg, cfg.keep_last,
                                       is_best)
                log(f"saved {path}")
            if ddp:
                dist.barrier()
        if stop_now:
            log(f"received signal {stop_signal['received']}: checkpoint written at step {step}, stopping")
            break

    if master_process and cfg.export_hf and step == cfg.max_steps:
        raw_model.save_pretrained(os.path.join(cfg.out_dir, "hf"))
        log(f"exported the policy to {os.path.join(cfg.out_dir, 'hf')}")
    if metrics_file:
        metrics_file.close()
    if wandb_run:
        wandb_run.finish()
    if ddp:
        dist.barrier()  # every rank done with every collective first: tearing gloo down mid-way can abort a rank
        dist.destroy_process_group()
    return {"step": step, "eval": last_eval, "metrics": metrics, "model": raw_model}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nusage: train_ppo.py [configs/X.py ...] [--key=value ...]; keys and defaults:")
        for f in dataclasses.fields(Config):
            print(f"  --{f.name}={f.default!r}")
        return None
    return train(load_config(argv))


if __name__ == "__main__":
    run_cli(main)
