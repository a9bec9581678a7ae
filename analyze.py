"""
What did PPO do to the model's commonsense reasoning? A report (report.md, report.json and PNG
figures) that reads a training run's out_dir as it is, or two prediction files.

    # -> out/demo/report/report.md
    python analyze.py out/demo
    # several runs, curves on the same axes
    python analyze.py out/lr1e-5 out/lr3e-5 --out out/sweep
    # models trained elsewhere
    python analyze.py --before A.jsonl --after B.jsonl --data val.jsonl --out report

A run is read from what train_ppo.py writes: train_config.json, metrics.jsonl, samples.jsonl and
eval/step_*.jsonl (hellaswag.py's --predictions schema). eval/teacher.jsonl (or --teacher), the
teacher's own predictions on the validation data, adds agreement with the teacher. Anything missing,
cut off or unlabelled is skipped, and the report says what could not be computed and why. The paired
statistics are hellaswag.py's (the ones --compare prints); this file adds only intervals for one
accuracy and the calibration error. The report folder is written whole and replaces --out, which may
hold nothing but an earlier report.
"""

import argparse
import json
import math
import os
import re

import torch
# the object API: no pyplot, no display, no global backend state
from matplotlib.figure import Figure
from matplotlib.text import Text

import hellaswag
from common import (UserError, atomic_directory, atomic_path, atomic_write_text,
                    check_output_path, read_json_objects, run_cli)
from reward import REWARD_KINDS
from tokenizer import gpt2_tokens

# groups with fewer examples get intervals too wide (or too narrow, at n < 5) to trust
SMALL_GROUP = 30
MAX_GROUPS = 25  # largest groups per field shown in the group figure
MAX_FLIPS = 5  # flipped examples quoted per direction
CALIBRATION_BINS = 10
# keys that name where a run lives rather than what it did: never used to tell runs apart
PLACE_KEYS = ("out_dir", "synthetic_dir", "teacher_cache", "data_cache", "wandb_run_name",
              "wandb_project", "device", "start_over")
# what a report folder holds: its text, its data and its figures (a sweep's with a runN_ prefix),
# and what a killed writer may have left of them (common.atomic_path's temporary names)
REPORT_FILE = (r"report\.(?:md|json)|curves\.png"
               r"|(?:run\d+_)?(?:groups_(?:last|best)|lengths|calibration|generate)\.png")
REPORT_ENTRY = re.compile(rf"(?:{REPORT_FILE})|\.(?:{REPORT_FILE})\.\w+\.tmp")
DRAWABLE = 1e300
WITHOUT_PREDICTIONS = ("the before/after comparison, flips, groups, lengths and calibration "
                       "cannot be computed")
CURVES = [("reward", "reward"), ("kl", "KL to the reference"),
          ("eval", "eval acc / acc_norm (95% CI)"), ("approx_kl", "approx_kl"),
          ("clipfrac", "clipfrac"), ("entropy", "entropy"), ("explained_var", "explained variance"),
          ("lr", "learning rate"), ("kl_coef", "KL coefficient")]

# --------------------------------------------------------------------------------------------------
# statistics this report adds to hellaswag.py's paired ones


def wilson_interval(correct, n, z=1.96):
    """95% Wilson score interval of an accuracy of correct / n (sensible at 0, 1 and small n, unlike
    the normal interval)."""
    if n == 0:
        return [0.0, 1.0]
    p = correct / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, center - half), min(1.0, center + half)]


def choice_logprobs(scores, temperature=1.0):
    """log softmax(scores / temperature): for norm_scores, the choice rollouts' policy over
    endings, in logs (none underflows)."""
    top = max(scores)
    log_total = math.log(sum(math.exp((s - top) / temperature) for s in scores))
    return [(s - top) / temperature - log_total for s in scores]


def choice_probabilities(scores, temperature=1.0):
    """softmax(scores / temperature)."""
    return [math.exp(logp) for logp in choice_logprobs(scores, temperature)]


def calibration(confidences, correct, n_bins=CALIBRATION_BINS):
    """Equal-width confidence bins -> {"bins": [{lo, hi, n, confidence, accuracy}], "ece"}; the
    expected calibration error is the bins' |accuracy - mean confidence| weighted by their share of
    the examples."""
    bins = [{"lo": b / n_bins, "hi": (b + 1) / n_bins, "n": 0, "confidence": 0.0, "accuracy": 0.0}
            for b in range(n_bins)]
    for confidence, right in zip(confidences, correct):
        b = bins[min(int(confidence * n_bins), n_bins - 1)]
        b["n"] += 1
        b["confidence"] += confidence
        b["accuracy"] += float(right)
    for b in bins:
        if b["n"]:
            b["confidence"] /= b["n"]
            b["accuracy"] /= b["n"]
    total = sum(b["n"] for b in bins)
    ece = (sum(b["n"] * abs(b["accuracy"] - b["confidence"]) for b in bins) / total
           if total else float("nan"))
    return {"bins": bins, "ece": ece}


def mean(values):
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def finite_mean(values):
    """The mean of the finite numbers among values (a step skipped as non-finite logs NaN), or
    None; each is divided before the sum, which values near the float maximum would overflow."""
    values = [v for v in values if is_number(v) and math.isfinite(v)]
    return sum(v / len(values) for v in values) if values else None


def drawable(value):
    """A finite number short of the float maximum, near which matplotlib's axis limits overflow
    (a constant curve at 1e308 cannot be drawn)."""
    return is_number(value) and math.isfinite(value) and abs(value) < DRAWABLE


def positive_integer(value):
    return drawable(value) and value == int(value) and value > 0


def short(value, width=40):
    """repr(value), cut to width characters."""
    text = repr(value)
    return text if len(text) <= width else text[:width - 1] + "…"


def readable(x, digits=3):
    """x with `digits` decimals, or in scientific notation where that would print more than a
    dozen digits: 1e+308, not 309 of them."""
    if not abs(x) >= 1e9:  # NaN too
        return f"{x:.{digits}f}"
    try:
        return f"{x:.{digits}g}"
    except OverflowError:  # an integer beyond the float maximum
        text = str(abs(x))
        return f"{'-' * (x < 0)}{text[0]}e+{len(text) - 1}"


# --------------------------------------------------------------------------------------------------
# reading a run as it is: every file may be missing, cut off or from an older version


def read_records(path, notes):
    """The JSON objects of a JSON-lines file; a missing file is None, and unreadable lines (the last
    one cut off by an interrupted run) are skipped with a note instead of stopping the report."""
    if not os.path.isfile(path):
        return None
    try:
        records, bad = read_json_objects(path)
    except OSError as e:
        notes.append(f"{path}: cannot read ({e.strerror})")
        return None
    if bad:
        notes.append(f"{path}: skipped {len(bad)} unreadable line(s), first line {bad[0]} "
                     "(cut off by an interrupted run?)")
    return records


# the settings this report reads, and what each must be ("" or null: the default)
SETTINGS = {"choice_temperature": ("a positive number", lambda v: drawable(v) and v > 0),
            "max_new_tokens": ("a positive integer", positive_integer),
            "stop_at_sentence_end": ("true or false", lambda v: isinstance(v, bool)),
            "synthetic": ("true or false", lambda v: isinstance(v, bool)),
            **{key: ("a string", lambda v: v is None or isinstance(v, str))
               for key in ("rollout", "reward_kind", "val_data", "synthetic_dir", "data_cache",
                           "teacher_cache")}}
JSON_KINDS = {"list": "a list", "str": "a string", "int": "a number", "float": "a number",
              "bool": "true or false", "NoneType": "null"}


def has_teacher(reward_kind):
    """Whether a run of this reward kind has a teacher whose picks it evaluates at step 0."""
    return reward_kind in REWARD_KINDS and REWARD_KINDS[reward_kind].picks


