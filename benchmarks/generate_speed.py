"""
Sampling speed: GPT.generate against transformers' GPT2LMHeadModel.generate on the same weights
(exported with GPT.save_pretrained), and against GPT.generate as it was at an earlier commit
(model.py read from git), on a GPT-2-124M-sized model with random weights.

    # CPU, B=16, 48 prompt + 48 new tokens, ~5 minutes
    python benchmarks/generate_speed.py
    # steadier on a machine shared with other jobs
    python benchmarks/generate_speed.py --rounds 3 --threads 1

Every method samples (temperature 1, no top-k / top-p) exactly new-tokens tokens per row (no stop
token), and the methods take turns, round after round, so that a load change on a shared machine
hits them all alike. Before timing, the script checks that greedy decoding gives the same tokens
with both models (same weights, same math).
"""

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.nn import functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from common import UserError, run_cli  # noqa: E402
from model import GPT, GPTConfig, sample_next_token  # noqa: E402

# this folder is on the path of a script
import arguments  # noqa: E402
from hellaswag_speed import cpu_name  # noqa: E402

# the last commit before the preallocated KV cache and the exponential-race sampler
BEFORE = "43b3ad9"


def model_source(rev):
    """model.py as it was at git revision rev; None where git cannot show it (no git, no such
    revision, a copy without history)."""
    try:
        return subprocess.run(["git", "show", f"{rev}:model.py"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def model_at_commit(rev, source, state_dict, config):
    """GPT from model.py's source at git revision rev, with the given weights."""
    path = os.path.join(tempfile.mkdtemp(), f"model_{rev}.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"model_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    old = module.GPT(module.GPTConfig(**vars(config))).eval()
    old.load_state_dict(state_dict)
    return old


def timed(fn):
    """-> (wall seconds, CPU seconds of this process)"""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def multinomial_next_token(logits, generator):
    """GPT.generate's sampling step before the exponential race (temperature 1, no top-k /
    top-p)."""
    logp = F.log_softmax(logits, dim=-1)
    next_token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)
    return next_token, logp.gather(-1, next_token[:, None]).squeeze(-1)


def sampler_times(batch_size, vocab_size, seed, repeats=50):
    """Print the median time of one sampling step, (B, V) logits -> tokens and log-probs, by each
    sampler."""
    logits = torch.randn(batch_size, vocab_size, generator=torch.Generator().manual_seed(seed)) * 3
    generator = torch.Generator().manual_seed(seed)
    samplers = {"torch.multinomial": lambda: multinomial_next_token(logits, generator),
                "exponential race (sample_next_token)":
                    lambda: sample_next_token(logits, generator=generator)}
    times = {name: [] for name in samplers}
    for _ in range(repeats):
        for name, sampler in samplers.items():
            times[name].append(timed(sampler)[0])
    print(f"one sampling step, ({batch_size}, {vocab_size}) logits: " + ", ".join(
        f"{name} {statistics.median(t) * 1e3:.1f} ms" for name, t in times.items()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--before", default=None,
                        help=f"git revision whose GPT.generate is also timed (default {BEFORE}, "
                             "skipped where git cannot show it; '' = skip)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    arguments.at_least(args, 1, "--batch-size", "--prompt-len", "--new-tokens", "--rounds",
                       "--threads")
    arguments.at_least(args, 0, "--seed")
    positions = GPTConfig().block_size
    if args.prompt_len + args.new_tokens > positions:
        raise UserError(f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} is more "
                        f"than GPT-2's {positions} positions")
    before = BEFORE if args.before is None else args.before
    source = model_source(before) if before else None
    if before and source is None:
        if args.before is not None:
            raise UserError(f"--before {before}: git cannot show model.py at that revision here; "
                            "give a commit of this repository, or --before '' to skip it")
        print(f"(GPT.generate at {before} skipped: git cannot show model.py at it here)")

    from transformers import GPT2LMHeadModel

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = GPT(GPTConfig()).eval()  # GPT-2 124M shape, random weights
    with tempfile.TemporaryDirectory() as export:
        model.save_pretrained(export)
        hf = GPT2LMHeadModel.from_pretrained(export).eval()
    # every row samples all new tokens, as GPT.generate with no stop tokens
    hf.generation_config.eos_token_id = None
    old = model_at_commit(before, source, model.state_dict(), model.config) if source else None
    B, P, N = args.batch_size, args.prompt_len, args.new_tokens
    idx = torch.randint(0, model.config.vocab_size, (B, P),
                        generator=torch.Generator().manual_seed(args.seed))
    mask = torch.ones_like(idx)
    print(f"GPT-2 124M shape, random weights | B={B}, {P} prompt + {N} new tokens, temperature 1 | "
          f"cpu: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads | "
          f"torch {torch.__version__}")

    def ours(gpt, n=N, temperature=1.0):
        return gpt.generate(idx, mask, max_new_tokens=n, temperature=temperature, stop_tokens=(),
                            generator=torch.Generator().manual_seed(args.seed))[0]

    @torch.no_grad()
    def theirs(n=N, sample=True):
        sampling = (dict(do_sample=True, top_k=0, temperature=1.0) if sample
                    else dict(do_sample=False))
        out = hf.generate(input_ids=idx, attention_mask=mask, max_new_tokens=n, pad_token_id=0,
                          **sampling)
        return out[:, P:]

    sampler_times(args.batch_size, model.config.vocab_size, args.seed)
    same = torch.equal(ours(model, 8, temperature=0), theirs(8, sample=False))
    print("greedy check, 8 tokens: GPT.generate and transformers "
          f"{'agree' if same else 'DISAGREE'}")
    methods = {"GPT.generate": lambda: ours(model), "transformers generate": theirs}
    if old is not None:
        methods[f"GPT.generate at {before}"] = lambda: ours(old)
    for method in methods.values():  # first calls allocate and pick kernels
        method()
    times = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, method in methods.items():
            times[name].append(timed(method))

    base = statistics.median(wall for wall, _ in times["transformers generate"])
    base_cpu = statistics.median(cpu for _, cpu in times["transformers generate"])
    header = (f"| {'method':<30} | {'median s':>8} | {'tokens/s':>8} | {'vs transformers':>15} | "
              f"{'CPU s':>6} | {'vs transformers, CPU s':>22} |")
    print("\n" + header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    for name, runs in times.items():
        wall, cpu = statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)
        print(f"| {name:<30} | {wall:>8.2f} | {B * N / wall:>8.1f} | {base / wall:>14.2f}x | "
              f"{cpu:>6.2f} | {base_cpu / cpu:>21.2f}x |")
    print(f"(median of {args.rounds} alternating rounds; CPU s is this process's CPU time, "
          "which time spent waiting for other jobs' threads does not count)")


if __name__ == "__main__":
    run_cli(main)
