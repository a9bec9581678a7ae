"""analyze.py: the report's numbers are the ones recomputed from the run's files, every
figure is a PNG, and runs that are short, unlabelled or cut off give a report that says
what it cannot compute."""

import json
import math
import os
import random
import re
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

import analyze
import common
import hellaswag
import synthetic
import run_management
import train_ppo
from common import UserError
from reward import REWARD_KINDS
from tokenizer import gpt2_encoding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------------
# runs built by hand: val data, metrics.jsonl and eval/step_*.jsonl written by the test


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def val_examples(n=60):
    """Synthetic-task examples with varied groups, so that the group comparison has several rows."""
    examples = synthetic.make_examples(n, seed=0, split="val")
    for i, ex in enumerate(examples):
        ex["activity_label"] = ["Colours", "Paint", "Fruit"][i % 3]
        ex["split_type"] = "indomain" if i % 2 else "zeroshot"
    return examples


def predictions(examples, skill, seed, labelled=True):
    """Predictions of a fake model that favours the gold ending on a `skill`
    share of the examples."""
    rng = random.Random(seed)
    records = []
    for i, ex in enumerate(examples):
        norm_scores = [rng.gauss(-3, 0.5) for _ in range(4)]
        if rng.random() < skill:
            norm_scores[ex["label"]] += 2.0
        sum_logprobs = [s * rng.uniform(2, 4) for s in norm_scores]
        records.append({"index": i, "label": ex["label"] if labelled else None,
                        "pred": int(np.argmax(sum_logprobs)),
                        "pred_norm": int(np.argmax(norm_scores)),
                        "sum_logprobs": sum_logprobs, "norm_scores": norm_scores, "ind": ex["ind"],
                        "split_type": ex["split_type"], "activity_label": ex["activity_label"],
                        "source": "synthetic"})
    return records


def accuracy(records, key):
    return sum(p[key] == p["label"] for p in records) / len(records)


def make_run(run_dir, skills=(0.0, 0.8, 0.6), steps_per_eval=10, labelled=True, config=None):
    """A choice run of len(skills) evaluations, with a metrics line for every step."""
    os.makedirs(run_dir, exist_ok=True)
    examples = val_examples()
    # beside the run: a sweep's runs share it
    data = os.path.join(os.path.dirname(run_dir), "val.jsonl")
    write_jsonl(data, examples)
    settings = {"rollout": "choice", "reward_kind": "label", "val_data": data,
                "learning_rate": 1e-3, "choice_temperature": 1.0, "out_dir": run_dir,
                **(config or {})}
    with open(os.path.join(run_dir, "train_config.json"), "w") as f:
        json.dump(settings, f)
    metrics, evals = [], {}
    for k, skill in enumerate(skills):
        step = k * steps_per_eval
        evals[step] = predictions(examples, skill, seed=step, labelled=labelled)
        write_jsonl(run_management.eval_predictions_path(run_dir, step), evals[step])
    last = (len(skills) - 1) * steps_per_eval
    for step in range(last + 1):
        m = {"step": step} if step == 0 else {"step": step, "reward": 0.2 + step / 100,
                                                "kl": step / 50, "approx_kl": 0.01,
                                                "clipfrac": 0.1, "entropy": 1.3,
                                                "explained_var": 0.1, "lr": 1e-3, "kl_coef": 0.01}
        if step in evals and labelled:
            m.update({"eval/acc": accuracy(evals[step], "pred"),
                      "eval/acc_norm": accuracy(evals[step], "pred_norm"),
                      "eval/n": len(examples)})
        metrics.append(m)
    write_jsonl(os.path.join(run_dir, "metrics.jsonl"), metrics)
    return examples, evals, metrics


def as_json(obj):
    """obj as it reads back from report.json (floats round-trip exactly), for exact comparisons."""
    return json.loads(json.dumps(obj))


def report_of(out_dir):
    with open(os.path.join(out_dir, "report.md")) as f:
        text = f.read()
    with open(os.path.join(out_dir, "report.json")) as f:
        return text, json.load(f)


def assert_figures_readable(out_dir, text):
    """Every figure the report shows exists and is a readable, non-empty PNG."""
    figures = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert figures
    for name in figures:
        image = matplotlib.image.imread(os.path.join(out_dir, name))
        assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50, name
        assert image.std() > 0, f"{name} is blank"


# --------------------------------------------------------------------------------------------------
# the statistics analyze.py adds


def test_wilson_interval_matches_the_textbook_values():
    # the standard example (e.g. Newcombe 1998): [0.490, 0.943]
    low, high = analyze.wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert analyze.wilson_interval(0, 20)[0] == 0.0 and 0 < analyze.wilson_interval(0, 20)[1] < 0.2


def test_calibration_error_against_a_plain_computation():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.25, 1.0, 500)
    correct = rng.uniform(size=500) < confidence ** 2  # overconfident on purpose
    result = analyze.calibration(confidence.tolist(), correct.tolist(), n_bins=10)
    bins = np.minimum((confidence * 10).astype(int), 9)
    expected = sum((bins == b).sum() / 500
                   * abs(correct[bins == b].mean() - confidence[bins == b].mean())
                   for b in range(10) if (bins == b).any())
    assert result["ece"] == pytest.approx(expected) and result["ece"] > 0.05
    assert sum(b["n"] for b in result["bins"]) == 500


