"""
What a recipe costs per PPO step, in seconds and peak memory, measured without downloading anything:
the recipe's models are replaced by stand-ins of the same shapes with random weights (GPT-2 124M
policy, gpt-neo-2.7B reward model), and its data by a local HellaSwag jsonl. Time and memory depend
on shapes and lengths, not on weights, except where the weights set a length: under the generate
recipe a random policy rarely samples a stop, so every sample runs to max_new_tokens and the figure
is an upper bound. One process, no DDP: an 8-GPU run adds DDP's gradient buckets (about one float32
copy of the policy) and all-reduce time; CUDA memory is the allocator's peak.

    python benchmarks/recipe_cost.py configs/gpt2_hellaswag_teacher.py --device=cuda
    python benchmarks/recipe_cost.py configs/gpt2_hellaswag_generate.py --device=cuda --steps 6
    python benchmarks/recipe_cost.py configs/gpt2_hellaswag_label.py --device=cpu --steps 3 \
        --batch_size=16 --minibatch_size=8 --micro_batch_size=8
    # a quick check
    python benchmarks/recipe_cost.py configs/gpt2_hellaswag_teacher.py --tiny --device=cpu

Any `--key=value` after the recipe overrides it, as with train_ppo.py. The first step is reported
apart: it pays for warm-up (and, under the teacher recipe, every step of the first epoch pays for
scoring its examples with the teacher, as in a real run). Stand-ins are kept in --work so that later
runs skip building them. Skips (exit 0) when the data file is absent.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_ppo  # noqa: E402
from common import UserError, resolve_device, run_cli  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from causal_lm import resolve_dtype  # noqa: E402
from tokenizer import gpt2_hf_tokenizer  # noqa: E402
from weights import HUB_GPT2_NAMES  # noqa: E402

# this folder is on the path of a script
from hellaswag_speed import DEFAULT_DATA, cpu_name  # noqa: E402

# the published shapes of the hub models the recipes name
GPT2_SHAPES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
               "gpt2-xl": (48, 25, 1600)}  # n_layer, n_head, n_embd
GPT_NEO_SHAPES = {"EleutherAI/gpt-neo-125m": (12, 12, 768),
                  "EleutherAI/gpt-neo-1.3B": (24, 16, 2048),
                  "EleutherAI/gpt-neo-2.7B": (32, 20, 2560)}  # num_layers, num_heads, hidden_size
TINY = (2, 2, 64)


def policy_stand_in(name, work, tiny):
    """-> (a transformers directory holding a GPT-2 of the hub model's shape with random weights,
    whether it was built now)."""
    if name not in HUB_GPT2_NAMES:
        return name, False  # a local directory or checkpoint: measured as it is
    n_layer, n_head, n_embd = TINY if tiny else GPT2_SHAPES[name]
    path = os.path.join(work, f"policy-{name}{'-tiny' if tiny else ''}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path, False
    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd)).save_pretrained(path)
    return path, True


def reward_stand_in(name, work, tiny, build_device, dtype):
    """-> (a transformers directory holding a GPT-Neo of the hub model's shape with random weights
    in dtype, whether it was built now)."""
    if os.path.isdir(name):
        return name, False
    if name not in GPT_NEO_SHAPES:
        raise UserError(f"reward_model {name!r}: no stand-in shape known for it; pass a local "
                        "transformers directory (--reward_model=DIR) or one of "
                        f"{', '.join(GPT_NEO_SHAPES)}")
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    num_layers, num_heads, hidden_size = TINY if tiny else GPT_NEO_SHAPES[name]
    path = os.path.join(work, f"reward-{name.split('/')[-1]}{'-tiny' if tiny else ''}"
                              f"-{str(dtype).split('.')[-1]}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path, False
    config = GPTNeoConfig(vocab_size=50257, hidden_size=hidden_size, num_layers=num_layers,
                          num_heads=num_heads,
                          attention_types=[[["global", "local"], num_layers // 2]],
                          window_size=256, max_position_embeddings=2048)
    torch.manual_seed(0)
    # random init of 2.7B parameters is minutes on a CPU, seconds on a GPU
    with torch.device(build_device):
        model = GPTNeoForCausalLM(config).to(dtype)
    tmp = tempfile.mkdtemp(dir=work, prefix=".reward-")  # renamed into place once complete
    try:
        model.save_pretrained(tmp)
        gpt2_hf_tokenizer().save_pretrained(tmp)
        os.replace(tmp, path)
    finally:
        # gone already after the rename; gigabytes if the save failed
        shutil.rmtree(tmp, ignore_errors=True)
    return path, True


def summarize(metrics_path):
    with open(metrics_path) as f:
        steps = [m for m in map(json.loads, f) if "dt" in m]
    if not steps:
        raise UserError(f"{metrics_path}: the run logged no step")
    later = steps[1:] or steps
    # where a later step's time goes: rollout, reference, reward, update (train_ppo's time/<phase>)
    phases = [k.split("/", 1)[1] for k in later[0] if k.startswith("time/")]
    return {"steps": len(steps), "first_step_s": steps[0]["dt"],
            "step_s": statistics.median(m["dt"] for m in later),
            "phase_s": {p: statistics.median(m.get(f"time/{p}", 0.0) for m in later)
                        for p in phases},
            "samples_per_s": statistics.median(m["samples_per_s"] for m in later),
            "tokens_per_s": statistics.median(m["tokens_per_s"] for m in later),
            "peak_mem_gb": max(m["peak_mem_gb"] for m in steps)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("recipe", help="a configs/*.py file")
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help="HellaSwag jsonl for training and the (small) eval")
    parser.add_argument("--steps", type=int, default=4,
                        help="PPO steps to run (the first is reported apart)")
    parser.add_argument("--tiny", action="store_true",
                        help="2-layer, 64-dim stand-ins: checks the script quickly")
    parser.add_argument("--work", default=os.path.join("out", "recipe_cost"),
                        help="stand-ins and run folders")
    parser.add_argument("--output", help="also write the result to this JSON file")
    args, overrides = parser.parse_known_args(argv)
    if args.steps < 1:
        raise UserError("--steps must be at least 1")
    if not os.path.isfile(args.data):
        print(f"skipped: no data file at {args.data} (pass --data FILE)")
        return None
    cfg = train_ppo.load_config([args.recipe, *overrides])  # config errors before anything is built
    device = resolve_device(cfg.device)
    os.makedirs(args.work, exist_ok=True)

    stand_ins = {}
    stand_ins["init_from"], built = policy_stand_in(cfg.init_from, args.work, args.tiny)
    if train_ppo.REWARD_KINDS[cfg.reward_kind].judge:
        dtype = resolve_dtype(cfg.reward_dtype, device)  # what CausalLM.load will load it in
        stand_ins["reward_model"], built_reward = reward_stand_in(cfg.reward_model, args.work,
                                                                  args.tiny, device, dtype)
        built = built or built_reward
    if device.startswith("cuda"):  # building a stand-in on the GPU must not count as the run's peak
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    name = os.path.splitext(os.path.basename(args.recipe))[0]
    run_dir = os.path.join(args.work, f"run-{name}")
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: no resume, an empty teacher cache
    settings = {**stand_ins, "out_dir": run_dir, "train_data": args.data, "val_data": args.data,
                "max_steps": args.steps, "eval_interval": 0, "eval_limit": 64,
                "checkpoint_interval": args.steps, "sample_interval": args.steps,
                "export_hf": False, "wandb_log": False}
    cfg = train_ppo.load_config([args.recipe, *overrides,
                                 *(f"--{k}={v}" for k, v in settings.items())])
    train_ppo.train(cfg)
    result = {"recipe": args.recipe, "overrides": overrides, "tiny": args.tiny, "device": device,
              "device_name": (torch.cuda.get_device_name(device) if device.startswith("cuda")
                              else cpu_name()),
              "torch": torch.__version__, "batch_size": cfg.batch_size,
              "micro_batch_size": cfg.micro_batch_size, "ppo_epochs": cfg.ppo_epochs,
              **summarize(os.path.join(run_dir, "metrics.jsonl"))}
    print(f"\n{args.recipe}{' (tiny stand-ins)' if args.tiny else ''} | {result['device_name']} | "
          f"torch {result['torch']} | batch {cfg.batch_size} per rank, "
          f"micro-batch {cfg.micro_batch_size}")
    print(f"first step {result['first_step_s']:.2f}s | later steps {result['step_s']:.2f}s "
          f"({result['samples_per_s']:.1f} samples/s, {result['tokens_per_s']:.0f} tok/s) | "
          f"peak memory {result['peak_mem_gb']:.2f} GB")
    print("later steps by phase: " + " | ".join(f"{phase} {seconds:.2f}s"
                                                 for phase, seconds in result["phase_s"].items()))
    if built and not device.startswith("cuda"):
        result["note"] = ("peak memory (process RSS) includes building the stand-ins; rerun for "
                          "the run's own figure")
        print(result["note"])
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    run_cli(main)
