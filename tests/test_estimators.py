"""The advantage and KL estimators against loops written from their definitions, and the runs that
use them (train_ppo.py: adv_estimator, kl_estimator, group_size)."""

import dataclasses
import inspect
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import train_ppo
from common import UserError
from test_train_faults import RUN_SCRIPT, launcher_args
from test_train_ppo import REPO, read_metrics, tiny_run


def test_rloo_and_grpo_advantages_follow_their_definitions():
    g = torch.Generator().manual_seed(0)
    group_size, n_groups = 4, 3
    rewards = torch.randn(group_size * n_groups, generator=g)
    rloo = train_ppo.rloo_advantages(rewards, group_size)
    grpo = train_ppo.grpo_advantages(rewards, group_size)
    for start in range(0, len(rewards), group_size):
        group = rewards[start:start + group_size].tolist()
        mean = sum(group) / group_size
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (group_size - 1))
        for j, r in enumerate(group):
            others = [group[k] for k in range(group_size) if k != j]
            assert rloo[start + j].item() == pytest.approx(r - sum(others) / len(others), abs=1e-6)
            assert grpo[start + j].item() == pytest.approx((r - mean) / (std + 1e-4), abs=1e-5)


def test_the_expected_baseline_averages_to_zero_under_the_policy():
    g = torch.Generator().manual_seed(1)
    logprobs = torch.log_softmax(torch.randn(5, 4, generator=g), -1)
    rewards = torch.rand(5, 4, generator=g)
    advantages = train_ppo.expected_advantages(rewards, logprobs)
    for lp, r, a in zip(logprobs.tolist(), rewards.tolist(), advantages.tolist()):
        expected = sum(math.exp(lp[i]) * r[i] for i in range(4))
        assert a == pytest.approx([r[i] - expected for i in range(4)], abs=1e-6)
    assert torch.allclose((logprobs.exp() * advantages).sum(1), torch.zeros(5), atol=1e-6)


def test_the_exact_kl_is_the_sum_over_the_endings_and_k3_is_never_negative():
    g = torch.Generator().manual_seed(2)
    policy = torch.log_softmax(torch.randn(6, 4, generator=g) * 3, -1)
    reference = torch.log_softmax(torch.randn(6, 4, generator=g) * 3, -1)
    exact = train_ppo.exact_kl(policy, reference)
    for p, q, kl in zip(policy.tolist(), reference.tolist(), exact.tolist()):
        assert kl == pytest.approx(sum(math.exp(p[i]) * (p[i] - q[i]) for i in range(4)),
                                   abs=1e-6)
    assert (exact >= 0).all()
    k3 = train_ppo.k3_kl(policy, reference)  # every (policy, reference) pair, as sampled actions
    assert (k3 >= 0).all()
    # its expectation under the policy is the exact KL
    assert torch.allclose((policy.exp() * k3).sum(1), exact, atol=1e-5)