def has_judge(reward_kind):
    """Whether a run of this reward kind scored with its reward_model (one of a kind this code
    does not know is taken to have)."""
    kind = REWARD_KINDS.get(reward_kind)
    return kind is None or kind.judge


def read_config(run_dir, notes):
    path = os.path.join(run_dir, "train_config.json")
    if not os.path.isfile(path):
        notes.append(f"{path}: missing, so runs cannot be labelled by their settings and the "
                     "validation text is not found unless --data is given")
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, RecursionError, ValueError) as e:
        notes.append(f"{path}: unreadable ({type(e).__name__}); settings unknown")
        return {}
    if not isinstance(config, dict):
        kind = JSON_KINDS.get(type(config).__name__, type(config).__name__)
        notes.append(f"{path}: holds {kind}, not an object of settings; settings unknown")
        return {}
    for key, (kind, fits) in SETTINGS.items():
        if key in config and not fits(config[key]):
            notes.append(f"{path}: {key} is {short(config.pop(key))}, not {kind}; its default "
                         "is used")
    return config


def read_metrics(run_dir, notes):
    """metrics.jsonl's records with an integer step, one per step, in step order. A step logged
    twice (two runs written into one folder; a resume drops what it redoes) or a line without an
    integer step is noted: the last line of a step is the one used."""
    path = os.path.join(run_dir, "metrics.jsonl")
    steps, repeated, no_step = {}, [], []
    for r in read_records(path, notes) or []:
        step = r.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            no_step.append(step)
            continue
        if step in steps:
            repeated.append(step)
        steps[step] = r
    if no_step:
        notes.append(f"{path}: skipped {len(no_step)} line(s) whose step is not an integer "
                     f"(the first: {short(no_step[0])})")
    if repeated:
        notes.append(f"{path}: {len(set(repeated))} step(s) logged more than once, the first "
                     f"step {readable(repeated[0], 0)} (two runs written into one folder?); the "
                     "curves use the last line of each")
    if not steps:
        notes.append(f"{path}: missing or empty, so there are no training curves")
    return [steps[s] for s in sorted(steps)]


def list_folder(path, notes, consequence="not used"):
    """The names in a folder, [] for a missing one, or None with a note saying the consequence for
    one that cannot be read (its permissions, say)."""
    if not os.path.isdir(path):
        return []
    try:
        return os.listdir(path)
    except OSError as e:
        notes.append(f"{path}: cannot read ({e.strerror}), so {consequence}")
        return None


def read_evaluations(run_dir, notes):
    """[{"name", "step", "predictions"}] from out_dir/eval/step_NNNNNN.jsonl, in step order."""
    eval_dir = os.path.join(run_dir, "eval")
    names = list_folder(eval_dir, notes, WITHOUT_PREDICTIONS)
    if names is None:
        return []
    evaluations = []
    for name in names:
        match = re.fullmatch(r"step_(\d+)\.jsonl", name)
        if match:
            predictions = read_prediction_file(os.path.join(eval_dir, name), notes)
            if predictions is not None:
                step = int(match.group(1))
                evaluations.append({"name": f"step {step}", "step": step,
                                    "predictions": predictions})
    evaluations.sort(key=lambda e: e["step"])  # by number: step_10 after step_9, padded or not
    if not evaluations:
        notes.append(f"{eval_dir}: no per-example predictions (older runs have none), so "
                     + WITHOUT_PREDICTIONS)
    return evaluations


def read_prediction_file(path, notes):
    try:
        return hellaswag.read_predictions(path, require_labels=False)
    except UserError as e:
        notes.append(f"skipped: {e}")
        return None


def val_data_path(config, run_dir):
    """Where the run's validation text is on this machine, or None: the files are never downloaded
    here."""
    if config.get("synthetic"):
        folder = config.get("synthetic_dir") or os.path.join(run_dir, "synthetic")
        return os.path.join(folder, "val.jsonl")
    spec = config.get("val_data")
    if not isinstance(spec, str):
        return None
    if spec.startswith("hellaswag:"):
        folder = config.get("data_cache") or hellaswag.default_cache_dir()
        return os.path.join(folder, f"hellaswag_{spec.split(':', 1)[1]}.jsonl")
    return spec


def predicts(prediction, examples):
    """Whether a prediction line can be of examples[its index]: the index is in range and the gold
    label and the data's ind, where the line records them, are that example's."""
    if prediction["index"] >= len(examples):
        return False
    example = examples[prediction["index"]]
    return (prediction.get("label") in (None, example["label"])
            and prediction.get("ind") in (None, example.get("ind")))


def read_examples(path, evaluations, notes):
    """The validation examples every evaluation's predictions index, or None (with a note) when the
    text is not here or is other data."""
    if path is None or not os.path.isfile(path):
        notes.append(f"validation text not found ({path or 'no val_data in the config'}; "
                     "pass --data FILE): flipped examples are shown by index only, and ending "
                     "lengths cannot be computed")
        return None
    try:
        examples = hellaswag.load_examples(data_file=path)
    except UserError as e:
        notes.append(f"validation text unreadable ({e}); ending lengths cannot be computed")
        return None
    for e in evaluations:
        for p in e["predictions"]:
            if not predicts(p, examples):
                notes.append(f"{path} is not the data these predictions were made on (example "
                             f"{p['index']} differs); ending lengths cannot be computed")
                return None
    return examples


def teacher_cache_note(run_dir, config, notes):
    """What the teacher cache holds. It scores the *training* examples (reward.TeacherReward, keyed
    by the teacher, style and training text), so it says nothing about the validation examples the
    evaluations predict."""
    folder = config.get("teacher_cache") or os.path.join(run_dir, "teacher_cache")
    files = sorted(f for f in list_folder(folder, notes) or [] if f.endswith(".pt"))
    if not files:
        return None
    counts = []
    for name in files:
        try:
            cache = torch.load(os.path.join(folder, name), map_location="cpu", weights_only=True)
            scored = cache["sum_logprob"][:, 0]
            counts.append(f"{name}: {int((~torch.isnan(scored)).sum())} of {scored.numel()} "
                          "training examples scored")
        # any unreadable cache is only reported: it is not needed for the report
        except Exception as e:
            counts.append(f"{name}: unreadable ({type(e).__name__})")
    return ("the teacher cache holds the teacher's scores of training examples, not of the "
            "validation examples the evaluations predict, so it cannot give agreement on them ("
            + "; ".join(counts) + ")")


def load_run(run_dir, data=None, teacher=None):
    notes = []
    config = read_config(run_dir, notes)
    metrics = read_metrics(run_dir, notes)
    samples = read_records(os.path.join(run_dir, "samples.jsonl"), notes) or []
    evaluations = read_evaluations(run_dir, notes)
    examples = (read_examples(data or val_data_path(config, run_dir), evaluations, notes)
                if evaluations else None)
    teacher_path = teacher or os.path.join(run_dir, "eval", "teacher.jsonl")
    teacher_predictions = (read_prediction_file(teacher_path, notes)
                           if os.path.isfile(teacher_path) else None)
    return {"dir": run_dir, "label": os.path.basename(os.path.normpath(run_dir)), "config": config,
            "metrics": metrics, "samples": samples, "evaluations": evaluations,
            "examples": examples, "teacher": teacher_predictions,
            "teacher_cache": teacher_cache_note(run_dir, config, notes), "notes": notes}