def test_choice_kl_against_a_plain_computation():
    rng = np.random.default_rng(0)
    before, after = (rng.normal(size=(50, 4)) for _ in "ba")
    lines = lambda scores: [{"index": i, "label": i % 4, "norm_scores": s.tolist()}  # noqa: E731
                            for i, s in enumerate(scores)]
    for temperature in (1.0, 0.25):
        p, q = (np.exp(x / temperature) / np.exp(x / temperature).sum(1, keepdims=True)
                for x in (before, after))
        expected = (q * np.log(q / p)).sum(1).mean()
        assert analyze.choice_kl(lines(before), lines(after), temperature) == pytest.approx(
            expected, rel=1e-9) and expected > 0.05
    assert analyze.choice_kl(lines(before), lines(before), 1.0) == pytest.approx(0.0, abs=1e-12)
    # endings whose probabilities underflow a float: still the exact KL, here 2000 nats
    far = [{"index": 0, "label": 0, "norm_scores": s} for s in ([0.0, -2000.0], [-2000.0, 0.0])]
    assert analyze.choice_kl(far[:1], far[1:], 1.0) == pytest.approx(2000.0)
    overflowed = lines(after)
    overflowed[1]["norm_scores"] = [float("nan")] * 4
    assert analyze.choice_kl(lines(before), overflowed, 1.0) is None
    with pytest.raises(UserError, match="before has 50 predictions and after 49"):
        analyze.choice_kl(lines(before), lines(after)[1:], 1.0)


# --------------------------------------------------------------------------------------------------
# a run's report


def test_report_numbers_equal_those_recomputed_from_the_files(tmp_path):
    run = str(tmp_path / "run")
    examples, evals, metrics = make_run(run)
    analyze.main([run])
    out = os.path.join(run, "report")
    text, (result,) = report_of(out)

    # every evaluation: accuracy from the prediction files equals what training
    # logged, with its Wilson interval
    logged = {m["step"]: m for m in metrics if "eval/acc" in m}
    assert [r["step"] for r in result["evaluations"]] == sorted(evals)
    for row in result["evaluations"]:
        assert row["acc_norm"] == pytest.approx(logged[row["step"]]["eval/acc_norm"])
        assert row["acc"] == pytest.approx(logged[row["step"]]["eval/acc"])
        correct = sum(p["pred_norm"] == p["label"] for p in evals[row["step"]])
        assert row["acc_norm_ci"] == pytest.approx(analyze.wilson_interval(correct, len(examples)))

    # before vs after: hellaswag.py's --compare numbers, for the last and for the
    # best (step 10) evaluation
    for name, after in (("last", 20), ("best", 10)):
        c = result["comparisons"][name]
        expected = hellaswag.compare_predictions(evals[0], evals[after])
        assert (c["before_step"], c["after_step"]) == (0, after)
        assert [c["acc"], c["acc_norm"], c["groups"]] == as_json(
            [expected[k] for k in ("acc", "acc_norm", "groups")])
        right_to_wrong = {p["index"] for p, q in zip(evals[0], evals[after])
                          if p["pred_norm"] == p["label"] != q["pred_norm"]}
        assert {f["index"] for f in c["flips"]["right_to_wrong"]} == right_to_wrong
        assert len(c["flips"]["wrong_to_right"]) == expected["acc_norm"]["b_only"]
    last = result["comparisons"]["last"]["acc_norm"]
    assert f"{last['diff']:+.3f} [{last['ci95'][0]:+.3f}, {last['ci95'][1]:+.3f}]" in text
    assert f"McNemar exact p = {last['p_value']:.3g}" in text and last["p_value"] < 0.05
    assert "significant at the 5% level" in text.split("## Training curves")[0]

    # how the choices changed: ending lengths and calibration, recomputed here
    for row in (result["lengths"][0], result["lengths"][-1]):
        preds = evals[row["step"]]
        chosen = [len(examples[p["index"]]["endings"][p["pred_norm"]].strip()) for p in preds]
        assert row["chosen_chars"] == pytest.approx(sum(chosen) / len(chosen))
    probs = [np.exp(p["norm_scores"]) / np.exp(p["norm_scores"]).sum() for p in evals[20]]
    expected = analyze.calibration([float(pr.max()) for pr in probs],
                                   [p["pred_norm"] == p["label"] for p in evals[20]])
    assert result["calibration"]["step 20"]["ece"] == pytest.approx(expected["ece"])
    first_flip = result["comparisons"]["last"]["flips"]["wrong_to_right"][0]
    assert examples[first_flip["index"]]["ctx"] in text  # flips quote the context
    assert_figures_readable(out, text)
    figures = {"curves.png", "groups_last.png", "groups_best.png", "lengths.png", "calibration.png"}
    assert figures <= set(os.listdir(out))


def test_teacher_agreement_before_and_after(tmp_path):
    run = str(tmp_path / "run")
    examples, evals, _ = make_run(run, skills=(0.0, 0.9))
    teacher = predictions(examples, 0.7, seed=99)
    write_jsonl(os.path.join(run, "eval", "teacher.jsonl"), teacher)
    (result,) = analyze.main([run])
    agree_before = [p["pred_norm"] == t["pred_norm"] for p, t in zip(evals[0], teacher)]
    agree_after = [p["pred_norm"] == t["pred_norm"] for p, t in zip(evals[10], teacher)]
    assert result["teacher"]["agreement"] == hellaswag.paired_difference(agree_before, agree_after)
    wrong = [i for i, t in enumerate(teacher) if t["pred_norm"] != t["label"]]
    assert result["teacher"]["teacher_wrong"] == len(wrong)
    copies = result["teacher"]["copies_mistakes"]["acc_b"]
    assert copies == pytest.approx(sum(agree_after[i] for i in wrong) / len(wrong))
    text, _ = report_of(os.path.join(run, "report"))
    assert "Agreement with the teacher's pick" in text


def test_teacher_agreement_is_skipped_when_an_evaluation_is_on_other_examples(tmp_path):
    """eval_limit lowered on a resume: the last evaluation covers fewer examples than the teacher's
    predictions, which must not be paired by position."""
    run = str(tmp_path / "run")
    examples, evals, _ = make_run(run, skills=(0.0, 0.9))
    write_jsonl(os.path.join(run, "eval", "teacher.jsonl"), predictions(examples, 0.7, seed=99))
    write_jsonl(run_management.eval_predictions_path(run, 10), evals[10][:4])
    (result,) = analyze.main([run])
    assert result.get("teacher") is None
    text, _ = report_of(os.path.join(run, "report"))
    assert "the teacher's predictions are not on the same examples" in text
    assert "Agreement with the teacher's pick" not in text