@pytest.mark.parametrize("settings, message", [
    (dict(adv_estimator="expected", rollout="generate", reward_kind="likelihood"),
     "adv_estimator 'expected' is for choice rollouts"),
    (dict(adv_estimator="rloo", group_size=4), "adv_estimator 'rloo' is for generate rollouts"),
    (dict(kl_estimator="exact", rollout="generate", reward_kind="likelihood"),
     "kl_estimator 'exact' is for choice rollouts, not 'generate'; use one of sampled, k3"),
    (dict(adv_estimator="grpo", rollout="generate", reward_kind="likelihood"),
     r"group_size \(1\) is for adv_estimator rloo or grpo"),
    (dict(group_size=4), r"group_size \(4\) is for adv_estimator rloo or grpo"),
    (dict(adv_estimator="rloo", rollout="generate", reward_kind="likelihood", group_size=3,
          batch_size=16), r"dividing batch_size \(16\)"),
])
def test_an_estimator_that_does_not_fit_is_refused_in_one_line(settings, message):
    args = [f"--{k}={v}" for k, v in settings.items()]
    with pytest.raises(UserError, match=message):
        train_ppo.load_config(["configs/demo.py", *args])
    proc = subprocess.run([sys.executable, "train_ppo.py", "configs/demo.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1


def generate_run(out_dir, synthetic_dir, **overrides):
    settings = dict(rollout="generate", reward_kind="likelihood", max_new_tokens=4,
                    batch_size=8, minibatch_size=4, micro_batch_size=4, max_steps=2,
                    eval_limit=8, checkpoint_interval=1)
    return tiny_run(out_dir, synthetic_dir, **{**settings, **overrides})


@pytest.mark.parametrize("estimator", ["rloo", "grpo"])
def test_group_estimators_train_on_groups_of_one_prompt(tmp_path, synthetic_dir, estimator,
                                                        monkeypatch):
    batches = []
    real = train_ppo.GenerateRollouts.collect

    def recording(self, policy, reference, examples, indices, *args):
        batches.append(list(indices))
        return real(self, policy, reference, examples, indices, *args)

    monkeypatch.setattr(train_ppo.GenerateRollouts, "collect", recording)
    result = train_ppo.train(generate_run(tmp_path, synthetic_dir, adv_estimator=estimator,
                                          group_size=4, kl_estimator="k3"))
    assert result["step"] == 2 and math.isfinite(result["metrics"]["pg_loss"])
    for indices in batches:  # 2 prompts a step, each 4 times in a row
        assert len(indices) == 8 and len(set(indices)) == 2
        assert indices[:4] == [indices[0]] * 4 and indices[4:] == [indices[4]] * 4
    assert all(m["kl"] >= 0 for m in read_metrics(tmp_path) if "kl" in m)  # k3
    # the value head had no loss: the checkpoint holds it as it started
    from model import GPT
    start = GPT.from_pretrained(os.path.join(synthetic_dir, "policy")).state_dict()
    saved = torch.load(tmp_path / "ckpt_000002.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[k], start[k]) for k in saved if k.startswith("value_head."))
    assert not all(torch.equal(saved[k], start[k]) for k in saved)


@pytest.mark.parametrize("kl_estimator", ["sampled", "exact"])
def test_the_expected_baseline_trains_choice_rollouts(tmp_path, synthetic_dir, kl_estimator):
    result = train_ppo.train(tiny_run(tmp_path, synthetic_dir, reward_kind="label", max_steps=2,
                                      adv_estimator="expected", kl_estimator=kl_estimator,
                                      checkpoint_interval=1))
    metrics = read_metrics(tmp_path)
    assert result["step"] == 2 and math.isfinite(result["metrics"]["pg_loss"])
    if kl_estimator == "exact":
        assert all(m["kl"] >= 0 for m in metrics if "kl" in m)
    from model import GPT
    start = GPT.from_pretrained(os.path.join(synthetic_dir, "policy")).state_dict()
    saved = torch.load(tmp_path / "ckpt_000002.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[k], start[k]) for k in saved if k.startswith("value_head."))


@pytest.mark.parametrize("before, after", [("gae", "expected"), ("expected", "gae")])
def test_a_resume_that_freezes_or_unfreezes_the_value_head_is_refused_before_any_work(
        tmp_path, synthetic_dir, monkeypatch, before, after):
    """The optimizer holds the trained parameters only: its saved state cannot load into one with
    the value head added or taken out. What the message offers instead works."""
    def run(out_dir, **overrides):
        settings = dict(reward_kind="label", max_steps=1, checkpoint_interval=1)
        return tiny_run(out_dir, synthetic_dir, **{**settings, **overrides})

    train_ppo.train(run(tmp_path / "run", adv_estimator=before))
    checkpoint = tmp_path / "run" / "ckpt_000001.pt"
    loads = []
    monkeypatch.setattr(train_ppo, "load_data", lambda *a: loads.append(1))
    with pytest.raises(UserError, match=(
            rf"^init_from=resume: {checkpoint} was trained with adv_estimator '{before}', which "
            rf".*, and this run asks for '{after}', which .*; resume with "
            rf"--adv_estimator={before}, or start a new run from its weights with "
            rf"--init_from={checkpoint} and another out_dir$")):
        train_ppo.train(run(tmp_path / "run", adv_estimator=after, init_from="resume",
                            max_steps=2))
    assert not loads
    monkeypatch.undo()
    result = train_ppo.train(run(tmp_path / "new", adv_estimator=after,
                                 init_from=str(checkpoint)))
    assert result["step"] == 1


def test_the_defaults_are_gae_and_the_sampled_kl():
    cfg = train_ppo.Config()
    assert (cfg.adv_estimator, cfg.kl_estimator, cfg.group_size) == ("gae", "sampled", 1)


@pytest.mark.slow
def test_rloo_under_two_processes_keeps_groups_and_weights_in_step(tmp_path, synthetic_dir):
    """torchrun, 2 processes (gloo): each rank samples its own prompts' groups, the whitening of
    the advantages is reduced across ranks, and both ranks end with the same weights."""
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)
    cfg = generate_run(tmp_path, synthetic_dir, adv_estimator="rloo", group_size=4)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script),
                           *launcher_args(cfg, tmp_path / "run")],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "WEIGHTS_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [0, 1, 2]


def test_analyze_labels_runs_by_their_estimators():
    import analyze
    runs = [{"config": {"adv_estimator": adv, "kl_estimator": kl, "seed": 1}, "label": f"r{i}",
             "dir": f"r{i}"} for i, (adv, kl) in enumerate([("gae", "sampled"),
                                                             ("expected", "exact")])]
    assert analyze.label_runs(runs) == ["adv_estimator", "kl_estimator"]
    assert [r["label"] for r in runs] == ["adv_estimator=gae, kl_estimator=sampled",
                                          "adv_estimator=expected, kl_estimator=exact"]


# --------------------------------------------------------------------------------------------------
# the tables: each choice is one entry, and nothing else knows the names


def test_config_choices_are_the_tables_keys():
    from reward import REWARD_KINDS
    limits = {f.name: f.metadata.get("choices") for f in dataclasses.fields(train_ppo.Config)}
    assert limits["adv_estimator"] == tuple(train_ppo.ADV_ESTIMATORS)
    assert limits["kl_estimator"] == tuple(train_ppo.KL_ESTIMATORS)
    assert limits["reward_kind"] == tuple(REWARD_KINDS)


def test_no_code_compares_an_estimator_or_reward_kind_by_name():
    """Adding an estimator, a KL estimator or a reward kind is one entry: no comparison of the
    setting's value with a name anywhere else (the rollout classes do not know them at all)."""
    comparison = re.compile(r"(adv_estimator|kl_estimator|reward_kind)\)?\s*(==|!=|in\s*\(|not in)")
    for name in ("train_ppo.py", "run_management.py", "analyze.py", "reward.py",
                 "benchmarks/recipe_cost.py"):
        with open(os.path.join(REPO, name)) as f:
            assert not comparison.search(f.read()), name
    for kind in (train_ppo.ChoiceRollouts, train_ppo.GenerateRollouts):
        assert "estimator" not in inspect.getsource(kind)


def test_the_kl_table_estimates_as_its_functions_and_says_where_the_kl_enters():
    g = torch.Generator().manual_seed(3)
    every = torch.log_softmax(torch.randn(5, 4, generator=g), -1)
    every_ref = torch.log_softmax(torch.randn(5, 4, generator=g), -1)
    chosen = torch.randint(0, 4, (5, 1), generator=g)
    lp, ref_lp = every.gather(1, chosen), every_ref.gather(1, chosen)
    table = train_ppo.KL_ESTIMATORS
    assert torch.equal(table["sampled"].estimate(lp, ref_lp, every, every_ref), lp - ref_lp)
    assert torch.equal(table["k3"].estimate(lp, ref_lp, every, every_ref),
                       train_ppo.k3_kl(lp, ref_lp))
    assert torch.equal(table["exact"].estimate(lp, ref_lp, every, every_ref),
                       train_ppo.exact_kl(every, every_ref)[:, None])
    assert {name: e.enters for name, e in table.items()} == {"sampled": "reward", "k3": "loss",
                                                            "exact": "loss"}


def test_reward_kinds_declare_their_call_and_needs():
    from reward import REWARD_KINDS, LabelReward
    assert {name: (k.rollout, k.judge, k.cache, k.picks)
            for name, k in REWARD_KINDS.items()} == {
        "likelihood": ("generate", True, False, False),
        "teacher": ("choice", True, True, True),
        "label": ("choice", False, False, False)}
    examples = [{"label": 2}, {"label": 0}]
    label = REWARD_KINDS["label"].build(None, examples, train_ppo.Config(), cache_dir=None,
                                        data_id=None, all_reduce=None)
    assert isinstance(label, LabelReward)
    assert label([0, 1, 0], torch.tensor([2, 1, 0])).tolist() == [1.0, 0.0, 0.0]  # the choice call
