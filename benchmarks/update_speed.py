"""
One PPO minibatch update of the generate recipe, as ppo_update runs it: sequence_forward's forward
and backward over the minibatch's micro-batches with the clipped losses, gradient clipping and the
AdamW step, on a GPT-2-124M-sized model with random weights. On a CPU this is three quarters of a
generate step (the rest: sampling, the reference's forward, the judge).

    # this checkout, a minute or two on 2 cores
    python benchmarks/update_speed.py
    # against an earlier commit: its checkout and this one take turns, each in a fresh process
    git worktree add ../before <commit>
    python benchmarks/update_speed.py --before ../before

Both checkouts get the same weights and the same minibatch: 16 rows, micro-batches of 8, prompts of
24-48 tokens (left-padded) and responses of 1-32 tokens (right-padded), the recipe's shapes. Each
uses its own train_ppo.py and model.py: micro_batches where it has them (else consecutive rows),
and no entropy gradient where sequence_forward can skip it (the recipe's ent_coef is 0). The
script prints the median seconds of an update, the ratio, and how far apart the two checkouts'
gradient norms are.
"""

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from common import UserError, first_line, run_cli  # noqa: E402

# this folder is on the path of a script
import arguments  # noqa: E402


def worker(args):
    """In a fresh process with the checkout's modules: time args.updates updates. -> JSON line."""
    import torch

    sys.path.remove(REPO)
    sys.path.insert(0, args.worker)
    sys.modules.pop("common")  # imported from this checkout above
    import train_ppo
    from model import GPT, GPTConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    shape = dict(n_layer=2, n_head=2, n_embd=64) if args.tiny else {}
    torch.manual_seed(args.seed)
    model = GPT(GPTConfig(**shape))
    optimizer = model.configure_optimizers(0.0, 1e-5, (0.9, 0.95), "cpu")
    g = torch.Generator().manual_seed(args.seed)
    B, P, N = 16, 48, 32
    prompts = torch.randint(0, 50257, (B, P), generator=g)
    responses = torch.randint(0, 50257, (B, N), generator=g)
    prompt_len = torch.randint(P // 2, P + 1, (B,), generator=g)
    response_len = torch.randint(1, N + 1, (B,), generator=g)
    prompt_mask = (torch.arange(P) >= P - prompt_len[:, None]).long()
    response_mask = (torch.arange(N) < response_len[:, None]).long()
    old_logprobs, advantages, old_values, returns = torch.randn(4, B, N, generator=g)
    old_logprobs = old_logprobs - 5
    if hasattr(train_ppo, "micro_batches"):
        micros = train_ppo.micro_batches(torch.arange(B), prompt_len + response_len, 8)
    else:
        micros = list(torch.arange(B).split(8))
    extra = ({"entropy_grad": False}
             if "entropy_grad" in inspect.signature(train_ppo.sequence_forward).parameters else {})
    mask = response_mask.float()
    times, grad_norms = [], []
    for _ in range(args.updates + 1):  # the first allocates
        start = time.perf_counter()
        for micro in micros:
            logprobs, values, _ = train_ppo.sequence_forward(
                model, prompts[micro], prompt_mask[micro], responses[micro], response_mask[micro],
                1.0, **extra)
            losses = train_ppo.ppo_losses(logprobs, old_logprobs[micro], advantages[micro], values,
                                          old_values[micro], returns[micro], mask[micro], 0.2, 0.2)
            loss = losses["pg_loss"] + 0.5 * losses["vf_loss"]
            (loss * mask[micro].sum() / mask.sum()).backward()
        grad_norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    print(json.dumps({"times": times[1:], "grad_norms": grad_norms}))


def run_worker(checkout, args):
    command = [sys.executable, os.path.abspath(__file__), "--worker", checkout,
               "--updates", str(args.updates), "--seed", str(args.seed)]
    command += ["--tiny"] if args.tiny else []
    command += ["--threads", str(args.threads)] if args.threads else []
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        raise UserError(f"the update failed in {checkout}: {first_line(last) or proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--before", help="another checkout of the project, to compare against")
    parser.add_argument("--rounds", type=int, default=4,
                        help="fresh processes per checkout, taking turns")
    parser.add_argument("--updates", type=int, default=6,
                        help="timed updates per process (after one untimed)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true",
                        help="a 2-layer, 64-dim model: checks the script quickly")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    arguments.at_least(args, 1, "--rounds", "--updates", "--threads")
    arguments.at_least(args, 0, "--seed")
    if args.worker:
        return worker(args)
    checkouts = {"this checkout": REPO}
    if args.before:
        checkouts = {f"--before {args.before}": arguments.checkout(args.before), **checkouts}
    runs = {name: [] for name in checkouts}
    for _ in range(args.rounds):
        for name, path in checkouts.items():
            runs[name].append(run_worker(path, args))
    medians = {name: statistics.median(t for r in rs for t in r["times"])
               for name, rs in runs.items()}
    print(f"one minibatch update (16 rows, micro-batches of 8), "
          f"{'tiny' if args.tiny else 'GPT-2 124M'} shape, {args.updates} updates in each of "
          f"{args.rounds} fresh processes per checkout")
    base = next(iter(medians.values()))
    for name, seconds in medians.items():
        spread = [round(statistics.median(r["times"]), 3) for r in runs[name]]
        print(f"{name:<40} median {seconds:.3f} s  ({base / seconds:.2f}x)  "
              f"per process {spread}")
    if args.before:
        before_norms, norms = (rs[0]["grad_norms"] for rs in runs.values())
        worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(before_norms, norms))
        print("largest relative difference in the gradient norms between the checkouts: "
              f"{worst:.1e}")


if __name__ == "__main__":
    run_cli(main)
