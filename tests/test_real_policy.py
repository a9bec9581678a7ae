"""benchmarks/real_policy.py: its plan of runs, its stages on stand-ins, its tables and figure read
back from a study's files (--reuse), with the figures worked out here."""

import json
import math
import os
import subprocess
import sys
import threading
import types

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import real_policy  # noqa: E402
import train_ppo  # noqa: E402
from config import parse_config  # noqa: E402
from test_reward_comparison import example, write_lines  # noqa: E402


def run_script(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "benchmarks/real_policy.py", *args], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=300)


def study_args(work="/w", **changes):
    args = dict(work=work, seeds=[1337, 1, 2], arms=list(real_policy.ARMS), train_examples=1024,
                passes=1, evaluations=4, smollm2="smollm2.gguf", gemma="gemma.gguf")
    return types.SimpleNamespace(**{**args, **changes})


def settings(run):
    """A run's --key=value overrides as a dict."""
    return dict(o[2:].split("=", 1) for o in run.overrides if o.startswith("--"))


# ------------------------------------------------------------------------------------------------
# the plan


def test_the_plan_runs_ppo_and_sft_on_every_seed_and_the_others_on_the_first():
    runs = real_policy.plan(study_args())
    assert [(r.name, r.script) for r in runs] == [
        ("ppo_1337", "train_ppo.py"), ("ppo_1", "train_ppo.py"), ("ppo_2", "train_ppo.py"),
        ("ppo_expected_1337", "train_ppo.py"), ("sft_1337", "train_sft.py"),
        ("sft_1", "train_sft.py"), ("sft_2", "train_sft.py"),
        ("ppo_teacher_1337", "train_ppo.py")]
    by_name = {r.name: settings(r) for r in runs}
    for run in runs:
        s = by_name[run.name]
        assert run.overrides[0] == "configs/real_policy.py" and s["seed"] == str(run.seed)
        assert run.out_dir == f"/w/runs/{run.name}"
        # 1024 examples in batches of 16: 64 steps, evaluated every 16, the final checkpoint only
        assert (s["max_steps"], s["eval_interval"], s["checkpoint_interval"]) == ("64", "16", "64")
        assert s["init_from"] == "smollm2.gguf"
        assert (s["train_data"], s["val_data"]) == ("/w/data/train.jsonl", "/w/data/heldout.jsonl")
    assert (by_name["ppo_expected_1337"]["adv_estimator"],
            by_name["ppo_expected_1337"]["kl_estimator"]) == ("expected", "exact")
    teacher = by_name["ppo_teacher_1337"]
    assert (teacher["reward_kind"], teacher["reward_model"]) == ("teacher", "gemma.gguf")
    assert "gemma.gguf" in runs[-1].inputs and "gemma.gguf" not in runs[0].inputs
    for name in ("ppo_1", "sft_2"):  # the config's own: gae, the label
        assert not {"adv_estimator", "kl_estimator", "reward_kind", "reward_model"} & set(
            by_name[name])


def test_the_steps_are_the_passes_over_the_training_examples():
    # 3 passes over 100 examples in batches of 16: 18.75 steps, rounded up; 4 evaluations
    [run] = real_policy.plan(study_args(arms=["sft"], seeds=[5], train_examples=100, passes=3))
    s = settings(run)
    assert (s["max_steps"], s["eval_interval"], s["checkpoint_interval"]) == ("19", "5", "19")
    [run] = real_policy.plan(study_args(arms=["sft"], seeds=[5], train_examples=100, passes=3,
                                        evaluations=2))
    assert settings(run)["eval_interval"] == "10"
    # the arms come in the table's order, whatever the command line's
    runs = real_policy.plan(study_args(arms=["sft", "ppo"], seeds=[5]))
    assert [r.name for r in runs] == ["ppo_5", "sft_5"]