@pytest.mark.parametrize("other", ["labels", "ind"])
def test_a_teacher_file_of_other_data_is_skipped_like_an_evaluation(tmp_path, other):
    """The teacher's predictions are checked against the evaluations as --compare checks two
    evaluations (index, label, ind): made on other data, they give no agreement and a note."""
    run = str(tmp_path / "run")
    examples, _, _ = make_run(run, skills=(0.0, 0.9))
    teacher = predictions(examples, 0.9, seed=99)
    for t in teacher:
        if other == "labels":  # the same count and indices, other gold labels
            t["label"] = (t["label"] + 1) % 4
        else:  # the same labels, other examples of the dataset
            t["ind"] += 1000
    write_jsonl(os.path.join(run, "eval", "teacher.jsonl"), teacher)
    (result,) = analyze.main([run])
    assert result.get("teacher") is None
    text, _ = report_of(os.path.join(run, "report"))
    assert ("the teacher's predictions are not on the same examples as the evaluations, so "
            "agreement is skipped: the teacher and step 0 differ in index/label/ind") in text
    assert "Agreement with the teacher's pick" not in text
    assert "every part of the report was computed" not in text


def test_data_of_other_inds_is_not_the_data_of_the_predictions(tmp_path):
    run = str(tmp_path / "run")
    examples, _, _ = make_run(run, skills=(0.0, 0.9))
    other = [{**ex, "ind": ex["ind"] + 1000} for ex in examples]
    (result,) = analyze.main([run, "--data", write_examples(tmp_path, other)])
    text, _ = report_of(os.path.join(run, "report"))
    assert "is not the data these predictions were made on (example 0 differs)" in text
    assert "lengths" not in result


def test_a_sweep_is_labelled_by_the_settings_that_differ(tmp_path):
    runs = [str(tmp_path / name) for name in ("a", "b")]
    make_run(runs[0], config={"learning_rate": 1e-3})
    make_run(runs[1], config={"learning_rate": 3e-4})
    out = str(tmp_path / "sweep")
    results = analyze.main(runs + ["--out", out])
    assert [r["label"] for r in results] == ["learning_rate=0.001", "learning_rate=0.0003"]
    text, _ = report_of(out)
    assert "Runs differ in: `learning_rate`" in text and "# learning_rate=0.0003" in text
    assert_figures_readable(out, text)
    assert os.path.exists(os.path.join(out, "run2_groups_last.png"))


def test_runs_that_differ_in_their_judge_are_compared_side_by_side(tmp_path):
    runs = [str(tmp_path / name) for name in ("label", "smollm2", "gemma")]
    examples, evals, _ = make_run(runs[0], skills=(0.0, 0.6), config={"reward_kind": "label"})
    make_run(runs[1], skills=(0.0, 0.8), config={"reward_kind": "teacher",
                                                 "reward_model": "/m/SmolLM2.Q4_1.gguf"})
    make_run(runs[2], skills=(0.0, 0.3), config={"reward_kind": "teacher",
                                                 "reward_model": "/m/gemma-3-270m.gguf/"})
    teacher = predictions(examples, 0.7, seed=99)
    write_jsonl(os.path.join(runs[1], "eval", "teacher.jsonl"), teacher)
    out = str(tmp_path / "judges")
    results = analyze.main(runs + ["--out", out])
    text, saved = report_of(out)
    assert "## The judges compared" in text
    rows = [r["judge"] for r in results]
    assert [r["judge"] for r in rows] == [None, "SmolLM2.Q4_1.gguf", "gemma-3-270m.gguf"]
    assert [r["reward_kind"] for r in rows] == ["label", "teacher", "teacher"]
    assert rows[1]["judge_acc_norm"] == accuracy(teacher, "pred_norm")
    assert rows[0]["judge_acc_norm"] is None and rows[2]["agreement"] is None
    smollm2 = results[1]["comparisons"]["last"]["acc_norm"]
    assert rows[1]["acc_norm"]["acc_b"] == smollm2["acc_b"] and rows[1]["ece"][1] == (
        results[1]["calibration"]["step 10"]["ece"])
    assert rows[1]["agreement"]["acc_b"] == results[1]["teacher"]["agreement"]["acc_b"]
    table = [line for line in text.splitlines() if line.startswith("| reward_kind=")]
    assert len(table) == 3 and "SmolLM2.Q4_1.gguf" in table[1] and "gold labels" in table[0]
    assert saved[1]["judge"] == as_json(rows[1])
    # runs that share their judge get no such section
    analyze.main(runs[1:2] + [runs[1], "--out", str(tmp_path / "same")])
    assert "## The judges compared" not in report_of(str(tmp_path / "same"))[0]


def test_whether_a_run_had_a_judge_comes_from_the_reward_kinds_table(monkeypatch):
    """judge_rows asks reward.REWARD_KINDS whether a kind scores with a judge: a kind added without
    one names none (the name "label" is not what says so); a kind this code does not know is
    taken to have its reward_model."""
    monkeypatch.setitem(REWARD_KINDS, "gold", REWARD_KINDS["label"])
    kinds = ("gold", "teacher", "label", "unknown")
    runs = [{"config": {"reward_kind": kind, "reward_model": "/models/judge/"}} for kind in kinds]
    results = [{"label": kind, "comparisons": {}} for kind in kinds]
    assert ([row["judge"] for row in analyze.judge_rows(runs, results)]
            == [None, "judge", None, "judge"])


def test_a_report_replaces_an_earlier_report_whole(tmp_path):
    """A report never shows figures of another run: the folder of an earlier report (a sweep's,
    with its run2_ figures) is replaced, not written over."""
    runs = [str(tmp_path / name) for name in ("a", "b")]
    make_run(runs[0], config={"learning_rate": 1e-3})
    make_run(runs[1], config={"learning_rate": 3e-4}, skills=(0.0, 0.5))
    out = str(tmp_path / "out")
    analyze.main(runs + ["--out", out])
    assert os.path.exists(os.path.join(out, "run2_groups_last.png"))
    analyze.main([runs[1], "--out", out])
    text, (result,) = report_of(out)
    figures = set(re.findall(r"!\[[^]]*\]\(([^)]+)\)", text))
    assert set(os.listdir(out)) == figures | {"report.md", "report.json"}
    assert "groups_best.png" not in figures and result["dir"] == runs[1]
    assert [name for name in os.listdir(tmp_path) if name.startswith(".")] == []


