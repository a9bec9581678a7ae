"""
The advantage and KL estimators side by side on the offline demos, several seeds each:

    python benchmarks/estimators.py [--seeds 1337 1 2] [--generate_steps 240] [--work DIR]
                                    [--only choice|generate] [--reuse]

- configs/demo.py (choice rollouts, teacher reward): adv_estimator gae | expected, each with
  kl_estimator sampled | exact.
- configs/demo_generate.py (generate rollouts, the judge's likelihood): adv_estimator gae | rloo |
  grpo, the group methods with group_size 4 (the same 64 samples a step: 16 prompts x 4).

Prints one markdown table per rollout kind: steps to reach half the final gain (eval acc_norm for
choice, every eval_interval steps; the judge's raw score, a 10-step moving average, for generate),
the first and final figure, the logged KL at the end (mean of the last 5 steps) and seconds per step
(median); for generate also the last evaluation's acc_norm. Each seed builds its own demo task once,
shared by the estimators. --reuse prints the tables from the runs already in --work, training none.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHOICE = [("gae", "sampled"), ("gae", "exact"), ("expected", "sampled"), ("expected", "exact")]
GENERATE = [("gae", 1), ("rloo", 4), ("grpo", 4)]


def train(out_dir, config, *overrides, reuse=False):
    args = [sys.executable, "train_ppo.py", config, f"--out_dir={out_dir}", "--start_over=True",
            *overrides]
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if reuse and not os.path.exists(metrics_path):
        print(f"error: --reuse: {metrics_path} does not exist; run without --reuse to train it",
              file=sys.stderr)
        sys.exit(2)
    if not reuse:
        proc = subprocess.run(args, cwd=HERE, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"error: {' '.join(args[1:])} failed:\n{proc.stderr[-2000:]}")
    with open(metrics_path) as f:
        return [json.loads(line) for line in f]


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


def summary(metrics, curve):
    steps = [m for m in metrics if "dt" in m]
    evals = [m["eval/acc_norm"] for m in metrics if "eval/acc_norm" in m]
    return {"half": half_gain_step(curve), "first": curve[0][1], "final": curve[-1][1],
            "eval": evals[-1],
            "kl": statistics.fmean(m["kl"] for m in steps[-5:]),
            "dt": statistics.median(m["dt"] for m in steps)}


def choice_run(work, seed, adv, kl, reuse):
    metrics = train(os.path.join(work, f"choice_{adv}_{kl}_{seed}"), "configs/demo.py",
                    f"--seed={seed}", f"--synthetic_dir={os.path.join(work, f'task_{seed}')}",
                    f"--adv_estimator={adv}", f"--kl_estimator={kl}", reuse=reuse)
    return summary(metrics, [(m["step"], m["eval/acc_norm"]) for m in metrics
                             if "eval/acc_norm" in m])


def generate_run(work, seed, adv, group_size, steps, reuse):
    metrics = train(os.path.join(work, f"generate_{adv}_{seed}"), "configs/demo_generate.py",
                    f"--seed={seed}", f"--synthetic_dir={os.path.join(work, f'task_{seed}')}",
                    f"--adv_estimator={adv}", f"--group_size={group_size}",
                    f"--max_steps={steps}", reuse=reuse)
    scores = [(m["step"], m["train/judge_score"]) for m in metrics if "train/judge_score" in m]
    return summary(metrics, moving_average(scores))


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1, 2])
    parser.add_argument("--generate_steps", type=int, default=240)
    parser.add_argument("--work", default="/tmp/estimators")
    parser.add_argument("--only", choices=("choice", "generate"), default=None)
    parser.add_argument("--reuse", action="store_true",
                        help="print the tables from the runs already in --work, training none")
    args = parser.parse_args()
    work = os.path.abspath(args.work)
    if args.only != "generate":
        rows = [(f"{adv} × {kl}",
                 [choice_run(work, seed, adv, kl, args.reuse) for seed in args.seeds])
                for adv, kl in CHOICE]
        table("configs/demo.py (choice rollouts, teacher reward), per seed", rows,
              "eval acc_norm")
    if args.only != "choice":
        rows = [(f"{adv}" + (f" (group {g})" if g > 1 else ""),
                 [generate_run(work, seed, adv, g, args.generate_steps, args.reuse)
                  for seed in args.seeds])
                for adv, g in GENERATE]
        table(f"configs/demo_generate.py, {args.generate_steps} steps (generate rollouts, the "
              "judge's likelihood), per seed", rows, "judge score", eval_column=True)


if __name__ == "__main__":
    main()