def test_every_setting_of_every_run_is_one_that_train_ppo_reads(tmp_path, monkeypatch):
    """The config file and each run's overrides parse as train_ppo.Config (a typo is an error)."""
    gguf = tmp_path / "model.gguf"
    gguf.write_text("x")
    data = tmp_path / "data"
    for name in ("train", "heldout"):
        write_lines(str(data / f"{name}.jsonl"), [example(0, 0)])
    monkeypatch.chdir(REPO)  # the config's path is the repository's
    for run in real_policy.plan(study_args(work=str(tmp_path), smollm2=str(gguf),
                                           gemma=str(gguf))):
        cfg = parse_config(run.overrides + [f"--out_dir={run.out_dir}"], train_ppo.Config)
        assert (cfg.style, cfg.dtype, cfg.batch_size, cfg.seed) == ("lm-eval", "bfloat16", 16,
                                                                      run.seed)


# ------------------------------------------------------------------------------------------------
# the stages, on stand-ins


def stand_ins(monkeypatch):
    """The project's scripts, fast: a run leaves a checkpoint whose bytes say when it trained,
    predictions their command. -> the list of (script, output) each call runs."""
    made, lock = [], threading.Lock()

    def write(path, text):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)

    def run_script(*args, log=None, append=False):
        with lock:
            made.append((args[0], args[-1] if args[0] == "hellaswag.py" else
                         os.path.basename(args[-1].split("=", 1)[-1])))
        if args[0] == "hellaswag.py":
            write(args[-1], json.dumps(args) + "\n")
        elif args[0] in ("train_ppo.py", "train_sft.py"):
            write(os.path.join(args[-1].split("=", 1)[1], "ckpt_000002.pt"), f"{len(made)}")
    monkeypatch.setattr(real_policy.arguments, "run_script", run_script)

    def ending_token_counts(source, examples, style):
        with lock:
            made.append(("token counts", source, len(examples), style))
        return [[1, 2, 3, 4]] * len(examples)
    monkeypatch.setattr(real_policy, "ending_token_counts", ending_token_counts)
    return made


def test_the_stages_run_the_right_scripts_once_and_again_when_a_run_stopped(tmp_path,
                                                                              monkeypatch):
    made = stand_ins(monkeypatch)
    work = str(tmp_path / "work")
    data = tmp_path / "val.jsonl"
    write_lines(str(data), [example(i, i % 4) for i in range(9)])
    args = study_args(work=work, seeds=[7, 8], arms=["ppo", "sft"], train_examples=3, jobs=2)
    paths = real_policy.write_split(work, str(data), 3, 2)
    real_policy.run_everything(args, paths, real_policy.plan(args))
    runs = ["ppo_7", "ppo_8", "sft_7", "sft_8"]
    # the held-out predictions are the runs' own evaluations: on the training examples only
    predictions = {os.path.join(work, "predictions", f"{who}_train.jsonl")
                   for who in ["policy", *runs]}
    assert made[0] == ("token counts", "smollm2.gguf", 2, "lm-eval")  # the held-out examples
    assert sorted(made[1:]) == sorted(
        [("hellaswag.py", p) for p in predictions]
        + [("train_ppo.py", "ppo_7"), ("train_ppo.py", "ppo_8"), ("train_sft.py", "sft_7"),
           ("train_sft.py", "sft_8"), ("analyze.py", "ppo"), ("analyze.py", "sft")])
    assert json.load(open(real_policy.token_counts_path(work))) == [[1, 2, 3, 4]] * 2
    # the predictions in the runs' own style and dtype; the reports on each arm's first seed
    command = json.loads(open(os.path.join(work, "predictions", "sft_8_train.jsonl")).read())
    assert command[command.index("--style") + 1] == "lm-eval"
    assert command[command.index("--dtype") + 1] == "bfloat16"
    assert command[2] == os.path.join(work, "runs", "sft_8", "ckpt_000002.pt")
    made.clear()
    real_policy.run_everything(args, paths, real_policy.plan(args))
    assert sorted(made) == [("analyze.py", "ppo"), ("analyze.py", "sft")]  # all kept
    os.remove(os.path.join(work, "runs", "sft_7", "bench.json"))  # stopped while retraining
    made.clear()
    real_policy.run_everything(args, paths, real_policy.plan(args))
    assert sorted(made) == sorted(
        [("train_sft.py", "sft_7"), ("analyze.py", "ppo"), ("analyze.py", "sft"),
         ("hellaswag.py", os.path.join(work, "predictions", "sft_7_train.jsonl"))])