@pytest.mark.parametrize("place", ["foreign file", "run directory", "sub-folder"])
def test_an_out_folder_holding_other_things_is_refused_and_kept(tmp_path, place):
    run = str(tmp_path / "run")
    make_run(run)
    out = {"foreign file": str(tmp_path / "out"), "run directory": run,
           "sub-folder": str(tmp_path / "out2")}[place]
    os.makedirs(out, exist_ok=True)
    if place == "foreign file":
        (tmp_path / "out" / "notes.txt").write_text("mine")
        (tmp_path / "out" / "curves.png").write_text("an old figure")
    elif place == "sub-folder":
        os.makedirs(os.path.join(out, "report.md"))
    before = sorted(os.listdir(out))
    with pytest.raises(UserError, match=f"^--out {out}: holds .* which is not part of a report"):
        analyze.main([run, "--out", out])
    assert sorted(os.listdir(out)) == before


# --------------------------------------------------------------------------------------------------
# runs the report must survive: they say what cannot be computed, and never raise


def test_sweep_labels_ignore_a_resume_a_missing_config_and_tell_equal_folders_apart(tmp_path):
    runs = [str(tmp_path / name) for name in ("a", "b", "c")]
    make_run(runs[0], config={"learning_rate": 1e-3, "init_from": "gpt2"})
    make_run(runs[1], config={"learning_rate": 3e-4, "init_from": "resume"})  # resumed
    make_run(runs[2])
    os.remove(os.path.join(runs[2], "train_config.json"))
    results = analyze.main(runs + ["--out", str(tmp_path / "sweep")])
    assert [r["label"] for r in results] == ["learning_rate=0.001", "learning_rate=0.0003", "c"]
    same = [str(tmp_path / folder / "run") for folder in ("x", "y")]
    for run in same:
        make_run(run, config={"val_data": str(tmp_path / "x" / "val.jsonl")})
    results = analyze.main(same + ["--out", str(tmp_path / "same")])
    assert [r["label"] for r in results] == [f"run ({run})" for run in same]


def test_evaluations_of_different_example_counts_and_order(tmp_path):
    """eval_limit raised on a resume: later evaluations cover more examples than the first; and
    eval files named without the zero padding sort by step, not by name."""
    run = str(tmp_path / "run")
    examples, evals, _ = make_run(run, skills=(0.0, 0.9))
    full = predictions(examples, 0.9, seed=10)
    os.remove(run_management.eval_predictions_path(run, 10))
    write_jsonl(run_management.eval_predictions_path(run, 0), evals[0][:40])
    write_jsonl(os.path.join(run, "eval", "step_9.jsonl"), evals[0][:40])
    write_jsonl(os.path.join(run, "eval", "step_10.jsonl"), full)
    (result,) = analyze.main([run, "--data", write_examples(tmp_path, examples[:40])])
    last = result["comparisons"]["last"]
    assert (last["before"], last["after"], last["n"]) == ("step 0", "step 10", 40)
    expected = hellaswag.paired_difference([p["pred_norm"] == p["label"] for p in evals[0][:40]],
                                           [p["pred_norm"] == p["label"] for p in full[:40]])
    assert last["acc_norm"] == expected
    text, _ = report_of(os.path.join(run, "report"))
    assert "compared on the 40 examples both cover (40 and 60 evaluated)" in text
    # the data file holds 40 examples, the last evaluation indexes 60: no lengths, no traceback
    assert "is not the data these predictions were made on" in text and "lengths" not in result


def write_examples(tmp_path, examples):
    path = str(tmp_path / "val40.jsonl")
    write_jsonl(path, examples)
    return path


def test_a_skipped_non_finite_step_stays_out_of_the_summary(tmp_path):
    run = str(tmp_path / "run")
    _, _, metrics = make_run(run)
    metrics[-1].update(reward=float("nan"), kl=float("nan"))
    write_jsonl(os.path.join(run, "metrics.jsonl"), metrics)
    (result,) = analyze.main([run])
    finite = [m for m in metrics[1:] if m["reward"] == m["reward"]]
    assert result["training"]["reward_last5"] == pytest.approx(
        sum(m["reward"] for m in finite[-4:]) / 4)
    text, report = report_of(os.path.join(run, "report"))
    assert "nan" not in text.split("## Evaluations")[0]


def test_what_is_wrong_with_metrics_and_config_is_named(tmp_path):
    """Two runs logged into one folder, steps that are strings, rewards near the float maximum and
    a config that is a list: the report names each, and prints 1e+308 rather than 309 digits."""
    run = str(tmp_path / "run")
    _, _, metrics = make_run(run)
    for m in metrics[-5:]:
        m["reward"] = 1e308
    strings = [{**m, "step": str(m["step"])} for m in metrics[2:4]]
    write_jsonl(os.path.join(run, "metrics.jsonl"), metrics + metrics[5:8] + strings)
    with open(os.path.join(run, "train_config.json"), "w") as f:
        json.dump([{"learning_rate": 1e-3}], f)
    (result,) = analyze.main([run])
    text, _ = report_of(os.path.join(run, "report"))
    path = os.path.join(run, "metrics.jsonl")
    assert (f"{path}: 3 step(s) logged more than once, the first step 5 (two runs written into "
            "one folder?)") in text
    assert f"{path}: skipped 2 line(s) whose step is not an integer (the first: '2')" in text
    assert (f"{os.path.join(run, 'train_config.json')}: holds a list, not an object of settings"
            in text)
    assert "1e+308 over the last 5" in text and not re.search(r"\d{20}", text)
    assert result["training"]["reward_last5"] == 1e308
    assert_figures_readable(os.path.join(run, "report"), text)


