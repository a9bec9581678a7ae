"""The RL settings users of other trainers ask for (train_ppo.py: loss_agg, value_warmup_steps,
value_lr_scale, adv_estimator "reinforce++", frac_zero_std_groups and drop_zero_std_groups), each
against a loop written from its definition; the defaults are what they were."""

import math
import os
import types

import pytest
import torch

import train_ppo
from common import UserError
from model import GPT
from run_management import value_head_groups
from test_estimators import generate_run
from test_train_ppo import read_metrics, tiny_policy, tiny_run


# --------------------------------------------------------------------------------------------------
# loss_agg


def plain_aggregate(losses, mask, loss_agg, horizon):
    """A minibatch's loss from its (B, L) per-action losses, from the definitions."""
    rows = [[x for x, m in zip(row, row_mask) if m] for row, row_mask in
            zip(losses.tolist(), mask.tolist())]
    rows = [r for r in rows if r]
    if loss_agg == "token-mean":
        return sum(map(sum, rows)) / sum(map(len, rows))
    if loss_agg == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in rows) / len(rows)
    return sum(sum(r) / horizon for r in rows) / len(rows)


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean",
                                      "seq-mean-token-sum-norm"])
def test_loss_weights_aggregate_as_defined(loss_agg):
    g = torch.Generator().manual_seed(0)
    losses = torch.randn(5, 6, generator=g)
    lengths = torch.tensor([6, 1, 3, 0, 2])  # a rollout without actions counts for nothing
    mask = (torch.arange(6) < lengths[:, None]).float()
    weights, counts = train_ppo.loss_weights(mask, loss_agg, horizon=6)
    got = ((weights * losses).sum() / counts.sum()).item()
    assert got == pytest.approx(plain_aggregate(losses, mask, loss_agg, 6), abs=1e-6)


def test_the_default_loss_agg_weighs_every_token_alike_as_before():
    mask = (torch.arange(4) < torch.tensor([[4], [1]])).float()
    weights, counts = train_ppo.loss_weights(mask, train_ppo.Config().loss_agg, 4)
    assert weights is mask and counts.tolist() == [4.0, 1.0]


# --------------------------------------------------------------------------------------------------
# REINFORCE++ and zero-std groups


def test_reinforce_pp_is_the_return_minus_the_batch_mean():
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(3, 4, generator=g)
    lengths = [4, 2, 3]
    mask = (torch.arange(4) < torch.tensor(lengths)[:, None]).float()
    rewards = rewards * mask
    gamma = 0.9
    advantages, returns = train_ppo.reinforce_pp_advantages(rewards, mask, gamma)
    plain = [[sum(gamma ** (k - t) * rewards[i, k].item() for k in range(t, n))
              for t in range(n)] for i, n in enumerate(lengths)]
    mean = sum(map(sum, plain)) / sum(lengths)
    for i, n in enumerate(lengths):
        assert returns[i, :n].tolist() == pytest.approx(plain[i], abs=1e-6)
        assert advantages[i, :n].tolist() == pytest.approx([r - mean for r in plain[i]], abs=1e-6)
        assert (advantages[i, n:] == 0).all() and (returns[i, n:] == 0).all()


def test_zero_std_groups_are_those_whose_samples_all_scored_alike():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 2.0, 2.0, -1.0, -1.0, -1.0, 0.5, 0.5, 0.5])
    flags = train_ppo.zero_std_groups(scores, 3)
    plain = []
    for start in range(0, 12, 3):
        group = scores[start:start + 3].tolist()
        plain += [max(group) == min(group)] * 3
    assert flags.tolist() == plain


@pytest.mark.parametrize("drop", [False, True])
def test_learning_mask_logs_the_zero_std_share_and_drops_those_groups_if_asked(drop):
    cfg = train_ppo.Config(rollout="generate", reward_kind="likelihood", adv_estimator="grpo",
                           group_size=2, batch_size=64, drop_zero_std_groups=drop)
    batch = types.SimpleNamespace(scores=torch.tensor([0.5, 0.5, 0.1, 0.7, 2.0, 2.0]),
                                  mask=torch.ones(6, 3))
    mask, metrics = train_ppo.learning_mask(batch, cfg, run=None)
    assert metrics == {"frac_zero_std_groups": pytest.approx(2 / 3)}
    kept = [0.0, 0.0, 1.0, 1.0, 0.0, 0.0] if drop else [1.0] * 6
    assert mask[:, 0].tolist() == kept and (mask == mask[:, :1]).all()


def test_estimators_without_groups_log_no_zero_std_share():
    batch = types.SimpleNamespace(scores=torch.zeros(4), mask=torch.ones(4, 1))
    mask, metrics = train_ppo.learning_mask(batch, train_ppo.Config(), run=None)
    assert mask is batch.mask and metrics == {}


# --------------------------------------------------------------------------------------------------
# the value head's learning rate, and old checkpoints' optimizer states