def test_jobs_run_side_by_side_and_a_failure_stops_the_tasks_not_started():
    barrier = threading.Barrier(2, timeout=10)  # passes only if both wait at once
    real_policy.in_parallel([barrier.wait, barrier.wait], jobs=2)
    ran = []

    def fail():
        raise real_policy.UserError("train_ppo.py failed: error: no")
    with pytest.raises(real_policy.UserError, match="^train_ppo.py failed: error: no$"):
        real_policy.in_parallel([lambda: ran.append(1), fail, lambda: ran.append(3)], jobs=1)
    assert ran == [1]


# ------------------------------------------------------------------------------------------------
# the tables and the figure


LABELS = [0, 1, 2, 3]


# the number of tokens of each held-out example's endings
TOKEN_COUNTS = [[1, 2, 3, 4], [4, 3, 2, 1], [2, 4, 1, 3], [3, 1, 4, 2]]


def predictions(picks_norm, picks=None, scores=(0.0,) * 4, picks_token=None):
    """Prediction lines of hellaswag.py's schema, every example's endings scored alike (by default
    all four the same: confidence 1/4). Summed log-probs whose mean per token (over the
    example's TOKEN_COUNTS) is highest at picks_token's ending (by default the first): -1 a token
    there, -2 elsewhere. With the studies' picks below, picking by the summed log-prob, or by
    another example's counts, gives other accuracies."""
    picks_token = picks_token or [0] * len(picks_norm)
    return [{"index": i, "label": label, "pred": pick, "pred_norm": norm,
             "sum_logprobs": [-n * (1.0 if j == token else 2.0)
                              for j, n in enumerate(TOKEN_COUNTS[i])],
             "norm_scores": list(scores)}
            for i, (norm, pick, label, token) in enumerate(
                zip(picks_norm, picks or picks_norm, LABELS, picks_token))]


def write_predictions(work, who, subset, picks_norm, picks=None):
    path = real_policy.predictions_path(work, who, subset)
    write_lines(path, predictions(picks_norm, picks))
    with open(path + ".made.json", "w") as f:
        json.dump({"args": [], "seconds": 1.0}, f)


def write_run(work, name, curve, kl, seconds, last_scores=(0.0,) * 4):
    """A finished run: its held-out evaluations (step: (acc_norm picks, per-token picks); the last
    with last_scores), metrics, config and record."""
    out = os.path.join(work, "runs", name)
    for step, (picks, picks_token) in curve.items():
        scores = last_scores if step == max(curve) else (0.0,) * 4
        write_lines(os.path.join(out, "eval", f"step_{step:06d}.jsonl"),
                    predictions(picks, scores=scores, picks_token=picks_token))
    write_lines(os.path.join(out, "metrics.jsonl"),
                [{"step": s, "kl": kl if s > 5 else 9.0} for s in range(1, 11)])
    with open(os.path.join(out, "train_config.json"), "w") as f:
        json.dump({"choice_temperature": 1.0, "batch_size": 16}, f)
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump({"seconds": seconds}, f)


# after the run, on each subset: (acc_norm picks, acc picks (training examples) or per-token
# picks (held-out ones)); before: the policy's
AFTER = {"ppo_7": {"train": ([0, 1, 2, 0], [0, 0, 0, 0]),
                   "heldout": ([0, 1, 1, 1], [0, 1, 2, 3])},
         "ppo_8": {"train": ([0, 1, 2, 3], None), "heldout": ([0, 1, 2, 3], [3, 1, 2, 3])},
         "sft_7": {"train": ([1, 1, 1, 1], None), "heldout": ([0, 0, 0, 0], [1, 1, 1, 1])},
         "sft_8": {"train": ([0, 0, 0, 3], None), "heldout": ([0, 1, 0, 0], [2, 1, 0, 3])}}
BEFORE = {"train": ([0, 0, 0, 0], [2, 0, 0, 1]), "heldout": ([0, 0, 0, 0], [0, 3, 3, 3])}
# sft_8's last held-out evaluation gives the endings these probabilities (the others, 1/4 each)
SFT_8_PROBABILITIES = (0.4, 0.3, 0.2, 0.1)