@pytest.mark.parametrize("setting, value, kind", [
    ("choice_temperature", 0, "a positive number"),
    ("choice_temperature", "1", "a positive number"),
    ("max_new_tokens", "24", "a positive integer"),
    ("val_data", ["val.jsonl"], "a string"),
])
def test_a_setting_of_the_wrong_kind_is_named_and_its_default_used(tmp_path, setting, value, kind):
    run = str(tmp_path / "run")
    make_run(run, config={"rollout": "generate", setting: value})
    write_jsonl(os.path.join(run, "samples.jsonl"),
                [{"step": 1, "ctx": "A man walks.", "continuation": " He stops.", "reward": 1}])
    (result,) = analyze.main([run])
    text, _ = report_of(os.path.join(run, "report"))
    assert f"train_config.json: {setting} is {value!r}, not {kind}; its default is used" in text
    assert result["comparisons"]["last"]["acc_norm"]


def test_logged_evaluations_that_are_not_accuracies_are_left_out(tmp_path):
    run = str(tmp_path / "run")
    _, _, metrics = make_run(run)
    os.remove(run_management.eval_predictions_path(run, 10))
    metrics[10].update({"eval/acc": 1e308, "eval/n": float("inf")})
    write_jsonl(os.path.join(run, "metrics.jsonl"), metrics)
    (result,) = analyze.main([run])
    text, _ = report_of(os.path.join(run, "report"))
    assert [r["step"] for r in result["evaluations"]] == [0, 20]
    assert "step 10: eval/acc, eval/acc_norm and eval/n are not accuracies" in text


def test_validation_text_that_is_not_valid_unicode_is_a_note(tmp_path):
    """A lone surrogate (json.loads takes the escape "\\ud800") in --data: named in one line, file,
    line and field, and the report comes without the lengths."""
    run = str(tmp_path / "run")
    examples, _, _ = make_run(run)
    bad = [{**ex, "ctx": ex["ctx"] + " \ud800"} for ex in examples]
    (result,) = analyze.main([run, "--data", write_examples(tmp_path, bad)])
    text, _ = report_of(os.path.join(run, "report"))
    assert ("val40.jsonl, line 1: field 'ctx': holds a lone surrogate (U+D800) at character "
            f"{len(examples[0]['ctx']) + 1}, which is not valid Unicode text") in text
    assert "lengths" not in result and result["comparisons"]["last"]["acc_norm"]


def test_prediction_files_that_are_not_valid_unicode_are_refused_alike(tmp_path, capsys):
    examples = val_examples(10)
    a, b = predictions(examples, 0.0, seed=1), predictions(examples, 0.9, seed=2)
    b[4]["activity_label"] = "Paint \ud800"
    paths = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    write_jsonl(paths[0], a)
    write_jsonl(paths[1], b)
    message = (f"{paths[1]}, line 5: 'activity_label' holds a lone surrogate (U+D800) at "
               "character 6, which is not valid Unicode text")
    for err in refusals_of_both(paths, tmp_path, capsys):
        assert err.startswith(f"error: {message}")


