"""
HellaSwag scoring speed of a transformers model (a judge or teacher, or any model hellaswag.py
scores through causal_lm.py): each ending as a whole row (the path before contexts were shared),
each context once with its KV cache continued by its 4 endings (today's path), and
lm-evaluation-harness's HF scorer (HFLM.loglikelihood), on the same real validation examples in the
lm-eval style, with the predictions and log-likelihoods compared.

    python benchmarks/judge_speed.py --model SmolLM2-135M-Instruct.Q4_1.gguf --limit 200
    python benchmarks/judge_speed.py --model DIR --limit 500 --methods harness,shared

Each method scores from text (tokenizing included). Methods take turns on slices of the data, so
that a load change on a shared machine hits them all alike. Skips (exit 0) when the data file is
absent; lm-eval 0.4.13 is optional (pip install lm-eval==0.4.13).
"""

import argparse
import copy
import importlib.util
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from causal_lm import CausalLM, sequence_logprobs  # noqa: E402
from common import UserError, autocast, run_cli  # noqa: E402
from hellaswag import example_texts, load_examples  # noqa: E402

# this folder is on the path of a script
import arguments  # noqa: E402
from hellaswag_speed import DEFAULT_DATA, cpu_name, timed  # noqa: E402


METHODS = {"rows": "whole rows (before)", "shared": "shared context (today)",
           "harness": "lm-evaluation-harness HFLM"}


def pairs_of(examples):
    contexts, continuations = [], []
    for example in examples:
        context, endings = example_texts(example, "lm-eval")
        contexts += [context] * 4
        continuations += endings
    return contexts, continuations


def ours(lm, share, batch_size, dtype):
    """Our scorer from text: -> a function of examples giving (N, 4) summed log-probs."""
    def score(examples):
        rows = lm.encode_pairs(*pairs_of(examples))
        with autocast(lm.device, dtype):
            return sequence_logprobs(lm.model, rows, lm.pad_id, 4 * batch_size, lm.device,
                                     share=share).view(-1, 4)
    return score


def harness(lm, batch_size, dtype):
    """lm-evaluation-harness's HF scorer on the same model object and tokenizer (BOS as the
    project adds it)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    # a copy: .to() converts in place, and the other methods run the float32 model under autocast
    model = lm.model if dtype == "float32" else copy.deepcopy(lm.model).to(getattr(torch, dtype))
    hflm = HFLM(pretrained=model, tokenizer=lm.tokenizer, batch_size=4 * batch_size,
                device=lm.device, add_bos_token=bool(lm.prefix_ids), max_length=lm.max_length)

    def score(examples):
        requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i)
                    for i, pair in enumerate(zip(*pairs_of(examples)))]
        results = hflm.loglikelihood(requests, disable_tqdm=True)
        return torch.tensor([logprob for logprob, _ in results]).view(-1, 4)
    return score


def norm_lengths(examples):
    """lm-eval's acc_norm divisor: characters of each ending without its leading space."""
    return torch.tensor([[max(1, len(c) - 1) for c in example_texts(ex, "lm-eval")[1]]
                         for ex in examples], dtype=torch.float32)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--model", required=True,
                        help="a transformers model directory, hub name or .gguf file")
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32, help="examples per forward")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--slice", type=int, default=50, help="examples per turn of each method")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--methods", default="rows,shared,harness",
                        help="which to run, of rows, shared, harness (the first is the baseline)")
    args = parser.parse_args(argv)
    arguments.at_least(args, 1, "--limit", "--batch-size", "--slice", "--threads")
    chosen = args.methods.split(",")
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown or not chosen:
        raise UserError(f"--methods: unknown {', '.join(unknown)}; choose from "
                        f"{', '.join(METHODS)}")
    if "harness" in chosen and importlib.util.find_spec("lm_eval") is None:
        raise UserError("lm-eval is not installed: pip install lm-eval==0.4.13, or leave "
                        "harness out of --methods")
    if not os.path.isfile(args.data):
        print(f"skipping: {args.data} not found (the real HellaSwag text lives outside the "
              "project)")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    examples = load_examples(data_file=args.data, limit=args.limit)
    lm = CausalLM.load(args.model)
    print(f"{len(examples)} examples, lm-eval style | {lm} | {cpu_name()}, "
          f"{torch.get_num_threads()} threads | torch {torch.__version__}")

    makers = {"rows": lambda: ours(lm, False, args.batch_size, args.dtype),
              "shared": lambda: ours(lm, True, args.batch_size, args.dtype),
              "harness": lambda: harness(lm, args.batch_size, args.dtype)}
    methods = {METHODS[name]: makers[name]() for name in chosen}  # the first is the baseline
    for method in methods.values():  # first calls allocate and pick kernels
        method(examples[:2])

    totals = {name: [0.0, 0.0, []] for name in methods}  # wall, cpu, scores
    for start in range(0, len(examples), args.slice):
        for name, method in methods.items():
            scores, wall, cpu = timed(lambda: method(examples[start:start + args.slice]))
            totals[name][0] += wall
            totals[name][1] += cpu
            totals[name][2].append(scores)
    print_table(totals, examples)


def print_table(totals, examples):
    labels = torch.tensor([ex["label"] for ex in examples])
    lengths = norm_lengths(examples)
    base_name = next(iter(totals))
    base = torch.cat(totals[base_name][2])
    header = (f"| {'method':<28} | {'examples/s':>10} | {'speedup':>7} | {'per CPU-s':>9} | "
              f"{'acc':>6} | {'acc_norm':>8} | {'picks changed (acc, acc_norm)':<29} | "
              f"{'max abs diff':>14} |")
    print("\n" + header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    for name, (wall, cpu, parts) in totals.items():
        scores = torch.cat(parts)
        pred, pred_norm = scores.argmax(1), (scores / lengths).argmax(1)
        changed = (pred != base.argmax(1)).sum().item()
        changed_norm = (pred_norm != (base / lengths).argmax(1)).sum().item()
        print(f"| {name:<28} | {len(labels) / wall:>10.2f} | "
              f"{totals[base_name][0] / wall:>6.2f}x | {len(labels) / cpu:>9.2f} | "
              f"{(pred == labels).float().mean():>6.4f} | "
              f"{(pred_norm == labels).float().mean():>8.4f} | "
              f"{f'{changed}, {changed_norm}':<29} | {(scores - base).abs().max():>14.2e} |")
    print(f"(against '{base_name}'; examples/s is wall-clock, per CPU-s per second of this "
          "process's CPU time)")


if __name__ == "__main__":
    run_cli(main)