def load_pair(before, after, data=None, teacher=None):
    """Two prediction files as a run with two evaluations and nothing else."""
    notes = []
    evaluations = []
    for name, path in (("before", before), ("after", after)):
        # here a bad file is the user's error
        predictions = hellaswag.read_predictions(path, require_labels=False)
        evaluations.append({"name": f"{name} ({os.path.basename(path)})", "step": None,
                            "predictions": predictions})
    # two files of different data are refused, as by hellaswag.py --compare, on the examples both
    # cover (a run's own evaluations of another set are a note in its report instead)
    a, b, _ = hellaswag.shared_examples(evaluations[0]["predictions"],
                                        evaluations[1]["predictions"], (before, after))
    hellaswag.check_same_examples(a, b, (before, after))
    examples = read_examples(data, evaluations, notes) if data else None
    if data is None:
        notes.append("no --data: flipped examples are shown by index only, and ending lengths "
                     "cannot be computed")
    teacher_predictions = read_prediction_file(teacher, notes) if teacher else None
    return {"dir": None, "label": f"{os.path.basename(before)} -> {os.path.basename(after)}",
            "config": {}, "metrics": [], "samples": [], "evaluations": evaluations,
            "examples": examples, "teacher": teacher_predictions, "teacher_cache": None,
            "notes": notes}


def label_runs(runs):
    """Name each run by the settings that differ between the runs that have a config (a sweep reads
    at a glance), else by its folder. A resumed run's init_from ("resume") says nothing of where it
    began, so it is left out of the comparison."""
    configs = [{k: v for k, v in r["config"].items()
                if k not in PLACE_KEYS and not (k == "init_from" and v == "resume")}
               for r in runs]
    known = [c for c in configs if c]
    keys = sorted({k for c in known for k in c})
    differ = [k for k in keys if len({json.dumps(c[k]) for c in known if k in c}) > 1]
    if len(runs) > 1 and differ:
        for r, c in zip(runs, configs):
            if c:
                r["label"] = ", ".join(f"{k}={c.get(k, '?')}" for k in differ)
    labels = [r["label"] for r in runs]
    for r in runs:  # two folders of the same name, say: the paths tell them apart
        if labels.count(r["label"]) > 1 and r["dir"]:
            r["label"] = f"{r['label']} ({r['dir']})"
    return differ


# --------------------------------------------------------------------------------------------------
# analysis of one run: plain dicts of numbers, which the report prints and report.json keeps


def is_labelled(predictions):
    return all(p.get("label") is not None for p in predictions)


def evaluation_table(run):
    """Accuracy with its interval at every evaluation: from the prediction files, else from
    metrics.jsonl."""
    rows = []
    for e in run["evaluations"]:
        preds = e["predictions"]
        if is_labelled(preds):
            correct = sum(p["pred"] == p["label"] for p in preds)
            correct_norm = sum(p["pred_norm"] == p["label"] for p in preds)
            rows.append({"name": e["name"], "step": e["step"], "n": len(preds),
                         "acc": correct / len(preds),
                         "acc_ci": wilson_interval(correct, len(preds)),
                         "acc_norm": correct_norm / len(preds),
                         "acc_norm_ci": wilson_interval(correct_norm, len(preds))})
    have = {row["step"] for row in rows}
    # steps whose file is lost: the logged value
    if all(is_labelled(e["predictions"]) for e in run["evaluations"]):
        rows += [row for m in run["metrics"]
                 if m["step"] not in have and (row := metrics_evaluation(m, run))]
    return sorted(rows, key=lambda row: -1 if row["step"] is None else row["step"])


def metrics_evaluation(m, run):
    """An evaluation logged in metrics.jsonl, or None: none logged at this step, or (with a note)
    values that are not accuracies of n examples."""
    if not any(k in m for k in ("eval/acc", "eval/acc_norm", "eval/n")):
        return None
    n, accuracies = m.get("eval/n"), [m.get(k) for k in ("eval/acc", "eval/acc_norm")]
    if not (positive_integer(n) and all(is_number(a) and 0 <= a <= 1 for a in accuracies)):
        path = os.path.join(run["dir"], "metrics.jsonl")
        run["notes"].append(f"{path}, step {readable(m['step'], 0)}: eval/acc, eval/acc_norm and "
                            "eval/n are not accuracies (0 to 1) of a number of examples; that "
                            "evaluation is left out")
        return None
    return {"name": f"step {readable(m['step'], 0)}", "step": m["step"], "n": n,
            "acc": m["eval/acc"], "acc_ci": wilson_interval(round(m["eval/acc"] * n), n),
            "acc_norm": m["eval/acc_norm"],
            "acc_norm_ci": wilson_interval(round(m["eval/acc_norm"] * n), n)}


def pick_comparisons(run, table):
    """(label, before, after) pairs: the first evaluation against the last and against the best (by
    acc_norm, as best.pt is chosen; ties go to the earliest)."""
    evaluations = run["evaluations"]
    if len(evaluations) < 2:
        return []
    first, last = evaluations[0], evaluations[-1]
    pairs = [("last", first, last)]
    acc_norm = {row["name"]: row["acc_norm"] for row in table}
    scored = [e for e in evaluations if e["name"] in acc_norm]
    if scored:
        # max keeps the first of equals: the earliest
        best = max(scored, key=lambda e: acc_norm[e["name"]])
        if best is not first and best is not last:
            pairs.append(("best", first, best))
    return pairs


def finite_scores(prediction):
    """Whether a prediction has norm_scores that make probabilities: numbers, none NaN or inf (a
    model that overflowed writes those)."""
    scores = prediction.get("norm_scores")
    return (isinstance(scores, list) and len(scores) > 0
            and all(isinstance(s, (int, float)) and math.isfinite(s) for s in scores))


def confidences(predictions, temperature):
    return [choice_probabilities(p["norm_scores"], temperature) if finite_scores(p) else None
            for p in predictions]


def choice_kl(before, after, temperature):
    """The mean over the examples of KL(after || before) between two evaluations' policies over
    the endings (softmax(norm_scores / temperature)), in nats: how far the model moved on them,
    measured alike for every way of training it. None if a prediction has no finite scores."""
    hellaswag.check_same_examples(before, after, ("before", "after"))
    if not all(finite_scores(p) for p in before + after):
        return None
    kls = []
    for p, q in zip(before, after):
        a, b = (choice_logprobs(x["norm_scores"], temperature) for x in (p, q))
        kls.append(sum(math.exp(lb) * (lb - la) for la, lb in zip(a, b)))
    return mean(kls)


def compare(run, before, after, temperature):
    """Everything "before vs after" says about one pair of evaluations."""
    a, b = before["predictions"], after["predictions"]
    result = {"before": before["name"], "after": after["name"], "before_step": before["step"],
              "after_step": after["step"]}
    names = (before["name"], after["name"])
    try:  # also checks that both are predictions of the same examples
        comparison = hellaswag.compare_predictions(a, b, names=names)
    except UserError as e:
        result["error"] = str(e)
        return result
    a, b, _ = hellaswag.shared_examples(a, b, names)  # the pairs compare_predictions compared
    result["n"] = comparison["n"]
    if "note" in comparison:
        result["note"] = comparison["note"]
    result["changed_choices"] = sum(p["pred_norm"] != q["pred_norm"] for p, q in zip(a, b))
    if not (is_labelled(a) and is_labelled(b)):
        return result
    result.update(acc=comparison["acc"], acc_norm=comparison["acc_norm"],
                  groups=comparison["groups"])
    probs_a, probs_b = confidences(a, temperature), confidences(b, temperature)
    flips = {"right_to_wrong": [], "wrong_to_right": []}
    for p, q, pa, pb in zip(a, b, probs_a, probs_b):
        right_before, right_after = p["pred_norm"] == p["label"], q["pred_norm"] == q["label"]
        if right_before != right_after:
            gold_change = pb[q["label"]] - pa[p["label"]] if pa and pb else None
            flips["wrong_to_right" if right_after else "right_to_wrong"].append(
                {"index": p["index"], "label": p["label"], "chosen_before": p["pred_norm"],
                 "chosen_after": q["pred_norm"], "p_gold_before": pa[p["label"]] if pa else None,
                 "p_gold_after": pb[q["label"]] if pb else None, "p_gold_change": gold_change})
    for direction in flips.values():
        direction.sort(key=lambda f: -abs(f["p_gold_change"] or 0))
    result["flips"] = flips
    return result


