"""
The advantage and KL estimators side by side on the offline demos, several seeds each:

    python benchmarks/estimators.py [--seeds 1337 1 2] [--generate_steps 240] [--work DIR]
                                    [--only choice|generate] [--reuse]

- configs/demo.py (choice rollouts, teacher reward): adv_estimator gae | expected, each with
  kl_estimator sampled | exact.
- configs/demo_generate.py (generate rollouts, the judge's likelihood): adv_estimator gae | grpo |
  reinforce++, and grpo with loss_agg seq-mean-token-sum-norm (Dr. GRPO's constant normaliser);
  grpo with group_size 4 (the same 64 samples a step: 16 prompts x 4). rloo (group 4), which
  ran beside them before, is in docs/measurements.md.

Prints one markdown table per rollout kind: steps to reach half the final gain (eval acc_norm for
choice, every eval_interval steps; the judge's raw score, a 10-step moving average, for generate),
the first and final figure, the logged KL at the end (mean of the last 5 steps) and seconds per step
(median); for generate also the last evaluation's acc_norm, and the runs' step count in the title.
Each seed builds its own demo task once, shared by the estimators. A run that finished is kept in
--work, so a stopped benchmark goes on where it stopped (a run that did not finish, or whose
settings changed, trains again). --reuse prints the tables from the runs already in --work,
training none (every run's metrics.jsonl read before anything prints; one that did not finish is
refused).
"""

import argparse
import os
import statistics
import sys
from collections import namedtuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import UserError, progress_bar, run_cli  # noqa: E402

# this folder is on the path of a script
import arguments  # noqa: E402

CHOICE = [("gae", "sampled"), ("gae", "exact"), ("expected", "sampled"), ("expected", "exact")]
GENERATE = [("gae", 1, "token-mean"), ("grpo", 4, "token-mean"), ("reinforce++", 1, "token-mean"),
            ("grpo", 4, "seq-mean-token-sum-norm")]
Run = namedtuple("Run", "out_dir config overrides")  # one demo run: an estimator, a seed


def train(run):
    """Train a run (its earlier files moved aside) unless it finished with these settings -> its
    metrics.jsonl lines."""
    arguments.train_once(run.out_dir, run.config, "--start_over=True", *run.overrides)
    return arguments.run_metrics(run.out_dir)


def reused(run):
    """A run that finished in --work -> its metrics.jsonl lines."""
    try:
        arguments.finished_seconds(run.out_dir)  # a stopped run's curve is not the run's
        return arguments.run_metrics(run.out_dir)
    except UserError as e:
        raise UserError(f"--reuse: {e}; run without --reuse to train it") from None


def half_gain_step(points):
    """points: [(step, value)] in step order -> the first step at which the value reached half of
    its gain from the first point to the last (None without a gain)."""
    start, final = points[0][1], points[-1][1]
    if final <= start:
        return None
    return next(step for step, value in points if value >= start + (final - start) / 2)


def moving_average(points, width=10):
    values = [v for _, v in points]
    return [(step, statistics.fmean(values[max(0, i - width + 1):i + 1]))
            for i, (step, _) in enumerate(points)]


def summary(metrics, curve, run):
    steps = [m for m in metrics if "dt" in m]
    evals = [m["eval/acc_norm"] for m in metrics if "eval/acc_norm" in m]
    if not (curve and steps and evals):  # a run stopped early, say
        raise UserError(f"{os.path.join(run.out_dir, 'metrics.jsonl')}: no training step or "
                        "evaluation logged; train it again")
    return {"half": half_gain_step(curve), "first": curve[0][1], "final": curve[-1][1],
            "eval": evals[-1], "steps": metrics[-1]["step"],
            "kl": statistics.fmean(m["kl"] for m in steps[-5:]),
            "dt": statistics.median(m["dt"] for m in steps)}


def choice_summary(metrics, run):
    return summary(metrics, [(m["step"], m["eval/acc_norm"]) for m in metrics
                             if "eval/acc_norm" in m], run)


def generate_summary(metrics, run):
    scores = [(m["step"], m["train/judge_score"]) for m in metrics if "train/judge_score" in m]
    return summary(metrics, moving_average(scores), run)


def demo_run(work, name, config, seed, *overrides):
    """A run of a demo in work/name, on its seed's demo task (built once, shared by the
    estimators)."""
    return Run(os.path.join(work, name), config,
               (f"--seed={seed}", f"--synthetic_dir={os.path.join(work, f'task_{seed}')}",
                *overrides))


