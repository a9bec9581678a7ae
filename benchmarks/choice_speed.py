"""
Training-time multiple choice, forward + backward: the 4 rows context + ending per example that
PPO's choice rollouts ran before the shared-context forward (whole_rows.pad_choices, one forward)
against GPT.choice_forward (one packed row per example: the context once, its 4 endings attending to
it), which they run now, on a GPT-2-124M-sized model with random weights and real validation text.

    # CPU, batches of 16, a few minutes on 2 cores
    python benchmarks/choice_speed.py
    # steadier on a machine shared with other jobs
    python benchmarks/choice_speed.py --rounds 2 --threads 1

The two paths take turns on the same batches, so that a load change on a shared machine hits both
alike, and the script prints how far apart their log-probs, values and gradients are. Skips (exit 0)
when the data file is absent.
"""

import argparse
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import run_cli  # noqa: E402
from hellaswag import load_examples  # noqa: E402
from model import GPT, GPTConfig, pack_choices  # noqa: E402

# this folder is on the path of a script
import arguments  # noqa: E402
from hellaswag_speed import DEFAULT_DATA, cpu_name, ready  # noqa: E402
from whole_rows import choice_logprobs, pad_choices  # noqa: E402

def four_rows(model, encoded):
    """Today's path: (N, 4) summed ending log-probs and (N,) values at the last context token from
    4N full rows. -> the outputs and the number of token positions the transformer ran."""
    idx, attention_mask, target_mask = pad_choices(encoded)
    logits, values = model(idx, attention_mask, logits_at=target_mask.bool())
    sum_logprobs, _ = choice_logprobs(logits, idx, target_mask)
    last_context = torch.tensor([len(context) - 1 for context, _ in encoded])
    values = values.view(-1, 4, values.size(1))[:, 0].gather(1, last_context[:, None]).squeeze(1)
    return (sum_logprobs, values), idx.numel()


def shared_context(model, encoded):
    idx, segments = pack_choices(encoded)
    return model(idx, segments=segments), idx.numel()


def forward_backward(model, path, encoded):
    """-> (sum_logprobs, values, gradients, positions, wall seconds, CPU seconds) of one PPO-like
    loss"""
    model.zero_grad(set_to_none=True)
    wall, cpu = time.perf_counter(), time.process_time()
    (sum_logprobs, values), positions = path(model, encoded)
    (sum_logprobs.mean() + values.mean()).backward()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    grads = [p.grad for p in model.parameters()]
    return sum_logprobs.detach(), values.detach(), grads, positions, wall, cpu


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3,
                        help="batches, each run by both paths in turn")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    arguments.at_least(args, 1, "--batch-size", "--rounds", "--threads")
    arguments.at_least(args, 0, "--seed")
    if not ready(args):
        return
    torch.manual_seed(args.seed)
    # GPT-2 124M shape, random weights; eval mode, as PPO trains without dropout
    model = GPT(GPTConfig()).eval()
    examples = load_examples(data_file=args.data)
    # batches as PPO samples them: random, not sorted by length
    random.Random(args.seed).shuffle(examples)
    batches = [model.encode_choices(examples[i:i + args.batch_size], "completion")
               for i in range(0, args.rounds * args.batch_size, args.batch_size)]
    print(f"GPT-2 124M shape, random weights | {args.rounds} batches of {args.batch_size} "
          f"validation examples | cpu: {cpu_name()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} threads | torch {torch.__version__}")

    forward_backward(model, shared_context, batches[0][:2])  # first calls allocate
    forward_backward(model, four_rows, batches[0][:2])
    paths = {"4 rows per example (today)": four_rows, "GPT.choice_forward": shared_context}
    runs = {name: [] for name in paths}
    worst = [0.0, 0.0, 0.0]  # largest differences: log-probs, values, gradients
    for encoded in batches:
        out = {name: forward_backward(model, path, encoded) for name, path in paths.items()}
        for name, (*_, positions, wall, cpu) in out.items():
            runs[name].append((positions, wall, cpu))
        (a_lp, a_v, a_g, *_), (b_lp, b_v, b_g, *_) = out.values()
        worst = [max(worst[0], (a_lp - b_lp).abs().max().item()),
                 max(worst[1], (a_v - b_v).abs().max().item()),
                 max(worst[2], max((x - y).abs().max().item() for x, y in zip(a_g, b_g)))]

    base = next(iter(runs))
    base_wall = statistics.median(wall for _, wall, _ in runs[base])
    base_cpu = statistics.median(cpu for _, _, cpu in runs[base])
    header = (f"| {'forward + backward, batch ' + str(args.batch_size):<30} | {'positions':>9} | "
              f"{'median s':>8} | {'speedup':>7} | {'CPU s':>6} | {'speedup, CPU s':>14} |")
    print("\n" + header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    for name, batch_runs in runs.items():
        positions = statistics.mean(p for p, _, _ in batch_runs)
        wall = statistics.median(w for _, w, _ in batch_runs)
        cpu = statistics.median(c for _, _, c in batch_runs)
        print(f"| {name:<30} | {positions:>9.0f} | {wall:>8.2f} | {base_wall / wall:>6.2f}x | "
              f"{cpu:>6.2f} | {base_cpu / cpu:>13.2f}x |")
    print(f"(median over {args.rounds} batches; positions: padded token positions the transformer "
          "runs per batch, mean; CPU s: this process's CPU time, which waiting for other jobs' "
          "threads does not count)")
    print(f"largest differences between the paths: log-probs {worst[0]:.2e}, "
          f"values {worst[1]:.2e}, gradients {worst[2]:.2e}")


if __name__ == "__main__":
    run_cli(main)