def study(work):
    write_lines(os.path.join(work, "data", "train.jsonl"), [example(i, i) for i in range(4)])
    write_lines(os.path.join(work, "data", "heldout.jsonl"), [example(4 + i, i) for i in range(4)])
    write_lines(real_policy.token_counts_path(work), [TOKEN_COUNTS])
    with open(real_policy.token_counts_path(work) + ".made.json", "w") as f:
        json.dump({"args": [], "seconds": 1.0}, f)
    # on the training examples, hellaswag.py's predictions; on the held-out ones, the run's own
    # evaluations at its start and end
    write_predictions(work, "policy", "train", *BEFORE["train"])
    for name, subsets in AFTER.items():
        write_predictions(work, name, "train", *subsets["train"])
        write_run(work, name, {0: BEFORE["heldout"], 4: AFTER[name]["heldout"]},
                  kl=0.25 if name != "sft_7" else 0.5, seconds=90.0,
                  last_scores=([math.log(p) for p in SFT_8_PROBABILITIES] if name == "sft_8"
                               else (0.0,) * 4))


def cell(before, after):
    """The paired cell worked out here: the mean difference, its normal interval with the sample
    sd, and McNemar's exact two-sided p."""
    right = lambda picks: [p == label for p, label in zip(picks, LABELS)]  # noqa: E731
    a, b = right(before), right(after)
    d = [int(y) - int(x) for x, y in zip(a, b)]
    n, mean = len(d), sum(d) / len(d)
    half = 1.96 * math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
    k, m = min(d.count(1), d.count(-1)), d.count(1) + d.count(-1)
    p = min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m) if m else 1.0
    return (f"{sum(a) / n:.3f} → {sum(b) / n:.3f} ({mean:+.3f} [{mean - half:+.3f}, "
            f"{mean + half:+.3f}], p {p:.2g})")


def test_tables_from_a_studys_files(tmp_path):
    work = str(tmp_path)
    study(work)
    figure = tmp_path / "figures" / "curve.png"
    proc = run_script("--reuse", "--work", work, "--seeds", "7", "8", "--arms", "ppo", "sft",
                      "--figure", str(figure))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines()
             if line.startswith("| ") and "---" not in line]
    rows = {tuple(line.split(" | ")[:2]): line for line in lines}
    # ppo_7, by hand: train acc_norm 0.25 -> 0.75 (+0.5 +- 1.96 sqrt(1/12), p 2/4); acc 0 -> 0.25
    assert rows[("| ppo", "7")] == (
        "| ppo | 7 | 0.250 → 0.750 (+0.500 [-0.066, +1.066], p 0.5) | "
        "0.000 → 0.250 (+0.250 [-0.240, +0.740], p 1) | "
        "0.250 → 0.500 (+0.250 [-0.240, +0.740], p 1) | "
        "0.250 → 0.500 (+0.250 [-0.240, +0.740], p 1) | "
        "0.500 → 1.000 (+0.500 [-0.066, +1.066], p 0.5) | "
        "0.000 → 0.250 | 0.00000 | 0.250 | 1.5 |")
    for name, seed in (("ppo", "8"), ("sft", "7"), ("sft", "8")):
        after, row = AFTER[f"{name}_{seed}"], rows[(f"| {name}", seed)]
        cells = row.split(" | ")
        assert cells[2] == cell(BEFORE["train"][0], after["train"][0])
        assert cells[3] == cell(BEFORE["train"][1], after["train"][1] or after["train"][0])
        assert cells[4] == cell(BEFORE["heldout"][0], after["heldout"][0])
        # the per-token pick: the summed log-probs over TOKEN_COUNTS, not acc_norm's picks
        assert cells[6] == cell(BEFORE["heldout"][1], after["heldout"][1])
    # ECE: every confidence 1/4, so |acc_norm - 1/4|; the held-out KL from uniform choices to
    # uniform ones: 0; the KL of the last five steps
    assert rows[("| sft", "7")].endswith("| 0.000 → 0.000 | 0.00000 | 0.500 | 1.5 |")
    assert rows[("| ppo", "8")].endswith("| 0.000 → 0.750 | 0.00000 | 0.250 | 1.5 |")
    # sft_8 ends with its top ending at 0.4 on each example and right on two of four: ECE
    # |0.5 - 0.4|; KL(q || uniform) = sum q log(4 q)
    kl = sum(q * math.log(4 * q) for q in SFT_8_PROBABILITIES)
    assert rows[("| sft", "8")].endswith(f"| 0.000 → 0.100 | {kl:.5f} | 0.250 | 1.5 |")
    # the arms' means: ppo held out +0.25 and +0.75 (per token +0.5 and +0.25), trained on +0.5
    # and +0.75; sft 0 and +0.25 (per token -0.25 and 0)
    assert rows[("| ppo", "PPO, label")] == (
        "| ppo | PPO, label | 2 | +0.500 | +0.375 | +0.625 | 0.00000 |")
    assert rows[("| sft", "supervised")] == (
        f"| sft | supervised | 2 | +0.125 | -0.125 | +0.125 | {kl / 2:.5f} |")
    assert "on the 4 training examples and the 4 held-out ones" in proc.stdout
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "heldout_curve.png").exists()