def calibration_of(predictions, temperature):
    """Calibration of the norm-score choice, the mean probability margin between the top two
    endings."""
    probs = confidences(predictions, temperature)
    if any(p is None for p in probs):
        return None
    top = [sorted(p, reverse=True) for p in probs]
    result = {"margin": mean(t[0] - t[1] for t in top), "margins": [t[0] - t[1] for t in top]}
    if is_labelled(predictions):
        result.update(calibration([t[0] for t in top],
                                  [p["pred_norm"] == p["label"] for p in predictions]))
    return result


def ending_length(ending):
    return len(ending.strip())


def length_bias(evaluations, examples):
    """Per evaluation: mean characters of the chosen ending and of the gold one, and how often each
    is the longest of the four. A policy that learns "pick the longest" instead of the task shows
    here."""
    rows = []
    for e in evaluations:
        chosen_lengths, chosen_longest, pairs, gold_longest = [], 0, [], 0
        for p in e["predictions"]:
            lengths = [ending_length(x) for x in examples[p["index"]]["endings"]]
            chosen_lengths.append(lengths[p["pred_norm"]])
            chosen_longest += lengths[p["pred_norm"]] == max(lengths)
            if p.get("label") is not None:  # (chosen, gold) of the same example
                pairs.append((lengths[p["pred_norm"]], lengths[p["label"]]))
                gold_longest += lengths[p["label"]] == max(lengths)
        n = len(e["predictions"])
        rows.append({"name": e["name"], "step": e["step"], "chosen_chars": mean(chosen_lengths),
                     "gold_chars": mean(g for _, g in pairs) if pairs else None,
                     "chosen_is_longest": chosen_longest / n,
                     "gold_is_longest": gold_longest / len(pairs) if pairs else None,
                     "chosen_minus_gold": [c - g for c, g in pairs] if pairs else None})
    return rows


def teacher_agreement(before, after, teacher, notes):
    """How often the policy picks what the teacher picks, before and after, with
    hellaswag.paired_difference on the agreement indicators; and, where the teacher is wrong, how
    often the policy makes the same mistake."""
    a, b = before["predictions"], after["predictions"]
    try:  # other data, or eval_limit changed on a resume: --compare's check of the same examples
        for evaluation in (before, after):
            hellaswag.check_same_examples(teacher, evaluation["predictions"],
                                          names=("the teacher", evaluation["name"]))
    except UserError as e:
        notes.append("the teacher's predictions are not on the same examples as the evaluations, "
                     f"so agreement is skipped: {e}")
        return None
    agree_a = [p["pred_norm"] == t["pred_norm"] for p, t in zip(a, teacher)]
    agree_b = [p["pred_norm"] == t["pred_norm"] for p, t in zip(b, teacher)]
    result = {"agreement": hellaswag.paired_difference(agree_a, agree_b)}
    if is_labelled(teacher):
        wrong = [i for i, t in enumerate(teacher) if t["pred_norm"] != t["label"]]
        result["teacher_acc_norm"] = 1 - len(wrong) / len(teacher)
        result["teacher_wrong"] = len(wrong)
        if wrong:
            result["copies_mistakes"] = hellaswag.paired_difference([agree_a[i] for i in wrong],
                                                                    [agree_b[i] for i in wrong])
    return result


def run_tokens(config):
    """The tokens of a run's policy (policy.Tokens), for a run whose metrics lack its samples'
    lengths and stops: such runs are older than the transformers policy (hf_policy), so their
    policy is a GPT, whose tokens are GPT-2's."""
    return gpt2_tokens()


def stop_endings(tokens, stop_at_sentence_end):
    """The texts a saved sample ends with when a sentence stop token stopped it (the policy's
    tokens.stop_tokens; EOS is not in the saved text)."""
    if not stop_at_sentence_end:
        return ()
    return tuple(tokens.decode([t]) for t in tokens.stop_tokens(True) if t != tokens.eos_id)


def stopped(text, max_new_tokens, n_tokens, endings):
    """Whether a saved generate sample stopped by itself: EOS is dropped from the saved text, so a
    sample shorter than max_new_tokens stopped; one that ends with one of endings (stop_endings)
    stopped there."""
    return n_tokens < max_new_tokens or text.endswith(endings)


def generate_stats(run):
    """Response length (tokens) and stop rate per step, and reward against KL. train_ppo.py logs the
    first two for every rollout of a step in metrics.jsonl; for a run without them, they come from
    the few samples that samples.jsonl keeps (noisy), counted with the run's own tokenizer."""
    config = run["config"]
    logged = [m for m in run["metrics"] if drawable(m["step"])
              and drawable(m.get("train/stop_rate")) and drawable(m.get("train/response_length"))]
    if logged:
        rows = [{"step": m["step"], "response_tokens": m["train/response_length"],
                 "stop_rate": m["train/stop_rate"]}
                for m in logged]
        source = "metrics.jsonl: every rollout of each step (the master rank's batch)"
    else:
        rows = []
        tokens = run_tokens(config)
        endings = stop_endings(tokens, config.get("stop_at_sentence_end", True))
        for step, samples in samples_by_step(run["samples"]).items():
            lengths = [len(tokens.encode(s["continuation"])) for s in samples]
            stops = [stopped(s["continuation"], config.get("max_new_tokens", 24), n, endings)
                     for s, n in zip(samples, lengths)]
            rows.append({"step": step, "response_tokens": mean(lengths), "stop_rate": mean(stops)})
        source = "samples.jsonl: the few samples kept per sample_interval, so noisy"
    return {"samples": rows, "source": source,
            "reward_kl": [(m["step"], m["kl"], m["reward"]) for m in run["metrics"]
                          if all(map(drawable, (m["step"], m.get("kl"), m.get("reward"))))],
            # the judge's raw mean log-prob, which normalised rewards hide
            "judge_score": [(m["step"], m["train/judge_score"]) for m in run["metrics"]
                            if drawable(m["step"]) and drawable(m.get("train/judge_score"))],
            "distinct_2": distinct_by_step(run["samples"])}


def samples_by_step(samples):
    """{step: the generate samples kept at that step}, steps in order."""
    per_step = {}
    for s in samples:
        if isinstance(s.get("continuation"), str) and isinstance(s.get("step"), int):
            per_step.setdefault(s["step"], []).append(s)
    return dict(sorted(per_step.items()))


def distinct_by_step(samples):
    """[(step, distinct word 2-grams of the samples kept at that step)], where there are any."""
    return [(step, d) for step, kept in samples_by_step(samples).items()
            if (d := distinct_ngrams([s["continuation"] for s in kept])) is not None]


def distinct_ngrams(texts, n=2):
    """Distinct word n-grams over all word n-grams of texts: 1.0 when none repeats, near 0 when
    the samples say the same thing over and over; None without any n-gram."""
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts)
             for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


# a generate run's reward-hacking signs: a response length below this share of the first, and
# distinct 2-grams below this share of the first, are flagged
LENGTH_COLLAPSE, REPETITION = 0.5, 0.6