def test_value_lr_scale_steps_the_value_head_as_its_own_adamw():
    lr, scale = 1e-2, 5.0
    model = tiny_policy()
    optimizer = model.configure_optimizers(0.1, lr, (0.9, 0.95), "cpu")
    train_ppo.set_learning_rate(optimizer, lr, scale)
    # the plain loop: one AdamW per learning rate, over the same parameters
    plain = tiny_policy()
    named = dict(plain.named_parameters())
    groups = {(value, decay): [p for n, p in named.items() if n.startswith("value_head.") == value
                               and (p.dim() >= 2) == decay]
              for value in (False, True) for decay in (False, True)}
    references = [torch.optim.AdamW([{"params": groups[value, True], "weight_decay": 0.1},
                                     {"params": groups[value, False], "weight_decay": 0.0}],
                                    lr=lr * (scale if value else 1.0), betas=(0.9, 0.95),
                                    foreach=False)
                  for value in (False, True)]
    g = torch.Generator().manual_seed(0)
    for p, q in zip(model.parameters(), plain.parameters()):
        p.grad = torch.randn(p.shape, generator=g)
        q.grad = p.grad.clone()
    optimizer.step()
    for reference in references:
        reference.step()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


def test_an_optimizer_state_from_before_the_value_groups_loads_parameter_for_parameter():
    model = tiny_policy()
    old = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.dim() >= 2]},
                             {"params": [p for p in model.parameters() if p.dim() < 2],
                              "weight_decay": 0.0}], lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    old.step()
    optimizer = model.configure_optimizers(0.0, 1e-3, (0.9, 0.95), "cpu")
    optimizer.load_state_dict(value_head_groups(old.state_dict(), optimizer))
    assert [g["value_head"] for g in optimizer.param_groups] == [False, True, False, True]
    for p in model.parameters():
        assert torch.equal(optimizer.state[p]["exp_avg"], old.state[p]["exp_avg"])


# --------------------------------------------------------------------------------------------------
# the settings' checks, and runs


@pytest.mark.parametrize("settings, message", [
    (dict(drop_zero_std_groups=True), "drop_zero_std_groups is for adv_estimator rloo or grpo"),
    (dict(rollout="generate", reward_kind="likelihood", adv_estimator="grpo", group_size=4,
          value_warmup_steps=3), "value_warmup_steps is for adv_estimator gae"),
    (dict(adv_estimator="expected", value_lr_scale=2.0), "value_lr_scale is for adv_estimator gae"),
    (dict(adv_estimator="reinforce++"), "adv_estimator 'reinforce\\+\\+' is for generate rollouts"),
    (dict(loss_agg="seq-mean"), "loss_agg must be one of token-mean, seq-mean-token-mean"),
    # the policy would never train
    (dict(value_warmup_steps=40, max_steps=40),
     r"value_warmup_steps \(40\) must be below max_steps \(40\): the policy would never train"),
])
def test_a_setting_that_does_not_fit_is_refused(settings, message):
    with pytest.raises(UserError, match=message):
        train_ppo.load_config(["configs/demo.py", *[f"--{k}={v}" for k, v in settings.items()]])


def test_value_warmup_trains_the_value_head_alone_and_is_logged(tmp_path, synthetic_dir):
    train_ppo.train(tiny_run(tmp_path, synthetic_dir, reward_kind="label", max_steps=2,
                             value_warmup_steps=1, checkpoint_interval=1))
    start = GPT.from_pretrained(os.path.join(synthetic_dir, "policy")).state_dict()
    after = [torch.load(tmp_path / f"ckpt_00000{s}.pt", weights_only=True)["model"]
             for s in (1, 2)]
    policy = [k for k in start if not k.startswith("value_head.")]
    assert all(torch.equal(after[0][k], start[k]) for k in policy)  # untouched in warm-up
    assert not torch.equal(after[0]["value_head.weight"], start["value_head.weight"])
    assert not all(torch.equal(after[1][k], start[k]) for k in policy)  # trained after it
    metrics = [m for m in read_metrics(tmp_path) if m["step"] > 0]
    assert [m.get("value_warmup") for m in metrics] == [1, None]


@pytest.mark.parametrize("overrides", [
    dict(adv_estimator="reinforce++", loss_agg="seq-mean-token-sum-norm"),
    dict(adv_estimator="grpo", group_size=4, drop_zero_std_groups=True,
         loss_agg="seq-mean-token-mean"),
])
def test_the_new_settings_train_generate_rollouts(tmp_path, synthetic_dir, overrides):
    result = train_ppo.train(generate_run(tmp_path, synthetic_dir, **overrides))
    assert result["step"] == 2 and math.isfinite(result["metrics"]["pg_loss"])
    metrics = [m for m in read_metrics(tmp_path) if m["step"] > 0]
    grouped = "group_size" in overrides
    assert all(("frac_zero_std_groups" in m) == grouped for m in metrics)
    start = GPT.from_pretrained(os.path.join(synthetic_dir, "policy")).state_dict()
    saved = torch.load(tmp_path / "ckpt_000002.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[k], start[k]) for k in saved if k.startswith("value_head."))