def test_the_curve_is_the_mean_over_seeds_against_the_examples_seen(tmp_path, monkeypatch):
    work = str(tmp_path)
    study(work)
    runs = real_policy.plan(study_args(work=work, seeds=[7, 8], arms=["ppo"]))
    curves = [real_policy.heldout_curve(run, real_policy.evaluations_of(run)) for run in runs]
    assert curves == [[(0, 0.25), (64, 0.5)], [(0, 0.25), (64, 1.0)]]  # step 4 of 16 examples
    drawn = {}
    monkeypatch.setattr(real_policy.analyze, "save_figure",
                        lambda fig, path: drawn.update(fig=fig, path=path))
    real_policy.plot_heldout({"ppo": curves, "sft": [[(0, 0.25), (64, 0.0)]]}, 4, "x.png")
    ax = drawn["fig"].axes[0]
    ppo, sft = ax.lines
    assert list(ppo.get_xdata()) == [0, 64] and list(ppo.get_ydata()) == [0.25, 0.75]
    assert list(sft.get_ydata()) == [0.25, 0.0] and len(ax.collections) == 1  # one seed: no band
    [band] = ax.collections
    assert sorted(band.get_paths()[0].vertices[:, 1].round(3).tolist())[-1] == 1.0  # the max
    real_policy.plot_heldout({"ppo": curves}, 4, str(tmp_path / "deep" / "c.png"))


