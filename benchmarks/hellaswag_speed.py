"""
HellaSwag scoring speed: the one-forward-per-example loop of build-nanogpt (4 rows padded to the
longest, LM head at every position) against hellaswag.evaluate (shared context with a KV cache, LM
head only where an ending token is predicted, many examples per forward), on a GPT-2-124M-sized
model with random weights and real validation text.

    # CPU, a few minutes on 2 cores
    python benchmarks/hellaswag_speed.py --limit 200
    # steadier on a machine shared with other jobs
    python benchmarks/hellaswag_speed.py --limit 200 --threads 1
    python benchmarks/hellaswag_speed.py --limit 10042 --device cuda --batch-size 128

Random weights are fine for speed; the predictions of the two float32 paths must be identical. Skips
(exit 0) when the data file is absent.
"""

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import resolve_device, run_cli  # noqa: E402
from hellaswag import encode_example, evaluate, load_examples  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

# this folder is on the path of a script
import arguments  # noqa: E402
from whole_rows import choice_logprobs, pad_choices  # noqa: E402

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                            "data", "hellaswag_val_preprocessed.jsonl")


@torch.no_grad()
def naive_predictions(model, examples, device):
    """build-nanogpt's loop: per example, the 4 rows padded to the longest, one full forward, full
    LM head."""
    encode = model.tokens.encode
    preds, preds_norm = [], []
    for example in examples:
        idx, _, target_mask = pad_choices([encode_example(example, encode)])
        idx, target_mask = idx.to(device), target_mask.to(device)
        logits, _ = model(idx)  # right padding: causal attention never looks at the padding
        sums, n_tokens = choice_logprobs(logits, idx, target_mask)
        preds.append(sums.argmax(1).item())
        preds_norm.append((sums / n_tokens).argmax(1).item())
    return preds, preds_norm


def timed(fn):
    """-> (result, wall seconds, CPU seconds of this process). CPU time is the steadier of the two
    on a shared machine: time spent waiting for another job's threads is not counted."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def ready(args):
    """False (and a line saying why) where the data file is absent; else set torch's CPU threads
    from --threads."""
    if not os.path.isfile(args.data):
        print(f"skipping: {args.data} not found "
              "(the real HellaSwag text lives outside the project)")
        return False
    if args.threads:
        torch.set_num_threads(args.threads)
    return True


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slice", type=int, default=100, help="examples per turn of each method")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--skip-naive", action="store_true",
                        help="only time evaluate (e.g. the full set on a GPU)")
    args = parser.parse_args(argv)
    arguments.at_least(args, 1, "--limit", "--batch-size", "--slice", "--threads")
    arguments.at_least(args, 0, "--seed")
    if not ready(args):
        return
    device = resolve_device(args.device)
    examples = load_examples(data_file=args.data, limit=args.limit)
    torch.manual_seed(args.seed)
    model = GPT(GPTConfig()).to(device).eval()  # GPT-2 124M shape, random weights
    on = (torch.cuda.get_device_name() if device == "cuda"
          else f"{cpu_name()}, {torch.get_num_threads()} threads")
    print(f"{len(examples)} examples | GPT-2 124M shape, random weights | {device}: {on} | "
          f"torch {torch.__version__}")

    warmup = examples[:4]  # first calls allocate and pick kernels
    evaluate(model, warmup, batch_size=args.batch_size)
    evaluate(model, warmup, batch_size=args.batch_size, dtype="bfloat16")

    # methods take turns on slices of the data, so that a load change on a shared machine hits them
    # all alike
    methods = {} if args.skip_naive else {
        "one forward per example, float32": lambda exs: naive_predictions(model, exs, device)}
    for dtype in ("float32", "bfloat16"):
        methods[f"evaluate, batch {args.batch_size}, {dtype}"] = (
            lambda exs, dtype=dtype: _evaluate_predictions(model, exs, args.batch_size, dtype))
    if not args.skip_naive:
        naive_predictions(model, warmup, device)
    totals = {name: [0.0, 0.0, [], []] for name in methods}  # wall, cpu, preds, preds_norm
    for start in range(0, len(examples), args.slice):
        for name, method in methods.items():
            (preds, preds_norm), wall, cpu = timed(
                lambda: method(examples[start:start + args.slice]))
            total = totals[name]
            total[0] += wall
            total[1] += cpu
            total[2] += preds
            total[3] += preds_norm

    labels = [ex["label"] for ex in examples]
    base_name = next(iter(totals))
    base_wall, base_cpu, base_preds, base_norm = totals[base_name]
    header = (f"| {'method':<34} | {'examples/s':>10} | {'speedup':>7} | {'per CPU-s':>9} | "
              f"{'speedup':>7} | {'acc':>6} | {'acc_norm':>8} | "
              f"{'predictions changed (acc, acc_norm)':<36} |")
    print("\n" + header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    for name, (wall, cpu, preds, preds_norm) in totals.items():
        acc = sum(p == y for p, y in zip(preds, labels)) / len(labels)
        acc_norm = sum(p == y for p, y in zip(preds_norm, labels)) / len(labels)
        changed = sum(a != b for a, b in zip(preds, base_preds))
        changed_norm = sum(a != b for a, b in zip(preds_norm, base_norm))
        print(f"| {name:<34} | {len(labels) / wall:>10.2f} | {base_wall / wall:>6.2f}x | "
              f"{len(labels) / cpu:>9.2f} | {base_cpu / cpu:>6.2f}x | {acc:>6.4f} | "
              f"{acc_norm:>8.4f} | {f'{changed}, {changed_norm}':<36} |")
    print(f"(changes counted against '{base_name}'; examples/s is wall-clock, per CPU-s is per "
          "second of this process's CPU time)")


def _evaluate_predictions(model, examples, batch_size, dtype):
    predictions = evaluate(model, examples, batch_size=batch_size, dtype=dtype,
                           return_predictions=True)["predictions"]
    return [p["pred"] for p in predictions], [p["pred_norm"] for p in predictions]


if __name__ == "__main__":
    run_cli(main)