def hacking_signs(stats, table):
    """The signs of reward hacking a generate run shows, each a sentence: the judge's score rising
    while the evaluation falls beyond the first one's 95% interval (pleasing the judge, not the
    task), the responses' length collapsing, their repetition growing."""
    signs = []
    judge = [score for _, score in stats["judge_score"]]
    evaluations = [row for row in table if row["step"] is not None]
    if len(judge) >= 2 and len(evaluations) >= 2:
        k = max(1, len(judge) // 10)  # the first and last tenth of the run, against noise
        first, last = mean(judge[:k]), mean(judge[-k:])
        before, after = evaluations[0], evaluations[-1]
        if last > first and after["acc_norm"] < before["acc_norm_ci"][0]:
            signs.append(f"the judge's score rose ({readable(first)} → {readable(last)}) while "
                         f"eval acc_norm fell ({readable(before['acc_norm'])} → "
                         f"{readable(after['acc_norm'])}, below the first evaluation's 95% "
                         "interval): the policy pleases the judge, not the task")
    lengths = [row["response_tokens"] for row in stats["samples"]]
    if len(lengths) >= 2 and lengths[-1] < LENGTH_COLLAPSE * lengths[0]:
        signs.append(f"the responses' length collapsed ({readable(lengths[0], 1)} → "
                     f"{readable(lengths[-1], 1)} tokens): a short sample can score well per "
                     "token while saying little")
    distinct = [d for _, d in stats["distinct_2"]]
    if len(distinct) >= 2 and distinct[-1] < REPETITION * distinct[0]:
        signs.append(f"the samples repeat themselves: distinct word 2-grams fell "
                     f"{readable(distinct[0], 2)} → {readable(distinct[-1], 2)}")
    return signs


def analyze_run(run):
    """-> the run's numbers; notes for what cannot be computed are added to run["notes"]."""
    notes = run["notes"]
    temperature = run["config"].get("choice_temperature", 1.0)
    table = evaluation_table(run)
    result = {"label": run["label"], "dir": run["dir"], "evaluations": table, "comparisons": {}}
    evaluations = run["evaluations"]
    if evaluations and not is_labelled(evaluations[-1]["predictions"]):
        notes.append("the predictions carry no gold labels: accuracies, their intervals, the "
                     "paired tests, flips, groups and calibration cannot be computed; only how the "
                     "choices changed is shown")
    if len(evaluations) == 1:
        notes.append(f"only one evaluation ({evaluations[0]['name']}): there is no before and "
                     "after to compare")
    for name, before, after in pick_comparisons(run, table):
        comparison = compare(run, before, after, temperature)
        if "error" in comparison:
            notes.append(f"{before['name']} vs {after['name']}: {comparison['error']}")
        if "note" in comparison:
            notes.append(f"{before['name']} vs {after['name']}: {comparison['note']}")
        result["comparisons"][name] = comparison
    if evaluations:
        ends = [evaluations[0], evaluations[-1]] if len(evaluations) > 1 else evaluations
        result["calibration"] = {e["name"]: calibration_of(e["predictions"], temperature)
                                 for e in ends}
        for e in ends:
            bad = sum("norm_scores" in p and not finite_scores(p) for p in e["predictions"])
            if bad:
                notes.append(f"{e['name']}: {bad} prediction(s) with norm_scores that are not "
                             "finite numbers, so its calibration and margins are not computed")
        if run["examples"] is not None:
            result["lengths"] = length_bias(evaluations, run["examples"])
    if run["teacher"] is not None and len(evaluations) >= 2:
        result["teacher"] = teacher_agreement(evaluations[0], evaluations[-1], run["teacher"],
                                              notes)
    elif run["teacher"] is None and has_teacher(run["config"].get("reward_kind")):
        notes.append("teacher agreement needs the teacher's predictions on the validation data: "
                     "python hellaswag.py --model TEACHER --data VAL.jsonl "
                     "--predictions RUN/eval/teacher.jsonl (same --style)")
    if run["teacher_cache"] and run["teacher"] is None:
        notes.append(run["teacher_cache"])
    if (run["config"].get("rollout") == "generate"
            or any("continuation" in s for s in run["samples"])):
        stats = generate_stats(run)
        if stats["samples"] or stats["reward_kl"] or stats["judge_score"]:
            result["generate"] = stats
            stats["hacking_signs"] = hacking_signs(stats, table)
        else:
            notes.append("a generate run without metrics or samples: no response lengths, stop "
                         "rates or reward against KL to show")
    metrics = [m for m in run["metrics"] if "reward" in m]
    if metrics:
        head, tail = metrics[:5], metrics[-5:]
        result["training"] = {"steps": metrics[-1]["step"],
                              "reward_first5": finite_mean(m["reward"] for m in head),
                              "reward_last5": finite_mean(m["reward"] for m in tail),
                              "kl_last5": finite_mean(m.get("kl") for m in tail)}
    return result


# --------------------------------------------------------------------------------------------------
# figures: matplotlib's object API, one PNG each


def printable(text):
    """text with each lone surrogate (a run folder whose name is not UTF-8, a hand-made log) written
    as its escape: a UTF-8 file cannot hold one, and matplotlib's font renderer refuses it."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def save_figure(fig, path):
    """Lay the figure out and save it as a PNG; -> its file name."""
    for text in fig.findobj(Text):  # titles, labels, legends, ticks
        text.set_text(printable(text.get_text()))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
    return os.path.basename(path)


def plot_curves(runs, results, path):
    """The training curves of every run on the same axes, one panel per quantity."""
    fig = Figure(figsize=(13, 10))
    axes = fig.subplots(3, 3).ravel()
    for ax, (key, title) in zip(axes, CURVES):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        for i, (run, result) in enumerate(zip(runs, results)):
            color = f"C{i}"
            if key == "eval":
                rows = [r for r in result["evaluations"] if r["step"] is not None]
                for metric, style in (("acc", "--"), ("acc_norm", "-")) if rows else ():
                    steps = [r["step"] for r in rows]
                    ax.plot(steps, [r[metric] for r in rows], style, color=color, marker="o",
                            markersize=3, label=f"{run['label']} {metric}")
                    ax.fill_between(steps, [r[f"{metric}_ci"][0] for r in rows],
                                    [r[f"{metric}_ci"][1] for r in rows], color=color, alpha=0.12)
            else:
                points = [(m["step"], m[key]) for m in run["metrics"]
                          if drawable(m["step"]) and drawable(m.get(key))
                          and not (key == "reward" and m["step"] == 0)]
                if points:
                    ax.plot(*zip(*points), color=color, linewidth=1.2, label=run["label"])
        if ax.has_data():
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes,
                    color="grey")
    return save_figure(fig, path)


def plot_groups(comparison, path):
    """acc_norm change by group with its interval, sorted, one panel per group field; small groups
    hollow."""
    fields = [(f, g) for f, g in comparison["groups"].items() if g]
    heights = [min(len(g), MAX_GROUPS) for _, g in fields]
    fig = Figure(figsize=(8, 1.2 + 0.28 * sum(heights) + 0.6 * len(fields)))
    axes = fig.subplots(len(fields), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, (field, groups) in zip(axes, fields):
        largest = sorted(groups.items(), key=lambda kv: -kv[1]["n"])[:MAX_GROUPS]
        rows = sorted(largest, key=lambda kv: kv[1]["diff"])
        for y, (value, c) in enumerate(rows):
            small = c["n"] < SMALL_GROUP
            ax.errorbar(c["diff"], y, xerr=[[c["diff"] - c["ci95"][0]], [c["ci95"][1] - c["diff"]]],
                        fmt="o", color="grey" if small else "C0", mfc="white" if small else "C0",
                        capsize=2)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([f"{str(v)[:30]} (n={c['n']}{', small' if c['n'] < SMALL_GROUP else ''})"
                            for v, c in rows], fontsize=7)
        ax.axvline(0, color="black", linewidth=0.8)
        more = f", the {MAX_GROUPS} largest of {len(groups)}" if len(groups) > MAX_GROUPS else ""
        ax.set_title(f"acc_norm change by {field}{more} (95% CI)", fontsize=9)
    axes[-1].set_xlabel(f"{comparison['after']} minus {comparison['before']}")
    return save_figure(fig, path)


def plot_calibration(calibrations, path):
    """Reliability diagram and the distribution of the top-two probability margin, before and
    after."""
    fig = Figure(figsize=(10, 4))
    reliability, margins = fig.subplots(1, 2)
    reliability.plot([0, 1], [0, 1], ":", color="grey", label="calibrated")
    if not any("bins" in c for c in calibrations.values()):
        reliability.text(0.5, 0.3, "no labels", ha="center", color="grey")
    for i, (name, c) in enumerate(calibrations.items()):
        if "bins" in c:
            bins = [b for b in c["bins"] if b["n"]]
            reliability.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-",
                             color=f"C{i}", label=f"{name} (ECE {c['ece']:.3f})")
        margins.hist(c["margins"], bins=20, range=(0, 1), alpha=0.5, color=f"C{i}", label=name)
    reliability.set(xlabel="confidence of the chosen ending", ylabel="accuracy",
                    title="calibration (acc_norm)", xlim=(0, 1), ylim=(-0.02, 1.02))
    margins.set(xlabel="probability margin between the top two endings", ylabel="examples",
                title="confidence margin")
    reliability.legend(fontsize=8)
    margins.legend(fontsize=8)
    return save_figure(fig, path)


def plot_lengths(rows, path):
    """Chosen against gold ending length over the evaluations, and the chosen-minus-gold
    distribution at the ends."""
    fig = Figure(figsize=(10, 4))
    over_steps, spread = fig.subplots(1, 2)
    x = [r["step"] if r["step"] is not None else i for i, r in enumerate(rows)]
    over_steps.plot(x, [r["chosen_chars"] for r in rows], "o-", label="chosen ending")
    if rows[0]["gold_chars"] is not None:
        over_steps.plot(x, [r["gold_chars"] for r in rows], "s--", color="black",
                        label="gold ending")
    over_steps.set(xlabel="step" if rows[0]["step"] is not None else "evaluation",
                   ylabel="mean characters", title="length of the chosen ending")
    over_steps.legend(fontsize=8)
    for i, r in enumerate((rows[0], rows[-1]) if len(rows) > 1 else rows):
        if r["chosen_minus_gold"] is not None:
            spread.hist(r["chosen_minus_gold"], bins=30, alpha=0.5, color=f"C{i}", label=r["name"])
    spread.set(xlabel="chosen minus gold (characters)", ylabel="examples",
               title="length of chosen vs gold")
    if spread.has_data():
        spread.legend(fontsize=8)
    return save_figure(fig, path)


def plot_generate(stats, path):
    judge_scores = stats.get("judge_score")
    fig = Figure(figsize=(17 if judge_scores else 13, 4))
    length, stop, reward_kl, *judge = fig.subplots(1, 4 if judge_scores else 3)
    rows = stats["samples"]
    length.plot([r["step"] for r in rows], [r["response_tokens"] for r in rows], "o-")
    length.set(xlabel="step", ylabel="tokens", title="response length")
    stop.plot([r["step"] for r in rows], [r["stop_rate"] for r in rows], "o-")
    stop.set(xlabel="step", ylabel="fraction", ylim=(-0.05, 1.05), title="stop rate")
    if stats["reward_kl"]:
        steps, kl, reward = zip(*stats["reward_kl"])
        points = reward_kl.scatter(kl, reward, c=steps, cmap="viridis", s=12)
        fig.colorbar(points, ax=reward_kl, label="step")
    reward_kl.set(xlabel="KL to the reference", ylabel="reward", title="reward against KL")
    if judge_scores:
        judge[0].plot(*zip(*judge_scores), "o-", markersize=3)
        judge[0].set(xlabel="step", ylabel="mean log-prob", title="judge's raw score")
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------------------
# the report


def pct(x):
    return f"{x:.3f}"


def ci(interval, signed=False):
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return f"[{fmt.format(interval[0])}, {fmt.format(interval[1])}]"


def verdict(c):
    return ("significant at the 5% level" if c["p_value"] < 0.05
            else "not significant at the 5% level")


def example_text(examples, index, ending=None, width=110):
    if examples is None:
        return ""
    text = examples[index]["ctx"] if ending is None else examples[index]["endings"][ending]
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def quote(examples, index, ending):
    return (f"{ending}" if examples is None
            else f"{ending} “{example_text(examples, index, ending)}”")


def summary_lines(result):
    lines = [f"**{result['label']}**" + (f" (`{result['dir']}`)" if result["dir"] else "")]
    training = result.get("training")
    if training:
        reward_first, reward_last, kl_last = (
            "–" if training[k] is None else readable(training[k])
            for k in ("reward_first5", "reward_last5", "kl_last5"))
        lines.append(f"- {readable(training['steps'], 0)} steps; mean reward {reward_first} over "
                     f"the first 5 steps, {reward_last} over the last 5; KL to the reference "
                     f"{kl_last} over the last 5 (steps skipped as non-finite left out).")
    for name, c in result["comparisons"].items():
        if "acc_norm" in c:
            d = c["acc_norm"]
            lines.append(f"- acc_norm {pct(d['acc_a'])} at {c['before']} → {pct(d['acc_b'])} "
                         f"at {c['after']} ({name}): {d['diff']:+.3f} {ci(d['ci95'], True)}, "
                         f"McNemar exact p = {d['p_value']:.3g}, {verdict(d)} (n = {d['n']}).")
        elif "changed_choices" in c:
            lines.append(f"- {c['changed_choices']} of {c['n']} choices changed from "
                         f"{c['before']} to {c['after']} (no labels: no accuracy).")
    compared = any("acc_norm" in c or "changed_choices" in c
                   for c in result["comparisons"].values())
    if not compared and result["evaluations"]:
        e = result["evaluations"][-1]
        lines.append(f"- acc_norm {pct(e['acc_norm'])} {ci(e['acc_norm_ci'])} at {e['name']} "
                     f"(n = {e['n']}).")
    if "acc_norm" in result["comparisons"].get("best", {}):
        lines.append("- The best evaluation is picked on the same examples it is tested on: its "
                     "p-value is optimistic; the last evaluation's is not.")
    return lines


def evaluation_lines(result):
    if not result["evaluations"]:
        return ["No labelled evaluations (see below).", ""]
    lines = ["| evaluation | n | acc [95% CI] | acc_norm [95% CI] |", "|---|---|---|---|"]
    for r in result["evaluations"]:
        lines.append(f"| {r['name']} | {r['n']} | {pct(r['acc'])} {ci(r['acc_ci'])} | "
                     f"{pct(r['acc_norm'])} {ci(r['acc_norm_ci'])} |")
    return lines + [""]


def comparison_lines(name, c, examples, figure):
    lines = [f"### {c['before']} → {c['after']} ({name} evaluation)", ""]
    if "acc_norm" not in c:
        if "changed_choices" in c:
            lines.append(f"{c['changed_choices']} of {c['n']} choices changed; "
                         "without labels nothing more.")
        return lines + [""]
    lines += ["| metric | before | after | after − before [95% CI] | right → wrong | "
              "wrong → right | McNemar p |",
              "|---|---|---|---|---|---|---|"]
    for metric in ("acc", "acc_norm"):
        d = c[metric]
        lines.append(f"| {metric} | {pct(d['acc_a'])} | {pct(d['acc_b'])} | "
                     f"{d['diff']:+.3f} {ci(d['ci95'], True)} | "
                     f"{d['a_only']} | {d['b_only']} | {d['p_value']:.3g} |")
    lines += ["", "The interval is the paired difference's normal interval and the p-value "
              "McNemar's exact test on the examples that changed (hellaswag.py --compare computes "
              "the same numbers).", ""]
    if figure:
        lines += [f"![acc_norm change by group]({figure})", "",
                  f"Each point is one group's acc_norm change with its 95% interval; hollow grey "
                  f"points are groups of fewer than {SMALL_GROUP} examples, whose intervals should "
                  "not be trusted.", ""]
    for direction, title in (("right_to_wrong", "Right → wrong"),
                             ("wrong_to_right", "Wrong → right")):
        flips = c["flips"][direction]
        shown = (f" (the {MAX_FLIPS} with the largest change in the gold ending's probability)"
                 if flips else "")
        lines.append(f"**{title}: {len(flips)} examples**" + shown)
        lines.append("")
        for f in flips[:MAX_FLIPS]:
            change = (f"; p(gold) {f['p_gold_before']:.2f} → {f['p_gold_after']:.2f}"
                      if f["p_gold_change"] is not None else "")
            before, after, gold = (quote(examples, f["index"], f[key])
                                   for key in ("chosen_before", "chosen_after", "label"))
            lines.append(f"- #{f['index']}: {example_text(examples, f['index'])}  ")
            lines.append(f"  chosen before: {before}; after: {after}; gold: {gold}{change}")
        lines.append("")
    return lines


def choices_lines(result, figures):
    lines = ["## How the choices changed", ""]
    lengths = result.get("lengths")
    if lengths:
        first, last = lengths[0], lengths[-1]
        lines += [f"![ending lengths]({figures['lengths']})", "",
                  "| evaluation | chosen ending (chars) | gold ending (chars) | "
                  "chosen is the longest | gold is the longest |", "|---|---|---|---|---|"]
        for r in (first, last) if len(lengths) > 1 else (first,):
            gold = "–" if r["gold_chars"] is None else f"{r['gold_chars']:.1f}"
            gold_longest = "–" if r["gold_is_longest"] is None else pct(r["gold_is_longest"])
            lines.append(f"| {r['name']} | {r['chosen_chars']:.1f} | {gold} | "
                         f"{pct(r['chosen_is_longest'])} | {gold_longest} |")
        lines += ["", "A policy that learns a length bias instead of the task picks the longest "
                  "ending more often than the gold ending is the longest.", ""]
    else:
        lines += ["Ending lengths: cannot be computed (see below).", ""]
    calibrations = {k: v for k, v in (result.get("calibration") or {}).items() if v}
    if calibrations:
        lines += [f"![calibration]({figures['calibration']})", "",
                  "| evaluation | ECE | mean top-two margin |", "|---|---|---|"]
        for name, c in calibrations.items():
            lines.append(f"| {name} | {c['ece']:.3f} |" if "ece" in c else f"| {name} | – |")
            lines[-1] += f" {c['margin']:.3f} |"
        lines += ["", "Confidence is softmax(norm_scores / choice_temperature) of the chosen "
                  "ending: for the completion style exactly the choice rollouts' policy. ECE is "
                  f"the expected calibration error over {CALIBRATION_BINS} equal-width bins; the "
                  "margin is the probability gap between the top two endings.", ""]
    teacher = result.get("teacher")
    if teacher:
        a = teacher["agreement"]
        lines += [f"Agreement with the teacher's pick: {pct(a['acc_a'])} → {pct(a['acc_b'])} "
                  f"({a['diff']:+.3f} {ci(a['ci95'], True)}, McNemar p = {a['p_value']:.3g})."]
        if "teacher_acc_norm" in teacher:
            lines[-1] += f" The teacher's own acc_norm: {pct(teacher['teacher_acc_norm'])}."
        if "copies_mistakes" in teacher:
            m = teacher["copies_mistakes"]
            lines[-1] += (f" On the {teacher['teacher_wrong']} examples the teacher gets wrong, "
                          f"the policy picks the teacher's wrong ending {pct(m['acc_a'])} → "
                          f"{pct(m['acc_b'])} of the time (p = {m['p_value']:.3g}): rising means "
                          "copying the judge, mistakes included.")
        lines.append("")
    return lines


def generate_lines(stats, figure):
    lines = ["## Generate rollouts", "", f"![generate rollouts]({figure})", "",
             f"Response length (tokens) and stop rate come from {stats['source']}.", ""]
    if stats["samples"]:
        first, last = stats["samples"][0], stats["samples"][-1]
        lines += [f"Response length {readable(first['response_tokens'], 1)} → "
                  f"{readable(last['response_tokens'], 1)} tokens and stop rate "
                  f"{readable(first['stop_rate'], 2)} → {readable(last['stop_rate'], 2)} "
                  f"from step {readable(first['step'], 0)} to step "
                  f"{readable(last['step'], 0)}.", ""]
    if stats.get("judge_score"):
        (first_step, first), (last_step, last) = stats["judge_score"][0], stats["judge_score"][-1]
        lines += [f"The judge's raw score (its mean log-prob of the non-empty samples, before "
                  f"normalising, clipping and penalties) went {readable(first)} → "
                  f"{readable(last)} from step {readable(first_step, 0)} to step "
                  f"{readable(last_step, 0)}.", ""]
    if stats["distinct_2"]:
        (first_step, first), (last_step, last) = stats["distinct_2"][0], stats["distinct_2"][-1]
        lines += [f"Distinct word 2-grams of the kept samples (1 = nothing repeats): "
                  f"{readable(first, 2)} at step {readable(first_step, 0)} → {readable(last, 2)} "
                  f"at step {readable(last_step, 0)}.", ""]
    checked = ("the judge's score rising while the evaluation falls, the responses' length "
               "collapsing, their repetition growing")
    if stats["hacking_signs"]:
        lines += ["**Reward-hacking signs:**", ""]
        lines += [f"- {sign}" for sign in stats["hacking_signs"]] + [""]
    else:
        lines += [f"No reward-hacking sign among those checked ({checked}).", ""]
    return lines


def sample_lines(samples, per_interval=2, intervals=6):
    by_step = {}
    for s in samples:
        if isinstance(s.get("continuation"), str):
            by_step.setdefault(s.get("step"), []).append(s)
    steps = sorted(k for k in by_step if isinstance(k, int))
    if not steps:
        return []
    picked = sorted({steps[round(i * (len(steps) - 1) / max(1, intervals - 1))]
                     for i in range(intervals)})
    lines = ["| step | context (end) | continuation | reward |", "|---|---|---|---|"]
    for step in picked:
        for s in by_step[step][:per_interval]:
            context = " ".join(str(s.get("ctx", "")).split())[-60:].replace("|", "\\|")
            text = " ".join(s["continuation"].split()).replace("|", "\\|")
            reward = s.get("reward")
            reward = readable(reward) if is_number(reward) else "–"
            lines.append(f"| {readable(step, 0)} | …{context} | {text} | {reward} |")
    return lines + [""]


def judge_rows(runs, results):
    """Per run, what its reward did: the judge, its own acc_norm, the policy's acc_norm first ->
    last with the paired test, agreement with the judge's picks, calibration, KL at the end."""
    rows = []
    for run, result in zip(runs, results):
        config, teacher = run["config"], result.get("teacher") or {}
        acc = result["comparisons"].get("last", {}).get("acc_norm")
        ece = [c["ece"] for c in (result.get("calibration") or {}).values() if c]
        rows.append({
            "run": result["label"], "reward_kind": config.get("reward_kind"),
            "judge": (None if not has_judge(config.get("reward_kind"))
                      else os.path.basename(str(config.get("reward_model", "")).rstrip("/"))),
            "judge_acc_norm": teacher.get("teacher_acc_norm"),
            "acc_norm": acc and {k: acc[k] for k in ("acc_a", "acc_b", "diff", "ci95",
                                                     "p_value")},
            "agreement": teacher.get("agreement") and {
                k: teacher["agreement"][k] for k in ("acc_a", "acc_b")},
            "ece": ece if len(ece) == 2 else None,
            "kl_last5": (result.get("training") or {}).get("kl_last5")})
    return rows


def judge_lines(rows):
    """The judges side by side, for runs that differ in their reward."""
    arrow = lambda pair, f=readable: "–" if pair is None else f"{f(pair[0])} → {f(pair[1])}"
    lines = ["## The judges compared", "",
             "| run | reward | judge | judge's acc_norm | acc_norm first → last (paired diff, "
             "McNemar p) | agreement with the judge's picks | ECE | KL, last 5 steps |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = r["acc_norm"]
        acc_cell = ("–" if acc is None else f"{pct(acc['acc_a'])} → {pct(acc['acc_b'])} "
                    f"({acc['diff']:+.3f} {ci(acc['ci95'], True)}, p = {acc['p_value']:.3g})")
        agreement = r["agreement"] and (r["agreement"]["acc_a"], r["agreement"]["acc_b"])
        cells = [r["run"], r["reward_kind"] or "–", r["judge"] or "– (gold labels)",
                 "–" if r["judge_acc_norm"] is None else pct(r["judge_acc_norm"]), acc_cell,
                 arrow(agreement, pct), arrow(r["ece"]),
                 "–" if r["kl_last5"] is None else readable(r["kl_last5"])]
        lines.append("| " + " | ".join(printable(str(c)) for c in cells) + " |")
    return lines + ["", "A judge's acc_norm and the agreement need its predictions on the "
                    "validation data (`eval/teacher.jsonl`); a run without them shows –.", ""]


def report_lines(runs, results, out_dir, differ, title):
    """The lines of report.md; the figures they show are saved in out_dir."""
    lines = [f"# {title}", "", "## Summary", ""]
    for result in results:
        lines += summary_lines(result) + [""]
    if differ:
        lines += ["Runs differ in: " + ", ".join(f"`{k}`" for k in differ) + ".", ""]
    if {"reward_model", "reward_kind"} & set(differ):
        rows = judge_rows(runs, results)
        for result, row in zip(results, rows):
            result["judge"] = row
        lines += judge_lines(rows)
    if any(run["metrics"] for run in runs):
        figure = plot_curves(runs, results, os.path.join(out_dir, "curves.png"))
        lines += ["## Training curves", "", f"![training curves]({figure})", "",
                  "reward: the task's reward before the KL penalty; KL: to the frozen reference, "
                  "per sample; eval: HellaSwag-style acc (dashed) and acc_norm (solid) with 95% "
                  "Wilson intervals; approx_kl, clipfrac: how far each update moved the policy; "
                  "explained variance: of the value head.", ""]
    for i, (run, result) in enumerate(zip(runs, results)):
        prefix = f"run{i + 1}_" if len(runs) > 1 else ""
        if len(runs) > 1:
            lines += [f"# {result['label']}", ""]
        lines += ["## Evaluations", ""] + evaluation_lines(result)
        if result["comparisons"]:
            lines += ["## Before vs after", ""]
        for name, c in result["comparisons"].items():
            figure = None
            if c.get("groups") and any(c["groups"].values()):
                figure = plot_groups(c, os.path.join(out_dir, f"{prefix}groups_{name}.png"))
            lines += comparison_lines(name, c, run["examples"], figure)
        figures = {}
        if result.get("lengths"):
            figures["lengths"] = plot_lengths(
                result["lengths"], os.path.join(out_dir, f"{prefix}lengths.png"))
        if any((result.get("calibration") or {}).values()):
            figures["calibration"] = plot_calibration(
                {k: v for k, v in result["calibration"].items() if v},
                os.path.join(out_dir, f"{prefix}calibration.png"))
        if run["evaluations"]:
            lines += choices_lines(result, figures)
        if result.get("generate"):
            figure = plot_generate(result["generate"],
                                   os.path.join(out_dir, f"{prefix}generate.png"))
            lines += generate_lines(result["generate"], figure) + sample_lines(run["samples"])
        lines += ["## What could not be computed", ""]
        lines += ([f"- {note}" for note in run["notes"]]
                  or ["Nothing: every part of the report was computed."])
        lines.append("")
        result["cannot_compute"] = run["notes"]
    return lines


def write_report(runs, results, out_dir, differ, title):
    """report.md, report.json and the figures, written into a new folder that then replaces out_dir
    whole: a report never mixes its figures with those of an earlier one, and a killed run leaves
    the earlier report as it was."""
    with atomic_directory(os.path.realpath(out_dir)) as folder:
        text = printable("\n".join(report_lines(runs, results, folder, differ, title)))
        atomic_write_text(os.path.join(folder, "report.md"), text)
        # the per-example lists stay out of the JSON: they are in the prediction files
        for result in results:
            for c in (result.get("calibration") or {}).values():
                if c:
                    c.pop("margins", None)
            for r in result.get("lengths") or []:
                r.pop("chosen_minus_gold", None)
        atomic_write_text(os.path.join(folder, "report.json"),
                          json.dumps(results, indent=1, allow_nan=True) + "\n")
    return os.path.join(out_dir, "report.md")


# --------------------------------------------------------------------------------------------------
# command line


def check_report_folder(out):
    """Refuse an --out that could not take the report: the new report replaces the folder whole
    (its parent must take the new one), so the folder may hold nothing but an earlier report."""
    check_output_path(out, directory=True)
    check_output_path(os.path.dirname(os.path.abspath(out)), directory=True)
    if not os.path.isdir(out):
        return
    try:
        names = os.listdir(out)
    except OSError as e:
        raise UserError(f"--out {out}: cannot read ({e.strerror})") from None
    foreign = sorted(name for name in names if not REPORT_ENTRY.fullmatch(name)
                     or os.path.isdir(os.path.join(out, name)))
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise UserError(f"--out {out}: holds {foreign[0]!r}{more}, which is not part of a report "
                        "of analyze.py; the report replaces the whole folder, so give a new or "
                        "empty folder (or one that holds only an earlier report)")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="A report (markdown + PNG figures) on what PPO did to a model.")
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR", help="train_ppo.py out_dir(s)")
    parser.add_argument("--out", help="report folder, replaced whole: new, empty or an earlier "
                                      "report (default RUN_DIR/report for one run; needed "
                                      "otherwise)")
    parser.add_argument("--before", help="a --predictions file: the model before")
    parser.add_argument("--after", help="a --predictions file of the same data: the model after")
    parser.add_argument("--data", help="the validation jsonl the predictions index "
                                       "(default: from train_config.json)")
    parser.add_argument("--teacher", help="the teacher's --predictions file on the same data "
                                          "(default: RUN_DIR/eval/teacher.jsonl)")
    args = parser.parse_args(argv)
    pair = args.before is not None or args.after is not None
    if pair and (args.before is None or args.after is None):
        raise UserError("give both --before A.jsonl and --after B.jsonl")
    if pair == bool(args.runs):
        raise UserError("give run directories, or --before A.jsonl --after B.jsonl, not both")
    for run_dir in args.runs:
        if not os.path.isdir(run_dir):
            raise UserError(f"{run_dir}: no such run directory")
        try:  # else every file of the run would read as missing
            os.listdir(run_dir)
        except OSError as e:
            raise UserError(f"{run_dir}: cannot read the run directory ({e.strerror})") from None
    for option, path in (("--data", args.data), ("--teacher", args.teacher)):
        if path is not None and not os.path.isfile(path):
            raise UserError(f"{option} {path}: no such file")
    if args.out is None:
        if len(args.runs) != 1:
            raise UserError("several runs or two prediction files: say where the report goes "
                            "with --out DIR")
        args.out = os.path.join(args.runs[0], "report")
    check_report_folder(args.out)  # before reading and plotting every run
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.runs:
        runs = [load_run(d, data=args.data, teacher=args.teacher) for d in args.runs]
        title = "Report: " + ", ".join(args.runs)
    else:
        runs = [load_pair(args.before, args.after, data=args.data, teacher=args.teacher)]
        title = f"Report: {args.before} → {args.after}"
    differ = label_runs(runs)
    results = [analyze_run(run) for run in runs]
    path = write_report(runs, results, args.out, differ, title)
    print(f"wrote {printable(path)}")
    return results


if __name__ == "__main__":
    run_cli(main)