def choice_rows(work, seeds):
    """[(row name, [the Run of each seed])] of configs/demo.py."""
    return [(f"{adv} × {kl}",
             [demo_run(work, f"choice_{adv}_{kl}_{seed}", "configs/demo.py", seed,
                       f"--adv_estimator={adv}", f"--kl_estimator={kl}") for seed in seeds])
            for adv, kl in CHOICE]


def generate_rows(work, seeds, steps):
    """[(row name, [the Run of each seed])] of configs/demo_generate.py, steps steps."""
    def name(adv, g, agg):
        return (adv + (f" (group {g})" if g > 1 else "")
                + ("" if agg == "token-mean" else f" × {agg}"))

    def folder(adv, agg, seed):  # the token-mean runs keep their earlier folders' names
        return f"generate_{adv}{'' if agg == 'token-mean' else '_' + agg}_{seed}"

    return [(name(adv, g, agg),
             [demo_run(work, folder(adv, agg, seed), "configs/demo_generate.py", seed,
                       f"--adv_estimator={adv}", f"--group_size={g}", f"--loss_agg={agg}",
                       f"--max_steps={steps}")
              for seed in seeds])
            for adv, g, agg in GENERATE]


def step_counts(rows):
    """The runs' steps, for a title: "240 steps", or "200-240 steps" for runs of several
    lengths."""
    counts = sorted({r["steps"] for _, runs in rows for r in runs})
    return f"{counts[0]}{f'-{counts[-1]}' if len(counts) > 1 else ''} steps"


def table(title, rows, figure, eval_column=False):
    print(f"\n{title}\n")
    extra = " last eval acc_norm |" if eval_column else ""
    print(f"| setting | seeds | steps to half the final gain | {figure}: first → final |{extra} "
          "KL at the end | s / step |")
    print("|---|---|---|---|---|---|" + ("---|" if eval_column else ""))
    for name, runs in rows:
        cell = lambda key, fmt: ", ".join(  # noqa: E731
            "–" if r[key] is None else format(r[key], fmt) for r in runs)
        first_final = ", ".join(f"{r['first']:.3f} → {r['final']:.3f}" for r in runs)
        evals = f" {cell('eval', '.3f')} |" if eval_column else ""
        print(f"| {name} | {len(runs)} | {cell('half', 'd')} | {first_final} |{evals} "
              f"{cell('kl', '.4f')} | {cell('dt', '.2f')} |")


def summaries(rows, summarize, metrics_of):
    """[(row name, [the summary of each run])], each run's metrics from metrics_of (train or
    reused), with a bar over the rows (minutes each, when their runs train)."""
    with progress_bar(rows, desc="settings", unit=" setting") as bar:
        return [(name, [summarize(metrics_of(run), run) for run in runs]) for name, runs in bar]


def print_table(kind, results):
    if kind == "choice":
        table("configs/demo.py (choice rollouts, teacher reward), per seed", results,
              "eval acc_norm")
    else:
        table(f"configs/demo_generate.py, {step_counts(results)} (generate rollouts, the judge's "
              "likelihood), per seed", results, "judge score", eval_column=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1, 2])
    parser.add_argument("--generate_steps", type=int, default=240)
    parser.add_argument("--work", default="/tmp/estimators")
    parser.add_argument("--only", choices=("choice", "generate"), default=None)
    parser.add_argument("--reuse", action="store_true",
                        help="print the tables from the runs already in --work, training none")
    args = parser.parse_args(argv)
    arguments.at_least(args, 0, "--seeds")
    arguments.at_least(args, 1, "--generate_steps")
    work = os.path.abspath(args.work) if args.reuse else arguments.work_folder(args.work)
    kinds = {"choice": (choice_rows(work, args.seeds), choice_summary),
             "generate": (generate_rows(work, args.seeds, args.generate_steps), generate_summary)}
    tables = ((kind, summaries(rows, summarize, reused if args.reuse else train))
              for kind, (rows, summarize) in kinds.items() if args.only in (None, kind))
    if args.reuse:  # every run read before a table prints: a bad file is all that prints
        tables = list(tables)
    for kind, results in tables:
        print_table(kind, results)


if __name__ == "__main__":
    run_cli(main)
