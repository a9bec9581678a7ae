import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

import run_management
import synthetic
import train_ppo
from common import UserError
from hellaswag import read_predictions
from config import describe, read_config_file, setting
from tokenizer import gpt2_tokens
from train_ppo import (AdaptiveKLController, compute_gae, load_config, masked_whiten, ppo_losses,
                       sampled_kl)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------------
# the math


def test_gae_matches_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    B, T, gamma, lam = 4, 7, 0.9, 0.8
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    lengths = [7, 3, 1, 5]
    mask = torch.zeros(B, T)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        expected, running = [0.0] * T, 0.0
        # the textbook recursion, one sequence at a time, terminal after n
        for t in reversed(range(n)):
            next_value = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            running = delta + gamma * lam * running
            expected[t] = running
        assert torch.allclose(advantages[b], torch.tensor(expected), atol=1e-5)
        assert torch.allclose(returns[b, :n], advantages[b, :n] + values[b, :n], atol=1e-6)
        assert (returns[b, n:] == 0).all()


def test_single_step_gae_is_reward_minus_value():
    rewards, values = torch.tensor([[1.0], [0.0]]), torch.tensor([[0.3], [0.5]])
    advantages, returns = compute_gae(rewards, values, torch.ones(2, 1), gamma=1.0, gae_lambda=0.95)
    assert torch.allclose(advantages, rewards - values) and torch.allclose(returns, rewards)


def test_masked_whiten_uses_only_masked_entries():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).float()
    w = masked_whiten(x, mask)
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = (values - values.mean()) / values.std()  # unbiased, as torch.std
    assert torch.allclose(w[mask.bool()], expected, atol=1e-5)
    assert (w[~mask.bool()] == 0).all()
    shifted = masked_whiten(x, mask, shift_mean=False)
    assert torch.allclose(shifted[mask.bool()], expected + values.mean(), atol=1e-5)


def test_ppo_losses_at_ratio_one():
    g = torch.Generator().manual_seed(1)
    logprobs = torch.randn(3, 5, generator=g)
    advantages = torch.randn(3, 5, generator=g)
    values, returns = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0
    out = ppo_losses(logprobs, logprobs, advantages, values, values, returns, mask, 0.2, 0.2)
    assert out["clipfrac"].item() == 0.0 and abs(out["approx_kl"].item()) < 1e-7
    assert torch.allclose(out["pg_loss"], -(advantages * mask).sum() / mask.sum())
    assert torch.allclose(out["vf_loss"],
                          0.5 * (((values - returns) ** 2) * mask).sum() / mask.sum())


def test_ppo_policy_clipping():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.9]])).requires_grad_(True)
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    zeros = torch.zeros(1, 4)
    out = ppo_losses(new, old, advantages, zeros, zeros, zeros, torch.ones(1, 4), clip_coef=0.2,
                     vf_clip_coef=0.0)
    # ratio 1.5 with A>0 and 0.5 with A<0 are clipped (no gradient); 1.1 and 0.9
    # are inside the trust region
    assert out["clipfrac"].item() == 0.5
    assert torch.allclose(out["pg_loss"], -torch.tensor([1.2, -0.8, 1.1, -0.9]).mean())
    out["pg_loss"].backward()
    assert (new.grad[0, 0] == 0 and new.grad[0, 1] == 0 and new.grad[0, 2] != 0
            and new.grad[0, 3] != 0)


def test_value_clipping_takes_the_pessimistic_loss():
    old_values, returns = torch.tensor([[0.0]]), torch.tensor([[1.0]])
    new_values = torch.tensor([[0.9]])  # moved 0.9 towards the return, but the clip allows 0.2
    out = ppo_losses(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), new_values,
                     old_values, returns, torch.ones(1, 1), 0.2, vf_clip_coef=0.2)
    assert torch.allclose(out["vf_loss"], torch.tensor(0.5 * 0.8 ** 2))


def test_kl_penalty_is_unbiased_in_expectation():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact = (p * (p.log() - q.log())).sum()
    # expectation under the policy, computed exactly over the 4 outcomes
    assert torch.allclose((p * sampled_kl(p.log(), q.log())).sum(), exact, atol=1e-6)


def test_adaptive_kl_controller_moves_towards_the_target():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    # too much KL: raise the penalty, at most 20% per horizon
    controller.update(current_kl=12.0, n_steps=100)
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    controller.update(current_kl=3.0, n_steps=100)
    assert controller.value < 0.1 * (1 + 0.2 * 0.1)
    restored = AdaptiveKLController(1.0, 6.0, 1000)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == controller.value
    # a skipped step's NaN (or infinite) KL says nothing: it must not stay in the coefficient
    value = controller.value
    for kl in (float("nan"), float("inf")):
        controller.update(current_kl=kl, n_steps=100)
        assert controller.value == value
    controller.update(current_kl=12.0, n_steps=100)
    assert controller.value == pytest.approx(value * (1 + 0.2 * 0.1))