def test_reuse_of_an_empty_work_folder_is_one_line(tmp_path):
    proc = run_script("--reuse", "--work", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr == (f"error: --work {tmp_path}: no runs there; run without --reuse to "
                           "train them\n") and proc.stdout == ""


def test_reuse_without_the_held_out_token_counts_is_one_line(tmp_path):
    study(str(tmp_path))
    os.remove(real_policy.token_counts_path(str(tmp_path)) + ".made.json")  # stopped while made
    proc = run_script("--reuse", "--work", str(tmp_path), "--seeds", "7", "8", "--arms", "ppo",
                      "sft")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(
        f"error: {real_policy.token_counts_path(str(tmp_path))}: unfinished")
    assert proc.stderr.endswith("run without --reuse to make it again\n") and proc.stdout == ""


def test_the_per_token_pick_takes_the_first_of_equals_and_nothing_from_an_overflow():
    counts = [[1, 4, 2, 2]]
    right = lambda label, sums: real_policy.right_per_token(  # noqa: E731
        [{"index": 0, "label": label, "sum_logprobs": sums}], counts)
    assert right(1, [-2.0, -4.0, -3.0, -8.0]) == [True]  # per token -2, -1, -1.5, -4
    # -1 at endings 1 and 2: the first of them, as the evaluator's argmax
    assert right(1, [-2.0, -4.0, -2.0, -8.0]) == [True]
    assert right(2, [-2.0, -4.0, -2.0, -8.0]) == [False]
    # a NaN first would win Python's max(), an -inf lose to ending 2: an overflowed example is
    # right for no ending (as analyze.finite_scores treats its scores)
    assert right(0, [float("nan"), -4.0, -3.0, -8.0]) == [False]
    assert right(2, [-2.0, float("-inf"), -3.0, -8.0]) == [False]


def test_the_per_token_counts_are_those_a_transformers_policy_trains_with(tmp_path):
    """ending_token_counts' counts are what choice_norm "token" divides by: the scored tokens of
    the choice rows of the policy train_ppo.py builds from the same source (both come from
    hellaswag.causal_lm_rows: this guards the grouping by example and the field read)."""
    import synthetic
    from hf_policy import HFPolicy
    from test_causal_lm import build_llama

    llama = build_llama(tmp_path / "llama", window=96)
    examples = synthetic.make_examples(6, seed=3, split="val")
    counts = real_policy.ending_token_counts(llama, examples, "lm-eval")
    policy = HFPolicy.load(llama)
    expected = policy.choice_lengths(policy.encode_choices(examples, "lm-eval"))[0]
    assert counts == expected.int().tolist() and len(counts) == 6
    assert len({n for row in counts for n in row}) > 1  # endings of several lengths


def test_reuse_of_an_unfinished_study_is_one_line_and_prints_no_table(tmp_path):
    study(str(tmp_path))
    os.remove(tmp_path / "runs" / "sft_7" / "bench.json")
    proc = run_script("--reuse", "--work", str(tmp_path), "--seeds", "7", "8", "--arms", "ppo",
                      "sft")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "sft_7: unfinished" in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("args, message", [
    (["--passes", "0"], "error: --passes must be at least 1, not 0"),
    (["--jobs", "0"], "error: --jobs must be at least 1, not 0"),
    (["--arms", "ppo", "dpo"], "argument --arms: invalid choice: 'dpo'"),
    (["--smollm2", "{tmp}/missing.gguf"], "error: {tmp}/missing.gguf: no such file"),
    (["--figure", "{tmp}"], "error: --figure {tmp}: an existing directory")])
def test_bad_arguments_are_one_line_before_any_work(tmp_path, args, message):
    data = tmp_path / "val.jsonl"
    write_lines(str(data), [example(i, i % 4) for i in range(9)])
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = run_script("--data", str(data), "--work", str(tmp_path / "work"), *args)
    assert proc.returncode == 2 and message.replace("{tmp}", str(tmp_path)) in proc.stderr
    assert not (tmp_path / "work").exists()


@pytest.mark.slow
def test_a_study_of_a_tiny_llama_end_to_end(tmp_path):
    """The whole study, two jobs at a time, a tiny random Llama directory in SmolLM2's and Gemma's:
    the real scripts, their files read back into the tables, the figure and the reports."""
    import synthetic
    from test_causal_lm import build_llama

    llama = build_llama(tmp_path / "llama", window=96)
    data = tmp_path / "val.jsonl"
    synthetic.write_jsonl(data, synthetic.make_examples(40, seed=3, split="val"))
    work = tmp_path / "work"
    proc = run_script("--data", str(data), "--work", str(work), "--smollm2", llama, "--gemma",
                      llama, "--train_examples", "16", "--heldout_examples", "8", "--seeds", "3",
                      "--jobs", "2")
    assert proc.returncode == 0, proc.stderr
    arms = list(real_policy.ARMS)
    rows = [line.split(" | ")[0][2:] for line in proc.stdout.splitlines()
            if line.startswith("| ") and " | 3 | " in line]
    assert rows == arms and "on the 16 training examples and the 8 held-out ones" in proc.stdout
    assert (work / "heldout_curve.png").is_file()
    assert all((work / "reports" / arm / "report.md").is_file() for arm in arms)
    again = run_script("--reuse", "--work", str(work), "--seeds", "3")
    assert again.returncode == 0 and [line for line in again.stdout.splitlines()
                                      if line.startswith("| ")] == [
        line for line in proc.stdout.splitlines() if line.startswith("| ")]


def test_an_arm_with_a_run_whose_scores_overflowed_has_no_mean_held_out_kl():
    row = lambda kl: {"arm": "ppo", "heldout_kl": kl,  # noqa: E731
                      "heldout": {"acc_norm": {"diff": 0.1}, "acc_token": {"diff": 0.3}},
                      "train": {"acc_norm": {"diff": 0.2}}}
    assert real_policy.arm_means([row(0.25), row(0.5)])["ppo"] == (2, 0.1, 0.3, 0.2, 0.375)
    assert real_policy.arm_means([row(0.25), row(None)])["ppo"][4] is None
    assert real_policy.number(None, ".4f") == "n/a" and real_policy.number(0.5, ".4f") == "0.5000"
