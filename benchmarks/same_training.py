"""
Does this checkout train exactly as another one does? Runs the offline demos in both checkouts and
compares what they log, and resumes a checkpoint written by the other checkout here:

    python benchmarks/same_training.py --before ../old-checkout [--work /tmp/same_training]

1. configs/demo.py, all its steps, in each checkout: metrics.jsonl must agree line for line, every
   field but the timing ones (dt, samples/s, tok/s, peak memory, time/<phase>).
2. configs/demo_generate.py, its first --generate_steps steps, in each checkout: the same.
3. The other checkout's demo stopped at --resume_at (a checkpoint there), then resumed by this
   checkout to the end: its metrics must match the other checkout's uninterrupted run, and its
   final weights must equal them bit for bit.

Every run uses the device and threads given (CPU by default); the demo task is built once and
shared. Exit status 1 when something differs, with the first difference named; 2 for bad arguments,
refused before any run.
"""

import argparse
import math
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

from common import UserError, run_cli  # noqa: E402

# this folder is on the path of a script
import arguments  # noqa: E402

TIMING = ("dt", "samples_per_s", "tokens_per_s", "peak_mem_gb")


def train(checkout, out_dir, config, *overrides):
    """train_ppo.py of a checkout, run in that checkout (its own modules are imported)."""
    args = [sys.executable, "train_ppo.py", config, f"--out_dir={out_dir}", *overrides]
    proc = subprocess.run(args, cwd=checkout, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(args[1:])} in {checkout} failed:\n{proc.stderr[-2000:]}")


def read_metrics(out_dir):
    return [{k: v for k, v in row.items() if k not in TIMING and not k.startswith("time/")}
            for row in arguments.run_metrics(out_dir)]


def first_difference(a, b):
    """-> None, or a line saying where two metrics logs first differ (NaN equals NaN)."""
    same = lambda x, y: x == y or (isinstance(x, float) and isinstance(y, float)  # noqa: E731
                                    and math.isnan(x) and math.isnan(y))
    for i, (row_a, row_b) in enumerate(zip(a, b)):
        keys = sorted(set(row_a) | set(row_b))
        for key in keys:
            if not same(row_a.get(key), row_b.get(key)):
                return (f"line {i + 1} (step {row_a.get('step')}): {key} "
                        f"{row_a.get(key)!r} vs {row_b.get(key)!r}")
    if len(a) != len(b):
        return f"{len(a)} lines vs {len(b)}"
    return None


def report(what, difference):
    print(f"{what}: {'identical' if difference is None else 'DIFFERENT, ' + difference}")
    return difference is None


def final_weights(out_dir, step):
    from weights import checkpoint_path, load_checkpoint  # the models' libraries, as below

    return load_checkpoint(checkpoint_path(out_dir, step))["model"]


def demo_steps():
    """The steps of configs/demo.py's run, as this checkout's train_ppo.py reads it."""
    import train_ppo  # the models' libraries: only once the cheaper checks have passed

    return train_ppo.load_config([os.path.join(HERE, "configs", "demo.py")]).max_steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--before", required=True, help="the other checkout")
    parser.add_argument("--work", default="/tmp/same_training", help="a folder for the runs")
    parser.add_argument("--generate_steps", type=int, default=20)
    parser.add_argument("--resume_at", type=int, default=20, help="a checkpoint step of the demo")
    args = parser.parse_args(argv)
    before = arguments.checkout(args.before)
    work = arguments.work_folder(args.work)
    arguments.at_least(args, 1, "--generate_steps")
    steps = demo_steps()
    if not 1 <= args.resume_at < steps:
        raise UserError(f"--resume_at {args.resume_at}: configs/demo.py's run has {steps} steps; "
                        f"give a step from 1 to {steps - 1}, where the other checkout stops and "
                        "this one resumes")
    os.makedirs(work, exist_ok=True)
    shared = f"--synthetic_dir={os.path.join(work, 'synthetic')}"
    run = lambda checkout, name, config, *o: train(  # noqa: E731
        checkout, os.path.join(work, name), config, shared, "--start_over=True", *o)

    run(before, "demo_before", "configs/demo.py")
    run(HERE, "demo_after", "configs/demo.py")
    ok = report("configs/demo.py, metrics.jsonl",
                first_difference(read_metrics(os.path.join(work, "demo_before")),
                                 read_metrics(os.path.join(work, "demo_after"))))

    steps = f"--max_steps={args.generate_steps}"
    run(before, "generate_before", "configs/demo_generate.py", steps)
    run(HERE, "generate_after", "configs/demo_generate.py", steps)
    ok &= report(f"configs/demo_generate.py, first {args.generate_steps} steps, metrics.jsonl",
                 first_difference(read_metrics(os.path.join(work, "generate_before")),
                                  read_metrics(os.path.join(work, "generate_after"))))

    resumed = os.path.join(work, "resumed")
    run(before, "resumed", "configs/demo.py", f"--max_steps={args.resume_at}")
    train(HERE, resumed, "configs/demo.py", shared, "--init_from=resume")
    straight = read_metrics(os.path.join(work, "demo_before"))
    ok &= report(f"a checkpoint of --before at step {args.resume_at} resumed here, metrics.jsonl",
                 first_difference(straight, read_metrics(resumed)))
    last = straight[-1]["step"]
    a, b = final_weights(os.path.join(work, "demo_before"), last), final_weights(resumed, last)
    ok &= report(f"the same, final weights at step {last}",
                 None if a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
                 else "some tensors differ")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    run_cli(main)