def test_shaped_rewards_put_the_score_at_the_last_action_or_spread_it():
    kl = torch.tensor([[0.5, -0.2, 0.3], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    scores = torch.tensor([2.0, -1.0])
    sparse = train_ppo.shaped_rewards(scores, kl.clone(), 0.1, mask)
    assert torch.allclose(sparse, torch.tensor([[-0.05, 0.02, 1.97], [-1.1, 0.0, 0.0]]))
    shares = torch.tensor([[0.5, 1.0, 0.5], [-1.0, 7.0, 7.0]])  # padding's shares are ignored
    dense = train_ppo.shaped_rewards(scores, kl.clone(), 0.1, mask, shares)
    assert torch.allclose(dense, torch.tensor([[0.45, 1.02, 0.47], [-1.1, 0.0, 0.0]]))
    assert torch.allclose(dense.sum(1), sparse.sum(1))  # the same return from the first action


class FixedJudge:
    """A stand-in likelihood reward: sample i (in the order asked) scores 10 * (i + 1), split
    evenly; its raw score (before normalising) was -(i + 1)."""

    def __init__(self):
        self.asked = []

    def __call__(self, contexts, continuations, tokens=None):
        self.asked.append(continuations)
        self.last_raw = -torch.arange(1.0, len(continuations) + 1)
        return torch.tensor([10.0 * (i + 1) for i in range(len(continuations))])

    def dense(self, contexts, continuations, tokens):
        rewards = self(contexts, continuations, tokens)
        return rewards, [torch.full((len(c),), r.item() / len(c))
                         for c, r in zip(continuations, rewards)]


@pytest.mark.parametrize("dense", [False, True])
def test_generate_scores_and_their_shares_per_token(dense):
    eot, stop, a, b = 50256, 13, 100, 200  # <|endoftext|>, ".", two other tokens
    cfg = train_ppo.Config(rollout="generate", reward_kind="likelihood", likelihood_dense=dense,
                           no_stop_penalty=1.5)
    judge = FixedJudge()
    rollouts = train_ppo.GenerateRollouts(judge, cfg, prompt_budget=8, stop_tokens=[eot, stop],
                                          device="cpu", tokens=gpt2_tokens())
    responses = torch.tensor([[a, b, eot, 0], [a, stop, 0, 0], [eot, 0, 0, 0], [a, b, a, b]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    examples = [{"ctx": "x"}] * 4
    scores, shares, samples = rollouts.score(examples, [[1]] * 4, responses, mask)
    # the judge sees the samples without <|endoftext|>; the empty one is not
    # asked; the unstopped one pays
    assert judge.asked == [[[a, b], [a, stop], [a, b, a, b]]]
    assert torch.allclose(scores, torch.tensor([10.0, 20.0, -1.5, 30.0 - 1.5]))
    assert [s["stopped"] for s in samples] == [True, True, True, False]
    # the judge's raw score of each judged sample, and their mean as this rank's train/judge_score
    assert [s["judge_score"] for s in samples] == [-1.0, -2.0, None, -3.0]
    metrics = rollouts.metrics(types.SimpleNamespace(samples=samples, mask=mask.float()))
    assert metrics == {"train/response_length": 2.5, "train/stop_rate": 0.75,
                       "train/judge_score": -2.0}
    # every sample empty: no judge score to log
    unjudged = [{**s, "judge_score": None} for s in samples]
    assert "train/judge_score" not in rollouts.metrics(
        types.SimpleNamespace(samples=unjudged, mask=mask.float()))
    if not dense:
        assert shares is None
        return
    assert torch.allclose(shares, torch.tensor([[5.0, 5.0, 0.0, 0.0], [10.0, 10.0, 0.0, 0.0],
                                                [-1.5, 0.0, 0.0, 0.0], [7.5, 7.5, 7.5, 6.0]]))
    assert torch.allclose(shares.sum(1), scores) and (shares[mask == 0] == 0).all()


# --------------------------------------------------------------------------------------------------
# micro-batches of similar length


def test_micro_batches_group_rollouts_by_length_longest_first():
    lengths = torch.tensor([5, 9, 2, 9, 7, 1, 4])
    groups = train_ppo.micro_batches(torch.tensor([6, 0, 3, 2, 1, 4]), lengths, 4)
    assert [g.tolist() for g in groups] == [[3, 1, 4, 0], [6, 2]]  # ties keep the given order
    assert train_ppo.micro_batches(torch.tensor([], dtype=torch.long), lengths, 4) == []


def tiny_policy(seed=0):
    from model import GPT, GPTConfig

    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32))
    torch.nn.init.normal_(model.value_head.weight)
    return model


def padded_sequences(prompt_lengths, response_lengths, extra_columns=0, seed=0):
    """Random prompts (left-padded) and responses (right-padded), with extra_columns of padding on
    both sides beyond the longest row. -> prompts, prompt_mask, responses, response_mask."""
    g = torch.Generator().manual_seed(seed)
    P, N = max(prompt_lengths) + extra_columns, max(response_lengths) + extra_columns
    prompts = torch.full((len(prompt_lengths), P), 50256)
    prompt_mask = torch.zeros(len(prompt_lengths), P, dtype=torch.long)
    responses = torch.full((len(response_lengths), N), 50256)
    response_mask = torch.zeros(len(response_lengths), N, dtype=torch.long)
    for i, (p, n) in enumerate(zip(prompt_lengths, response_lengths)):
        prompts[i, P - p:] = torch.randint(0, 1000, (p,), generator=g)
        prompt_mask[i, P - p:] = 1
        responses[i, :n] = torch.randint(0, 1000, (n,), generator=g)
        response_mask[i, :n] = 1
    return prompts, prompt_mask, responses, response_mask


def test_sequence_forward_does_not_depend_on_padding_columns_or_other_rows():
    model = tiny_policy()
    prompt_lengths, response_lengths = [3, 6, 2], [4, 1, 3]
    padded = padded_sequences(prompt_lengths, response_lengths, extra_columns=3)
    outputs = train_ppo.sequence_forward(model, *padded, temperature=0.7)
    P, N = padded[0].size(1), padded[2].size(1)
    for i, (p, n) in enumerate(zip(prompt_lengths, response_lengths)):
        alone = (padded[0][i:i + 1, P - p:], padded[1][i:i + 1, P - p:], padded[2][i:i + 1, :n],
                 padded[3][i:i + 1, :n])
        for got, expected in zip(outputs,
                                 train_ppo.sequence_forward(model, *alone, temperature=0.7)):
            assert got.shape == (3, N)
            torch.testing.assert_close(got[i, :n], expected[0], atol=1e-5, rtol=1e-5)
            # padding columns, dropped before the forward, come back as zeros
            assert (got[i, n:] == 0).all()
    # and gradients reach the weights through the kept columns as through the tight batch
    tight = padded_sequences(prompt_lengths, response_lengths, extra_columns=0)
    grads = []
    for sequences in (padded, tight):
        model.zero_grad()
        logprobs, values, _ = train_ppo.sequence_forward(model, *sequences, temperature=0.7)
        (logprobs.sum() + values.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_sequence_forward_runs_each_row_packed_to_its_longest_row():
    """Prompts are left-padded and responses right-padded; the forward sees each row's prompt and
    response together from column 0, so it runs the longest prompt + response, not the longest
    prompt plus the longest response."""
    model = tiny_policy()
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append((args, kwargs)),
                                    with_kwargs=True)
    prompts, prompt_mask, responses, response_mask = padded_sequences([6, 2], [1, 4])
    train_ppo.sequence_forward(model, prompts, prompt_mask, responses, response_mask, 1.0)
    (idx,), kwargs = seen[0]
    assert idx.shape == (2, 7)  # max(6 + 1, 2 + 4), not 6 + 4
    assert kwargs.get("attention_mask") is None  # padding only at a row's end: plain causal
    assert torch.equal(idx[0], torch.cat([prompts[0], responses[0, :1]]))
    assert torch.equal(idx[1, :6], torch.cat([prompts[1, 4:], responses[1]]))


def test_entropy_carries_a_gradient_only_with_an_entropy_bonus():
    model = tiny_policy()
    prompts, prompt_mask, responses, response_mask = padded_sequences([3, 6, 2], [4, 1, 3])
    rollouts = types.SimpleNamespace(actions={"prompts": prompts, "prompt_mask": prompt_mask,
                                              "responses": responses},
                                     mask=response_mask.float())
    outputs = {}
    for ent_coef in (0.0, 0.01):
        cfg = train_ppo.Config(rollout="generate", reward_kind="likelihood", temperature=0.7,
                               ent_coef=ent_coef)
        kind = train_ppo.GenerateRollouts(None, cfg, prompt_budget=8, stop_tokens=[50256],
                                          device="cpu", tokens=gpt2_tokens())
        outputs[ent_coef] = kind.forward(model, rollouts, torch.arange(3))
        logprobs, values, entropy, choice_logprobs = outputs[ent_coef]
        assert (logprobs.requires_grad and values.requires_grad
                and entropy.requires_grad == (ent_coef > 0) and choice_logprobs is None)
    for without, with_bonus in zip(outputs[0.0][:3], outputs[0.01][:3]):
        assert torch.equal(without, with_bonus)
    # the bonus's gradient: the entropy of the tempered distribution at each response token
    entropy = outputs[0.01][2]
    assert (entropy[response_mask == 1] > 0).all()
    entropy.sum().backward()
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_rollouts_scored_in_micro_batches_of_similar_length_come_back_in_order(tmp_path):
    from hellaswag import encode_for_model, load_examples

    model = tiny_policy().eval()
    sequences = padded_sequences([3, 6, 2, 5, 4], [4, 1, 3, 2, 4])
    cfg = train_ppo.Config(rollout="generate", reward_kind="likelihood", temperature=0.7)
    kind = train_ppo.GenerateRollouts(None, cfg, prompt_budget=8, stop_tokens=[50256], device="cpu",
                                      tokens=gpt2_tokens())
    groups = train_ppo.micro_batches(torch.arange(5), sequences[1].sum(1) + sequences[3].sum(1), 2)
    assert [g.tolist() for g in groups] == [[4, 0], [1, 3], [2]]  # lengths 8, 7, 7, 7, 5
    with torch.no_grad():
        grouped = kind.scored_by(model, groups, *sequences)
        whole = train_ppo.sequence_forward(model, *sequences, temperature=0.7)[:2]
    for got, expected in zip(grouped, whole):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # and a choice batch: the policy's distribution over the endings and the
    # values, in the batch's order
    synthetic.write_jsonl(tmp_path / "val.jsonl", synthetic.make_examples(5, seed=3, split="val"))
    examples = load_examples(data_file=str(tmp_path / "val.jsonl"))
    encoded = [encode_for_model(ex, gpt2_tokens().encode, 32) for ex in examples]
    assert len(set(model.choice_lengths(encoded)[1].tolist())) > 1
    rollouts = []
    for micro_batch_size in (2, 5):
        kind = train_ppo.ChoiceRollouts(encoded, lambda indices, choices: torch.zeros(len(indices)),
                                        0.5, micro_batch_size, device="cpu", rows=model)
        rollouts.append(kind.collect(model, model, examples, [4, 0, 2, 1, 3],
                                     torch.Generator().manual_seed(0),
                                     run_management.PhaseTimer("cpu")))
    torch.testing.assert_close(rollouts[0].values, rollouts[1].values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rollouts[0].logprobs, rollouts[1].logprobs, atol=1e-5, rtol=1e-5)
    assert torch.equal(rollouts[0].actions["choices"], rollouts[1].actions["choices"])


def test_without_the_rollout_forward_the_sampling_loops_log_probs_and_values_are_kept():
    """rollout_forward=False: the same samples; their log-probs and values are the sampling
    loop's, the forward's but for rounding, and the policy runs no forward in the rollout."""
    examples = [{"ctx": text} for text in ("A man is sitting on a roof. He", "The cats", "So")]
    reference = tiny_policy(seed=1).eval()
    collected = {}
    for rollout_forward in (True, False):
        policy = tiny_policy().eval()
        forwards = []
        policy.register_forward_hook(lambda *unused: forwards.append(1))
        cfg = train_ppo.Config(rollout="generate", reward_kind="likelihood", temperature=0.7,
                               max_new_tokens=8, rollout_forward=rollout_forward)
        kind = train_ppo.GenerateRollouts(FixedJudge(), cfg, prompt_budget=8,
                                          stop_tokens=[13, 50256], device="cpu",
                                          tokens=gpt2_tokens())
        collected[rollout_forward] = kind.collect(policy, reference, examples, [0, 1, 2],
                                                  torch.Generator().manual_seed(0),
                                                  run_management.PhaseTimer("cpu"))
        assert len(forwards) == (1 if rollout_forward else 0)  # one micro-batch of 3, or none
    forward, sampled = collected[True], collected[False]
    assert torch.equal(forward.actions["responses"], sampled.actions["responses"])
    assert torch.equal(forward.ref_logprobs, sampled.ref_logprobs)
    assert forward.values.abs().min() > 0  # a random value head: a value read elsewhere differs
    torch.testing.assert_close(sampled.logprobs, forward.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(sampled.values, forward.values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean",
                                      "seq-mean-token-sum-norm"])
def test_ppo_update_does_not_depend_on_micro_batch_size(loss_agg):
    """A minibatch's losses are means over its actions (weighed as loss_agg says): with responses
    of different lengths, micro-batches of 1 (in any grouping) give the update of one
    micro-batch."""
    prompt_lengths, response_lengths = [3, 6, 2, 5, 4, 1], [4, 1, 3, 2, 4, 1]
    prompts, prompt_mask, responses, response_mask = padded_sequences(prompt_lengths,
                                                                      response_lengths)
    with torch.no_grad():
        logprobs, values, _ = train_ppo.sequence_forward(tiny_policy(), prompts, prompt_mask,
                                                         responses, response_mask, 1.0)
    g = torch.Generator().manual_seed(1)
    mask = response_mask.float()
    batch = train_ppo.Rollouts(
        examples=[{}] * 6,
        actions={"prompts": prompts, "prompt_mask": prompt_mask, "responses": responses},
        logprobs=(logprobs + 0.1 * torch.randn(logprobs.shape, generator=g)) * mask,
        ref_logprobs=logprobs,
        values=values, mask=mask, scores=torch.zeros(6), n_tokens=0, samples=[],
        lengths=prompt_mask.sum(1) + response_mask.sum(1))
    batch.advantages = torch.randn(mask.shape, generator=g) * mask
    batch.returns = torch.randn(mask.shape, generator=g) * mask
    batch.loss_weights, batch.loss_counts = train_ppo.loss_weights(mask, loss_agg, 4)
    run = run_management.Distributed(ddp=False, rank=0, local_rank=0, world_size=1, device="cpu")
    weights = []
    for micro_batch_size in (3, 1):
        cfg = train_ppo.Config(rollout="generate", reward_kind="likelihood", ppo_epochs=2,
                               minibatch_size=3, micro_batch_size=micro_batch_size, target_kl=0.0,
                               ent_coef=0.01, loss_agg=loss_agg)
        model = tiny_policy()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        kind = train_ppo.GenerateRollouts(None, cfg, prompt_budget=8, stop_tokens=[50256],
                                          device="cpu", tokens=gpt2_tokens())
        state = run_management.TrainingState(
            optimizer=optimizer, scaler=scaler,
            kl_controller=train_ppo.FixedKLController(0.05, 6.0, 1000),
            reward_fn=None, rollout_kind=kind,
            sample_generator=None, shuffle_generator=torch.Generator().manual_seed(0),
            batches=None, reference={})
        stats, epochs, finite = train_ppo.ppo_update(model, model, state, kind, batch, cfg, run)
        assert epochs == 2 and finite
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    moved = (weights[0]
             - torch.cat([p.detach().flatten() for p in tiny_policy().parameters()])).abs().max()
    assert moved > 1e-3  # the update did something
    torch.testing.assert_close(weights[1], weights[0], atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# config


def test_config_files_and_overrides(tmp_path):
    path = tmp_path / "recipe.py"
    path.write_text('"""a recipe"""\n# a comment\nbatch_size = 32\nlearning_rate = 1\n'
                    'rollout = "generate"\nreward_kind = "likelihood"\ncompile = True\n')
    cfg = load_config([str(path), "--batch_size=16", "--top_p=0.9", "--compile=false",
                       "--out_dir=runs/7"])
    assert (cfg.batch_size == 16 and cfg.learning_rate == 1.0
            and isinstance(cfg.learning_rate, float))
    assert (cfg.rollout == "generate" and cfg.compile is False and cfg.top_p == 0.9
            and cfg.out_dir == "runs/7")
    assert load_config(["--out_dir=123"]).out_dir == "123"
    assert load_config(["--out_dir=1e3"]).out_dir == "1e3"
    assert load_config(["--wandb_run_name=0x10"]).wandb_run_name == "0x10"


@pytest.mark.parametrize("args, message", [
    (["--learning_rat=1e-4"],
     r"unknown config key 'learning_rat' \(did you mean learning_rate\?\)"),
    (["--batch_size=1.5"], "batch_size must be int"),
    (["--compile=yes"], "compile must be bool"),
    (["--rollout=beam"], "rollout must be one of choice, generate"),
    (["--choice_norm=chars"], "choice_norm must be one of style, token"),
    (["--batch_size"], "written --key=value"),
    (["--rollout=generate"], "takes reward_kind likelihood"),
    (["--batch_size=10", "--minibatch_size=4"], "multiple of minibatch_size"),
    (["missing_config.py"], "missing_config.py: cannot read config file"),
    (["--rollout=generate", "--reward_kind=likelihood", "--temperature=0"],
     "temperature must be >= 0.01"),
    (["--choice_temperature=-1"], "choice_temperature must be >= 0.01 and <= 100"),
    (["--checkpoint_interval=0"], "checkpoint_interval must be >= 1"),
    (["--gae_lambda=1.5"], "gae_lambda must be >= 0 and <= 1"),
    (["--learning_rate=-1e-5"], "learning_rate must be >= 0 and <= 1"),
    (["--top_p=0"], "top_p must be > 0 and <= 1"),
    # values that would overflow the math later are refused here, next to the field
    (["--teacher_temperature=1e-300"], "teacher_temperature must be >= 0.01"),
    (["--learning_rate=1e30"], "learning_rate must be >= 0 and <= 1"),
    (["--seed=1000000000000000000000000000000"], "seed must be >= 0 and <= 2.14748e"),
    (["--n_head=0"], "n_head must be >= 1"),
    (["--ddp_timeout_s=1"], "ddp_timeout_s must be >= 10"),
    # past what torch's store takes
    (["--ddp_timeout_s=1e10"], r"ddp_timeout_s must be >= 10 and <= 1e\+07"),
    (["--start_over=yes"], "start_over must be bool"),
    (["--likelihood_dense=True"],
     "likelihood_dense is for reward_kind='likelihood', not 'teacher'"),
    (["--rollout_forward=False"], "rollout_forward=False is for generate rollouts"),
    (["--init_from=scratch", "--n_embd=65", "--n_head=2"],
     r"n_embd \(65\) must be a multiple of n_head \(2\)"),
    (["--kl_coef=1e999"], "kl_coef must be a finite number"),
    (["--kl_coef=1" + "0" * 400], "kl_coef must be a finite number"),  # no float holds it
    (["--beta2=1.0"], "beta2 must be >= 0 and < 1"),  # AdamW refuses it, after the models loaded
    (["--beta1=1"], "beta1 must be >= 0 and < 1"),
    (["--adaptive_kl=True", "--kl_coef=0"], "adaptive_kl scales kl_coef, which is 0"),
    (["--learning_rate=1e-5", "--min_lr=1e-3", "--lr_decay_steps=10"],
     r"min_lr \(0.001\) is above learning_rate \(1e-05\)"),
])
def test_config_errors_name_the_key(args, message):
    with pytest.raises(UserError, match=message):
        load_config(args)


def test_a_leading_tilde_in_a_path_is_the_home_folder(tmp_path, monkeypatch):
    """No shell expands it in --out_dir=~/x, nor in a config file: the run would write into a folder
    named ~ under the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "policy.pt").write_bytes(b"")
    cfg = run_management.absolute_paths(load_config(["--out_dir=~/runs/x",
                                                     "--init_from=~/policy.pt",
                                                     "--val_data=hellaswag:val"]))
    assert (cfg.out_dir, cfg.init_from) == (str(tmp_path / "runs" / "x"),
                                            str(tmp_path / "policy.pt"))
    assert cfg.val_data == "hellaswag:val"


def test_config_file_must_be_plain_assignments(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("batch_size = 8\nimport os\n")
    with pytest.raises(UserError, match="bad.py:2: config files hold only"):
        list(read_config_file(bad))
    bad.write_text("batch_size = 4 * 2\n")
    with pytest.raises(UserError, match="bad.py:1: the value of batch_size must be a literal"):
        list(read_config_file(bad))
    bad.write_text("batch_sise = 8\n")
    with pytest.raises(UserError, match=(r"bad.py:1: unknown config key 'batch_sise' "
                                         r"\(did you mean batch_size\?\)")):
        load_config([str(bad)])


def test_shipped_configs_load():
    configs = sorted(os.listdir(os.path.join(REPO, "configs")))
    assert "demo.py" in configs and "gpt2_hellaswag_teacher.py" in configs
    for name in configs:
        load_config([os.path.join(REPO, "configs", name)])


def test_cli_bad_config_is_one_line_and_exit_2():
    result = subprocess.run([sys.executable, "train_ppo.py", "configs/demo.py", "--ppo_epoch=2"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: --ppo_epoch=2: unknown config key 'ppo_epoch' "
                                     "(did you mean ppo_epochs?)")


# --------------------------------------------------------------------------------------------------
# training runs on the synthetic task (tiny models, CPU)


def tiny_run(out_dir, synthetic_dir, **overrides):
    settings = dict(out_dir=str(out_dir), init_from="synthetic", synthetic=True,
                    synthetic_dir=synthetic_dir, device="cpu", batch_size=16, minibatch_size=8,
                    micro_batch_size=4, ppo_epochs=2, learning_rate=3e-3, max_steps=2,
                    eval_interval=0, eval_limit=40, checkpoint_interval=100, sample_interval=1,
                    teacher_temperature=0.25, export_hf=False, seed=0)
    settings.update(overrides)
    return load_config([f"--{k}={v}" for k, v in settings.items()])


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_one_choice_step(tmp_path, synthetic_dir):
    summary = train_ppo.train(tiny_run(tmp_path, synthetic_dir, max_steps=1, export_hf=True))
    metrics = read_metrics(tmp_path)
    assert (metrics[0]["step"] == 0 and 0 <= metrics[0]["eval/acc_norm"] <= 1
            and metrics[0]["eval/n"] == 40)
    step = metrics[1]
    for key in ("reward", "kl", "pg_loss", "vf_loss", "clipfrac", "approx_kl", "entropy",
                "explained_var", "samples_per_s", "tokens_per_s", "dt", "peak_mem_gb", "eval/acc",
                "eval/acc_norm"):
        assert key in step, key
    assert (summary["step"] == 1
            and 0 < step["entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-6)
    assert os.path.exists(tmp_path / "ckpt_000001.pt") and os.path.exists(tmp_path / "best.pt")
    assert json.load(open(tmp_path / "train_config.json"))["batch_size"] == 16
    samples = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
    assert samples and {"ctx", "chosen", "reward"} <= set(samples[0])
    # the exported policy loads in transformers, and the checkpoint loads back into a
    # GPT with the same weights
    from transformers import AutoModelForCausalLM

    from model import GPT
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf") is not None
    reloaded = GPT.from_pretrained(str(tmp_path))
    for (name, a), b in zip(summary["model"].state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.slow
@pytest.mark.parametrize("rollout_forward", [True, False])
def test_one_generate_step(tmp_path, synthetic_dir, rollout_forward):
    train_ppo.train(tiny_run(tmp_path, synthetic_dir, max_steps=1, rollout="generate",
                             reward_kind="likelihood", max_new_tokens=6,
                             rollout_forward=rollout_forward))
    step = read_metrics(tmp_path)[1]
    # policy == reference at step 0 (without the rollout's forward, the sampling loop's log-probs
    # against the reference's forward)
    assert step["step"] == 1 and step["entropy"] > 0 and abs(step["kl"]) < 1e-4
    phases = [step[f"time/{p}"] for p in ("rollout", "reference", "reward", "update")]
    assert all(s > 0 for s in phases) and sum(phases) <= step["dt"]
    samples = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
    assert samples and "continuation" in samples[0]


def test_the_sampling_loops_log_probs_are_refused_under_bf16_before_any_work(tmp_path,
                                                                           synthetic_dir):
    cfg = tiny_run(tmp_path, synthetic_dir, rollout="generate", reward_kind="likelihood",
                   rollout_forward=False, dtype="bfloat16")
    with pytest.raises(UserError, match="rollout_forward=False .* under bfloat16 autocast"):
        train_ppo.train(cfg)
    assert not os.path.exists(tmp_path / "metrics.jsonl")


@pytest.mark.slow
def test_choice_rollouts_learn_the_synthetic_task(tmp_path, synthetic_dir):
    cfg = tiny_run(tmp_path, synthetic_dir, batch_size=32, minibatch_size=16, micro_batch_size=16,
                   ppo_epochs=4, learning_rate=2e-3, max_steps=20, eval_interval=20, eval_limit=100,
                   kl_coef=0.01, vf_coef=0.5)
    summary = train_ppo.train(cfg)
    metrics = read_metrics(tmp_path)
    start = metrics[0]["eval/acc_norm"]
    assert start < 0.45  # chance is 0.25
    # seen on seeds 0, 1, 2 (2-core Xeon, sparse embedding gradient): accuracy +0.60, +0.48, +0.40
    # and reward +0.40, +0.29, +0.25 over 20 steps; every seed clears both bounds over 3x
    assert summary["eval"]["eval/acc_norm"] > start + 0.12
    early = sum(m["reward"] for m in metrics[1:5]) / 4
    late = sum(m["reward"] for m in metrics[-4:]) / 4
    assert late > early + 0.05


@pytest.mark.slow
def test_generate_rollouts_raise_the_reward(tmp_path, synthetic_dir):
    cfg = tiny_run(tmp_path, synthetic_dir, rollout="generate", reward_kind="likelihood",
                   reward_normalize=False, batch_size=32, minibatch_size=8, micro_batch_size=8,
                   ppo_epochs=4, max_new_tokens=4, learning_rate=1e-3, target_kl=0.05, kl_coef=0.01,
                   max_steps=16, eval_limit=8)
    train_ppo.train(cfg)
    rewards = [m["reward"] for m in read_metrics(tmp_path)[1:]]
    # the teacher's mean log-prob of the samples rises as the policy learns to write what the
    # teacher expects. Seen on seeds 0, 1, 2 (2-core Xeon): +0.61, +0.80, +0.61, against
    # step-to-step noise of about 0.1 in a 4-step mean; at learning_rate 2e-3 without target_kl,
    # updates were 5-40x the recommended approx_kl and one seed in three rose only +0.29
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.3


@pytest.mark.slow
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, synthetic_dir):
    common = dict(reward_kind="label", eval_limit=8, eval_interval=2, checkpoint_interval=2)
    straight = train_ppo.train(tiny_run(tmp_path / "straight", synthetic_dir, max_steps=4,
                                        **common))["model"]
    train_ppo.train(tiny_run(tmp_path / "split", synthetic_dir, max_steps=2, **common))
    resumed = train_ppo.train(tiny_run(tmp_path / "split", synthetic_dir, max_steps=4,
                                       init_from="resume", **common))["model"]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert [m["step"] for m in read_metrics(tmp_path / "split")] == [0, 1, 2, 3, 4]
    assert sorted(f for f in os.listdir(tmp_path / "split") if f.startswith("ckpt_")) == \
        ["ckpt_000002.pt", "ckpt_000004.pt"]
    # every evaluation keeps its per-example predictions, the same for both runs
    evals = sorted(os.listdir(tmp_path / "split" / "eval"))
    assert evals == ["step_000000.jsonl", "step_000002.jsonl", "step_000004.jsonl"]
    assert sorted(os.listdir(tmp_path / "straight" / "eval")) == evals
    for name in evals:
        split_preds = read_predictions(str(tmp_path / "split" / "eval" / name))
        assert split_preds == read_predictions(str(tmp_path / "straight" / "eval" / name))
        assert len(split_preds) == 8 and [p["index"] for p in split_preds] == list(range(8))
    step4 = read_predictions(str(tmp_path / "split" / "eval" / "step_000004.jsonl"))
    assert (sum(p["pred_norm"] == p["label"] for p in step4) / 8
            == read_metrics(tmp_path / "split")[-1]["eval/acc_norm"])
    # as if the run had crashed after logging step 4 (and a step 5) without its checkpoint:
    # resuming from step 2 redoes steps 3 and 4, and the log holds each step once
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "reward": 0.0}) + "\n")
    os.remove(tmp_path / "split" / "ckpt_000004.pt")
    (tmp_path / "split" / "eval" / "step_000006.jsonl").write_text("from the crashed run\n")
    train_ppo.train(tiny_run(tmp_path / "split", synthetic_dir, max_steps=4, init_from="resume",
                             **common))
    assert [m["step"] for m in read_metrics(tmp_path / "split")] == [0, 1, 2, 3, 4]
    # the redone evaluations replace the old ones
    assert sorted(os.listdir(tmp_path / "split" / "eval")) == evals


def test_resume_from_an_unfused_optimizer_state_keeps_the_fused_adamw(tmp_path, synthetic_dir,
                                                                      monkeypatch):
    """A checkpoint saved before the CPU's fused AdamW stores fused=None in its param groups;
    loading it must not switch this run back to the per-tensor loop."""
    common = dict(reward_kind="label", eval_limit=8, eval_interval=0, checkpoint_interval=1)
    train_ppo.train(tiny_run(tmp_path, synthetic_dir, max_steps=1, **common))
    path = tmp_path / "ckpt_000001.pt"
    ckpt = torch.load(path, weights_only=False)
    assert all(group["fused"] for group in ckpt["optimizer"]["param_groups"])
    for group in ckpt["optimizer"]["param_groups"]:
        group["fused"] = None
    torch.save(ckpt, path)
    seen = []
    restore = run_management.TrainingState.load_state_dict

    def recording_restore(state, *args, **kwargs):
        result = restore(state, *args, **kwargs)
        seen.extend(group["fused"] for group in state.optimizer.param_groups)
        return result

    monkeypatch.setattr(run_management.TrainingState, "load_state_dict", recording_restore)
    train_ppo.train(tiny_run(tmp_path, synthetic_dir, max_steps=2, init_from="resume", **common))
    assert seen and all(seen)  # every group: the policy's and the value head's


def test_choice_rollouts_cut_contexts_to_the_policy_window(tmp_path, synthetic_dir):
    # the synthetic contexts and endings reach 17 tokens: a 12-token window must cut the
    # contexts, as evaluation does
    result = train_ppo.train(tiny_run(tmp_path, synthetic_dir, init_from="scratch", block_size=12,
                                      reward_kind="label", max_steps=1))
    assert result["step"] == 1 and math.isfinite(result["metrics"]["pg_loss"])


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, synthetic_dir):
    with pytest.raises(UserError, match="no checkpoint"):
        train_ppo.train(tiny_run(tmp_path, synthetic_dir, init_from="resume", reward_kind="label"))


def test_a_device_the_machine_lacks_is_a_clear_error(tmp_path, synthetic_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="device 'cuda': CUDA is not available"):
        train_ppo.train(tiny_run(tmp_path, synthetic_dir, device="cuda"))
    assert not os.path.exists(tmp_path / "metrics.jsonl")


@pytest.mark.slow
def test_non_finite_losses_skip_updates_then_stop(tmp_path, synthetic_dir, monkeypatch):
    real = train_ppo.ppo_losses

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        return {**out, "pg_loss": out["pg_loss"] * float("nan")}

    monkeypatch.setattr(train_ppo, "ppo_losses", poisoned)
    cfg = tiny_run(tmp_path, synthetic_dir, reward_kind="label", max_bad_steps=3,
                   checkpoint_interval=1, eval_limit=8, max_steps=5)
    with pytest.raises(UserError,
                       match="3 steps in a row with non-finite losses or gradients at step 3"):
        train_ppo.train(cfg)
    # the bad steps were skipped whole: the checkpoints hold the starting weights
    # and an untouched optimizer
    from model import GPT
    start = GPT.from_pretrained(os.path.join(synthetic_dir, "policy")).state_dict()
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("ckpt_")) == [
        "ckpt_000001.pt", "ckpt_000002.pt"]
    ckpt = torch.load(tmp_path / "ckpt_000002.pt", weights_only=True)
    assert ckpt["optimizer"]["state"] == {}
    for name, value in ckpt["model"].items():
        assert torch.equal(value, start[name]), name


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_with_128_plus_the_signal(tmp_path, synthetic_dir):
    cfg = tiny_run(tmp_path, synthetic_dir, reward_kind="label", max_steps=10000, eval_limit=8)
    args = [f"--{k}={v}" for k, v in vars(cfg).items()]
    proc = subprocess.Popen([sys.executable, "train_ppo.py", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(tmp_path / "metrics.jsonl") and len(read_metrics(tmp_path)) >= 3:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output  # a stop is not a finished run
    last_step = read_metrics(tmp_path)[-1]["step"]
    assert os.path.exists(tmp_path / f"ckpt_{last_step:06d}.pt") and "received signal" in output
    ckpt = torch.load(tmp_path / f"ckpt_{last_step:06d}.pt", weights_only=True)
    assert ckpt["step"] == last_step and ckpt["data_position"] == last_step * cfg.batch_size


@pytest.mark.slow
def test_torchrun_two_processes_agree(tmp_path, synthetic_dir):
    """2 gloo processes: both ranks end with identical weights and identical eval totals."""
    script = tmp_path / "run.py"
    script.write_text(
        "import json, os, sys, torch\n"
        f"sys.path.insert(0, {REPO!r})\n"
        "import train_ppo\n"
        "summary = train_ppo.train(train_ppo.load_config(sys.argv[1:]))\n"
        "rank = int(os.environ['RANK'])\n"
        "torch.save(summary['model'].state_dict(), "
        "os.path.join(sys.argv[-1].split('=')[1], f'rank{rank}.pt'))\n"
        "json.dump(summary['eval'], "
        "open(os.path.join(sys.argv[-1].split('=')[1], f'eval{rank}.json'), 'w'))\n")
    cfg = tiny_run(tmp_path, synthetic_dir, reward_kind="teacher", max_steps=2, eval_limit=21,
                   batch_size=8, minibatch_size=4, micro_batch_size=2)
    args = ([f"--{k}={v}" for k, v in vars(cfg).items() if k != "out_dir"]
            + [f"--out_dir={tmp_path}"])
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", str(script), *args],
                            cwd=REPO, capture_output=True, text=True, timeout=400,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    eval0, eval1 = (json.load(open(tmp_path / "eval0.json")),
                    json.load(open(tmp_path / "eval1.json")))
    assert eval0 == eval1 and eval0["eval/n"] == 21
    # the sharded eval counts every example once: the same totals as one process scoring the same
    # weights
    from hellaswag import evaluate, load_examples
    from model import GPT

    model = GPT.from_pretrained(os.path.join(synthetic_dir, "policy"))
    model.load_state_dict(rank0)
    single = evaluate(model, load_examples(data_file=os.path.join(synthetic_dir, "val.jsonl"))[:21])
    assert single["acc_norm"] == pytest.approx(eval0["eval/acc_norm"])
    assert read_metrics(tmp_path)[-1]["step"] == 2


@pytest.mark.parametrize("style", ["completion", "lm-eval"])
def test_choice_policy_scores_endings_like_the_evaluator(tmp_path, style):
    from hellaswag import evaluate, load_examples
    from model import GPT, GPTConfig

    synthetic.write_jsonl(tmp_path / "val.jsonl", synthetic.make_examples(12, seed=3, split="val"))
    examples = load_examples(data_file=str(tmp_path / "val.jsonl"))
    torch.manual_seed(0)
    # most contexts are cut to fit
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=12)).eval()
    torch.nn.init.normal_(model.value_head.weight)
    encoded = model.encode_choices(examples, style)
    assert max(len(c) + max(map(len, es)) for c, es in encoded) == 12
    # the evaluator's acc_norm scores: per token in the completion style, per character in lm-eval's
    tokens = model.choice_lengths(encoded)[0]
    normalisers = train_ppo.choice_normalisers(examples, train_ppo.Config(style=style))
    assert (normalisers is None) == (style == "completion")
    normalisers = tokens if normalisers is None else normalisers
    with torch.no_grad():
        policy_logprobs, values = train_ppo.choice_forward(
            model, encoded, normalisers, choice_temperature=0.5, device="cpu", rows=model)
        result = evaluate(model, examples, style=style, return_predictions=True)
    norm_scores = torch.tensor([p["norm_scores"] for p in result["predictions"]])
    assert torch.allclose(policy_logprobs, torch.log_softmax(norm_scores / 0.5, -1), atol=1e-4)
    assert torch.equal(normalisers, tokens) == (style == "completion")
    context, _ = encoded[5]
    with torch.no_grad():
        alone = model(torch.tensor([context]))[1][0, -1]  # the value at the context's last token
    assert values[5].item() == pytest.approx(alone.item(), abs=1e-5)


def test_choice_rollouts_compute_the_reference_once_per_example(tmp_path, monkeypatch):
    from hellaswag import encode_for_model, load_examples
    from model import GPT, GPTConfig

    synthetic.write_jsonl(tmp_path / "val.jsonl", synthetic.make_examples(6, seed=3, split="val"))
    examples = load_examples(data_file=str(tmp_path / "val.jsonl"))
    encoded = [encode_for_model(ex, gpt2_tokens().encode, 64) for ex in examples]
    torch.manual_seed(0)
    reference = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64)).eval()
    tokens = reference.choice_lengths(encoded)[0]
    rollouts = train_ppo.ChoiceRollouts(encoded, None, 0.5, micro_batch_size=2, device="cpu",
                                        rows=reference)
    scored = []
    real = train_ppo.choice_forward
    monkeypatch.setattr(train_ppo, "choice_forward",
                        lambda model, enc, *a: scored.extend(enc) or real(model, enc, *a))
    with torch.no_grad():
        first = rollouts.reference(reference, [4, 1, 4])
        again = rollouts.reference(reference, [1, 2])
        expected = real(reference, encoded, tokens, 0.5, "cpu", reference)[0]
    # each example once, however often it is met (in micro-batches grouped by length: any order)
    assert sorted(scored) == sorted([encoded[1], encoded[4], encoded[2]])
    torch.testing.assert_close(first, expected[[4, 1, 4]])
    torch.testing.assert_close(again, expected[[1, 2]])
    restored = train_ppo.ChoiceRollouts(encoded, None, 0.5, micro_batch_size=2, device="cpu",
                                        rows=reference)
    # the checkpoint keeps them: a resumed run does not recompute
    restored.load_state_dict(rollouts.state_dict())
    torch.testing.assert_close(restored.reference(reference, [1, 2, 4]), expected[[1, 2, 4]])
    assert len(scored) == 3


def test_help_prints_each_setting_with_its_comment_and_limits(capsys):
    train_ppo.main(["--help"])
    out = capsys.readouterr().out
    assert "\nKL to the frozen reference:\n" in out  # the Config's sections head their settings
    assert ("  --kl_estimator='sampled'  (one of sampled, k3, exact)\n"
            "      how the KL is estimated, and where it enters") in out
    assert "  --seed=1337  (>= 0 and <= 2147483647)\n      numpy takes seeds below 2**32\n" in out
    assert "  --clip_coef=0.2  (> 0 and <= 10)\n      policy ratio clipping\n" in out
    for f in dataclasses.fields(train_ppo.Config):
        assert f"  --{f.name}={f.default!r}" in out


def test_every_setting_says_what_it_does():
    """--help gives each setting a comment (from the Config's source), not only its limits."""
    lines = describe(train_ppo.Config).splitlines()
    bare = [line.split("=")[0].strip() for line, after in zip(lines, lines[1:] + [""])
            if line.startswith("  --") and not after.startswith("      ")]
    assert bare == []


def test_what_a_run_does_with_a_setting_is_its_own_metadata(tmp_path, monkeypatch):
    """absolute_paths and log_changed_settings read a setting's path= and run= (config.setting),
    so a new setting says both where it is declared."""
    @dataclasses.dataclass
    class Settings:
        scratch_dir: str = setting("", path="folder")  # a folder
        model: str = setting("m", path="source")  # a source
        patience: int = setting(3, run=True)  # a run setting
        lr: float = setting(1.0)  # the training's
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = run_management.absolute_paths(Settings(scratch_dir="x"))
    assert (cfg.scratch_dir, cfg.model) == (str(tmp_path / "x"), str(tmp_path / "m"))
    said = []
    run = types.SimpleNamespace(log=lambda text: said.append(("log", text)),
                                warn=lambda text: said.append(("warn", text)))
    run_management.log_changed_settings({"patience": 1, "lr": 2.0}, cfg, run)
    assert said == [("log", "resuming with patience 1 -> 3"),
                    ("warn", "resuming with settings that differ from the checkpoint's, so "
                     "another experiment from here on: lr 2.0 -> 1.0")]


def test_the_console_line_prints_the_fields_of_its_tuple(capsys):
    log = run_management.RunLog.__new__(run_management.RunLog)
    log.log = print
    metrics = {"step": 20, "reward": 0.57764, "kl": 0.78841, "pg_loss": 0.023, "vf_loss": 0.114,
               "clipfrac": 0.1131, "approx_kl": 0.09241, "entropy": 0.7031, "explained_var": 0.0761,
               "samples_per_s": 71.12, "tokens_per_s": 3607.2, "dt": 0.9, "peak_mem_gb": 0.9}
    log.step_line(metrics, train_ppo.CONSOLE_LINE)
    assert capsys.readouterr().out == (
        "step 20 | reward 0.5776 | kl 0.7884 | pg 0.0230 | vf 0.1140 | clipfrac 0.113 | "
        "approx_kl 0.0924 | ent 0.703 | ev 0.076 | 71.1 samples/s | 3607 tok/s | dt 900ms | "
        "mem 0.90GB\n")
    del metrics["pg_loss"]  # a skipped step has no losses
    log.step_line(metrics, train_ppo.CONSOLE_LINE)
    assert "| pg nan |" in capsys.readouterr().out