def refusals_of_both(paths, tmp_path, capsys):
    """What hellaswag.py --compare and analyze.py --before/--after print refusing two prediction
    files: each one line and exit 2."""
    errors = []
    for cli, argv in ((hellaswag.main, ["--compare", *paths]),
                      (analyze.main, ["--before", paths[0], "--after", paths[1], "--out",
                                      str(tmp_path / "report")])):
        with pytest.raises(SystemExit) as e:
            common.run_cli(cli, argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        errors.append(err)
    return errors


def test_a_run_folder_whose_name_is_not_utf8(tmp_path):
    """Linux names are bytes: Python reads b"\\xe9" as the lone surrogate "\\udce9", which reaches
    the title, the labels in the figures and the samples."""
    runs = [str(tmp_path / name) for name in ("caf\udce9", "b")]
    for run in runs:
        make_run(run, config={"rollout": "generate"})
    write_jsonl(os.path.join(runs[0], "samples.jsonl"),
                [{"step": 1, "ctx": "A \ud800.", "continuation": " He \udce9.", "reward": 0.5}])
    analyze.main(runs + ["--out", str(tmp_path / "out")])
    text, _ = report_of(str(tmp_path / "out"))
    assert "caf\\udce9" in text and "He \\udce9." in text
    assert_figures_readable(str(tmp_path / "out"), text)


def test_length_pairs_of_partly_labelled_predictions():
    examples = [{"endings": ["a", "bb", "ccc", "dddd"], "label": 3},
                {"endings": ["aaaaaa", "b", "c", "d"], "label": 0}]
    evaluation = {"name": "step 0", "step": 0, "predictions": [
        {"index": 0, "label": None, "pred_norm": 0}, {"index": 1, "label": 0, "pred_norm": 0}]}
    (row,) = analyze.length_bias([evaluation], examples)
    assert row["chosen_minus_gold"] == [0] and row["gold_is_longest"] == 1.0
    assert row["gold_chars"] == 6 and row["chosen_chars"] == 3.5


def test_prediction_lines_without_a_label_key_are_unlabelled(tmp_path):
    examples = val_examples(20)
    paths = []
    for name, skill in (("a", 0.2), ("b", 0.8)):
        records = predictions(examples, skill, seed=len(paths))
        for r in records:
            del r["label"]
        write_jsonl(str(tmp_path / f"{name}.jsonl"), records)
        paths.append(str(tmp_path / f"{name}.jsonl"))
    (result,) = analyze.main(["--before", paths[0], "--after", paths[1],
                              "--out", str(tmp_path / "out")])
    assert "acc_norm" not in result["comparisons"]["last"]
    assert result["comparisons"]["last"]["changed_choices"] > 0


def test_a_curve_panel_without_data_says_not_logged(tmp_path, monkeypatch):
    """Unlabelled evaluations give no accuracy curve: the panel says so instead of empty axes."""
    run = str(tmp_path / "run")
    make_run(run, labelled=False)
    figures, save = {}, analyze.save_figure

    def keep(fig, path):
        figures[os.path.basename(path)] = fig
        return save(fig, path)

    monkeypatch.setattr(analyze, "save_figure", keep)
    analyze.main([run])
    panels = {ax.get_title(): ax for ax in figures["curves.png"].axes}
    assert [t.get_text() for t in panels["eval acc / acc_norm (95% CI)"].texts] == ["not logged"]
    assert not panels["reward"].texts and panels["reward"].has_data()


def test_a_generate_run_with_nothing_logged_has_no_empty_figure(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text(json.dumps({"rollout": "generate"}))
    (result,) = analyze.main([str(run)])
    text, _ = report_of(str(run / "report"))
    assert "generate" not in result and not (run / "report" / "generate.png").exists()
    assert "a generate run without metrics or samples" in text


def test_a_run_with_one_evaluation(tmp_path):
    run = str(tmp_path / "run")
    make_run(run, skills=(0.0,))
    (result,) = analyze.main([run])
    text, _ = report_of(os.path.join(run, "report"))
    assert result["comparisons"] == {} and "only one evaluation (step 0)" in text
    assert len(result["evaluations"]) == 1
    assert_figures_readable(os.path.join(run, "report"), text)


def test_a_run_without_labels(tmp_path):
    run = str(tmp_path / "run")
    _, evals, _ = make_run(run, labelled=False)
    (result,) = analyze.main([run])
    text, _ = report_of(os.path.join(run, "report"))
    assert "carry no gold labels" in text and result["evaluations"] == []
    c = result["comparisons"]["last"]
    assert "acc_norm" not in c
    assert c["changed_choices"] == sum(p["pred_norm"] != q["pred_norm"]
                                       for p, q in zip(evals[0], evals[20]))
    assert f"{c['changed_choices']} of 60 choices changed" in text
    with pytest.raises(UserError, match="label"):  # --compare still needs labels
        hellaswag.read_predictions(run_management.eval_predictions_path(run, 0))
    assert_figures_readable(os.path.join(run, "report"), text)


def test_an_interrupted_run(tmp_path):
    run = str(tmp_path / "run")
    _, evals, metrics = make_run(run)
    os.remove(os.path.join(run, "train_config.json"))
    os.remove(run_management.eval_predictions_path(run, 20))  # killed while evaluating
    with open(run_management.eval_predictions_path(run, 10), "w") as f:
        f.write('{"index": 0, "label": 1}\n')  # not a prediction file any more
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"step": 21, "reward": 0.4, "kl"')  # the last line cut off
    (result,) = analyze.main([run])
    text, _ = report_of(os.path.join(run, "report"))
    assert ("train_config.json: missing" in text
            and "skipped 1 unreadable line(s), first line 22" in text)
    assert "only one evaluation (step 0)" in text and "not a prediction line" in text
    assert "validation text not found" in text
    assert result["training"]["steps"] == metrics[-1]["step"]  # the torn line is not a step
    # the evaluations whose files are lost come from metrics.jsonl
    assert [(r["step"], r["acc_norm"]) for r in result["evaluations"]] == [
        (m["step"], m["eval/acc_norm"]) for m in metrics if "eval/acc_norm" in m]
    assert_figures_readable(os.path.join(run, "report"), text)


def refuse_to_list(monkeypatch, folder):
    """os.listdir(folder) fails as in a folder of mode 000 (tests run as root, which reads
    those)."""
    listdir = os.listdir

    def listdir_or_refuse(path="."):
        if os.path.abspath(path) == os.path.abspath(folder):
            raise PermissionError(13, "Permission denied", path)
        return listdir(path)

    monkeypatch.setattr(os, "listdir", listdir_or_refuse)


def test_unreadable_folders_of_a_run_are_notes(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    make_run(run)
    os.makedirs(os.path.join(run, "teacher_cache"))
    consequences = {"eval": "so the before/after comparison", "teacher_cache": "so not used"}
    for folder, consequence in consequences.items():
        refuse_to_list(monkeypatch, os.path.join(run, folder))
        (result,) = analyze.main([run])
        monkeypatch.undo()
        text, _ = report_of(os.path.join(run, "report"))
        path = os.path.join(run, folder)
        assert f"{path}: cannot read (Permission denied), {consequence}" in text
    assert result["comparisons"] and result["evaluations"]  # the eval files are read again


def test_an_unreadable_run_directory_is_one_line(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    make_run(run)
    refuse_to_list(monkeypatch, run)
    with pytest.raises(UserError, match=f"^{run}: cannot read the run directory "
                                        r"\(Permission denied\)$"):
        analyze.main([run])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a folder of mode 000")
def test_an_eval_folder_of_mode_000(tmp_path):
    run = str(tmp_path / "run")
    make_run(run)
    os.chmod(os.path.join(run, "eval"), 0)
    try:
        result = run_cli(run)
    finally:
        os.chmod(os.path.join(run, "eval"), 0o755)
    assert result.returncode == 0, result.stderr
    text, _ = report_of(os.path.join(run, "report"))
    assert "eval: cannot read (Permission denied)" in text


def test_a_run_without_any_files(tmp_path):
    (result,) = analyze.main([str(tmp_path)])
    text, _ = report_of(str(tmp_path / "report"))
    assert "no training curves" in text and "no per-example predictions" in text
    assert result["evaluations"] == [] and result["comparisons"] == {}


def test_a_generate_run(tmp_path):
    run = str(tmp_path)
    with open(os.path.join(run, "train_config.json"), "w") as f:
        json.dump({"rollout": "generate", "reward_kind": "likelihood", "max_new_tokens": 6}, f)
    write_jsonl(os.path.join(run, "metrics.jsonl"),
                [{"step": s, "reward": -s / 10, "kl": s / 5} for s in range(1, 5)])
    texts = [" the dog ran away.", " and then she walked and walked and", " he stops", " yes!"]
    write_jsonl(os.path.join(run, "samples.jsonl"),
                [{"step": s, "ctx": "A man walks a dog.", "continuation": t, "reward": 0.1}
                 for s in (2, 4) for t in texts])
    (result,) = analyze.main([run])
    encode = gpt2_encoding().encode_ordinary
    stopped = [len(encode(t)) < 6 or t.endswith((".", "!")) for t in texts]
    rows = result["generate"]["samples"]
    assert [r["step"] for r in rows] == [2, 4]
    assert rows[0]["stop_rate"] == pytest.approx(sum(stopped) / 4) and 0 < rows[0]["stop_rate"] < 1
    assert rows[0]["response_tokens"] == pytest.approx(sum(len(encode(t)) for t in texts) / 4)
    text, _ = report_of(os.path.join(run, "report"))
    assert "## Generate rollouts" in text and "the dog ran away." in text
    assert_figures_readable(os.path.join(run, "report"), text)
    # a run that logged them (train_ppo.py does) reads response length and stop rate from
    # metrics.jsonl
    write_jsonl(os.path.join(run, "metrics.jsonl"),
                [{"step": s, "reward": -s / 10, "kl": s / 5, "train/response_length": 6 - s,
                  "train/stop_rate": s / 4, "train/judge_score": -4 + s / 2} for s in range(1, 5)])
    (result,) = analyze.main([run])
    assert result["generate"]["samples"] == [
        {"step": s, "response_tokens": 6 - s, "stop_rate": s / 4} for s in range(1, 5)]
    assert result["generate"]["judge_score"] == [(s, -4 + s / 2) for s in range(1, 5)]
    text, _ = report_of(os.path.join(run, "report"))
    assert ("judge's raw score (its mean log-prob of the non-empty samples, before normalising, "
            "clipping and penalties) went -3.500 → -2.000") in text
    assert_figures_readable(os.path.join(run, "report"), text)


def test_distinct_ngrams_counts_repeated_word_pairs():
    assert analyze.distinct_ngrams(["a b c d"]) == 1.0
    assert analyze.distinct_ngrams(["a b a b a b"]) == pytest.approx(2 / 5)  # ab, ba only
    assert analyze.distinct_ngrams(["yes", ""]) is None


def generate_run(run, judge, acc_norm, lengths, texts_first, texts_last):
    """A generate run: the judge's score and the response length per step, an evaluation at the
    first and last step (acc_norm of 200 examples), samples kept at both."""
    with open(os.path.join(run, "train_config.json"), "w") as f:
        json.dump({"rollout": "generate", "reward_kind": "likelihood", "max_new_tokens": 24}, f)
    steps = range(len(judge))
    evals = {0: acc_norm[0], steps[-1]: acc_norm[1]}
    write_jsonl(os.path.join(run, "metrics.jsonl"), [
        {"step": s, "reward": judge[s], "kl": s / 10, "train/judge_score": judge[s],
         "train/response_length": lengths[s], "train/stop_rate": 0.5,
         **({"eval/acc": evals[s], "eval/acc_norm": evals[s], "eval/n": 200}
            if s in evals else {})} for s in steps])
    write_jsonl(os.path.join(run, "samples.jsonl"),
                [{"step": step, "ctx": "A man walks a dog.", "continuation": t, "reward": 0.1}
                 for step, texts in ((0, texts_first), (steps[-1], texts_last)) for t in texts])
    (result,) = analyze.main([run])
    return result["generate"]["hacking_signs"], report_of(os.path.join(run, "report"))[0]


def test_a_generate_run_that_hacks_its_judge_is_flagged(tmp_path):
    varied = [" the dog runs to the park and sits.", " she opens the door, smiling.",
              " then he throws the ball far away."]
    signs, text = generate_run(str(tmp_path), judge=[-4 + s / 5 for s in range(20)],
                               acc_norm=(0.40, 0.30), lengths=[20 - s * 0.8 for s in range(20)],
                               texts_first=varied, texts_last=[" the the the the the"] * 3)
    assert len(signs) == 3
    assert signs[0].startswith("the judge's score rose (-3.900 → -0.300) while eval acc_norm "
                               "fell (0.400 → 0.300")
    assert "length collapsed (20.0 → 4.8 tokens)" in signs[1]
    assert "distinct word 2-grams fell 1.00 → 0.08" in signs[2]
    assert "**Reward-hacking signs:**" in text and signs[2] in text


def test_a_generate_run_that_learns_is_not_flagged(tmp_path):
    varied = [" the dog runs to the park and sits.", " she opens the door, smiling.",
              " then he throws the ball far away."]
    # the judge's score rises, the evaluation holds within noise, lengths and variety hold
    signs, text = generate_run(str(tmp_path), judge=[-4 + s / 5 for s in range(20)],
                               acc_norm=(0.40, 0.38), lengths=[20 - s * 0.2 for s in range(20)],
                               texts_first=varied, texts_last=varied[::-1])
    assert signs == [] and "No reward-hacking sign among those checked" in text


# --------------------------------------------------------------------------------------------------
# the command line


def run_cli(*args):
    return subprocess.run([sys.executable, "analyze.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_two_prediction_files(tmp_path):
    examples = val_examples()
    data = str(tmp_path / "val.jsonl")
    write_jsonl(data, examples)
    a, b = predictions(examples, 0.0, seed=1), predictions(examples, 0.9, seed=2)
    write_jsonl(str(tmp_path / "a.jsonl"), a)
    write_jsonl(str(tmp_path / "b.jsonl"), b)
    out = str(tmp_path / "report")
    result = run_cli("--before", str(tmp_path / "a.jsonl"), "--after", str(tmp_path / "b.jsonl"),
                     "--data", data, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "report.md" in result.stdout
    text, (report,) = report_of(out)
    expected = hellaswag.compare_predictions(a, b)["acc_norm"]
    assert report["comparisons"]["last"]["acc_norm"] == as_json(expected)
    assert f"{expected['diff']:+.3f}" in text
    assert_figures_readable(out, text)


def test_compare_and_analyze_agree_on_files_of_different_lengths(tmp_path, capsys):
    """One file made with --limit: hellaswag.py --compare and analyze.py --before/--after both
    compare the examples the two files cover, with the same numbers, and say so."""
    examples = val_examples()
    a, b = predictions(examples, 0.0, seed=1), predictions(examples, 0.9, seed=2)[:40]
    paths = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    write_jsonl(paths[0], a)
    write_jsonl(paths[1], b)
    hellaswag.main(["--compare", *paths])
    printed = capsys.readouterr().out
    (result,) = analyze.main(["--before", paths[0], "--after", paths[1],
                              "--out", str(tmp_path / "report")])
    expected = hellaswag.paired_difference([p["pred_norm"] == p["label"] for p in a[:40]],
                                           [p["pred_norm"] == p["label"] for p in b])
    last = result["comparisons"]["last"]
    assert last["acc_norm"] == expected and last["n"] == 40
    note = "compared on the 40 examples both cover (60 and 40 evaluated)"
    assert f"note: {note}" in printed
    assert (f"acc_norm    {expected['acc_a']:.4f}  {expected['acc_b']:.4f}  "
            f"{expected['diff']:+.4f}") in printed
    text, _ = report_of(str(tmp_path / "report"))
    assert note in text


@pytest.mark.parametrize("other", ["another ind", "another label", "no index in common"])
def test_compare_and_analyze_refuse_files_of_different_data_alike(tmp_path, capsys, other):
    """Two prediction files the user gave, of different data: one line and exit 2 from both tools,
    before anything is written."""
    examples = val_examples()
    a, b = predictions(examples, 0.0, seed=1), predictions(examples, 0.9, seed=2)
    change = {"another ind": lambda p: {**p, "ind": p["ind"] + 1000},
              "another label": lambda p: {**p, "label": (p["label"] + 1) % 4},
              "no index in common": lambda p: {**p, "index": p["index"] + 1000}}[other]
    paths = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    write_jsonl(paths[0], a)
    write_jsonl(paths[1], [change(p) for p in b])
    lines = refusals_of_both(paths, tmp_path, capsys)
    assert lines[0] == lines[1], lines
    assert ("not predictions of the same data" in lines[0]
            or "prediction files of different data" in lines[0])
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_predictions_with_scores_that_are_not_finite(tmp_path, bad):
    """A model that overflowed writes NaN or -inf norm_scores: the report still comes, with
    accuracies and without the calibration of that evaluation, and says why."""
    examples = val_examples()
    a, b = predictions(examples, 0.0, seed=1), predictions(examples, 0.9, seed=2)
    b[3]["norm_scores"] = [bad] * 4
    write_jsonl(str(tmp_path / "a.jsonl"), a)
    write_jsonl(str(tmp_path / "b.jsonl"), b)
    out = str(tmp_path / "report")
    result = run_cli("--before", str(tmp_path / "a.jsonl"), "--after", str(tmp_path / "b.jsonl"),
                     "--out", out)
    assert result.returncode == 0, result.stderr
    text, (report,) = report_of(out)
    assert report["comparisons"]["last"]["acc_norm"] == as_json(
        hellaswag.compare_predictions(a, b)["acc_norm"])
    assert (report["calibration"]["after (b.jsonl)"] is None
            and report["calibration"]["before (a.jsonl)"]["ece"] >= 0)
    assert "1 prediction(s) with norm_scores that are not finite numbers" in text


@pytest.mark.parametrize("args, message", [
    (["--before", "a.jsonl"], "give both --before"),
    (["--before", "nothing.jsonl", "--after", "nothing.jsonl", "--out", "x"],
     "nothing.jsonl: no such file"),
    (["no/such/run"], "no/such/run: no such run directory"),
    (["--before", "a.jsonl", "--after", "a.jsonl", "--out", "README.md"],
     "README.md: an existing file, not a directory"),
    ([], "give run directories"),
    (["--before", "a.jsonl", "--after", "b.jsonl", "--data", "no.jsonl", "--out", "x"],
     "--data no.jsonl: no such file"),
    (["--before", "a.jsonl", "--after", "b.jsonl", "--out", "tests"],
     "--out tests: holds"),
])
def test_cli_errors_are_one_line(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr


# --------------------------------------------------------------------------------------------------
# a real tiny run


@pytest.mark.slow
def test_report_of_a_tiny_training_run(tmp_path):
    task = str(tmp_path / "task")
    synthetic.prepare(task, n_train=200, n_val=40, seed=0, teacher_steps=5, policy_steps=5,
                      log=lambda *a: None)
    run = str(tmp_path / "run")
    settings = dict(out_dir=run, init_from="synthetic", synthetic=True, synthetic_dir=task,
                    device="cpu", batch_size=8, minibatch_size=8, micro_batch_size=8, ppo_epochs=1,
                    learning_rate=3e-3, max_steps=2, eval_interval=1, checkpoint_interval=100,
                    sample_interval=1, export_hf=False)
    train_ppo.train(train_ppo.load_config([f"--{k}={v}" for k, v in settings.items()]))
    (result,) = analyze.main([run])
    with open(os.path.join(run, "metrics.jsonl")) as f:
        logged = [m for m in map(json.loads, f) if "eval/acc_norm" in m]
    assert [r["step"] for r in result["evaluations"]] == [m["step"] for m in logged] == [0, 1, 2]
    for row, m in zip(result["evaluations"], logged):
        assert (row["acc_norm"] == pytest.approx(m["eval/acc_norm"])
                and row["n"] == m["eval/n"] == 40)
    read = [hellaswag.read_predictions(run_management.eval_predictions_path(run, s))
            for s in (0, 2)]
    assert (result["comparisons"]["last"]["acc_norm"]
            == hellaswag.compare_predictions(*read)["acc_norm"])
    assert result["training"]["steps"] == 2 and math.isfinite(result["training"]["reward_last5"])
    text, _ = report_of(os.path.join(run, "report"))
    # a teacher run writes its teacher's picks at step 0, so agreement is computed from them
    teacher = hellaswag.read_predictions(run_management.eval_predictions_path(run, "teacher"))
    agree = [t["pred_norm"] == p["pred_norm"] for t, p in zip(teacher, read[1])]
    assert result["teacher"]["agreement"]["acc_b"] == pytest.approx(sum(agree) / len(agree))
    assert_figures_readable(os.path.join(run, "report"), text)
