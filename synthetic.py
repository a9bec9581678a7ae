"""
The offline demo task: a synthetic HellaSwag-format dataset whose right ending follows a rule a tiny
model can learn (every object has one colour), a tiny GPT-Neo teacher that has learned the rule, and
a tiny GPT policy that has learned the format but not the rule. Both models are saved as
transformers directories, so train_ppo.py loads the teacher through reward.py and the policy through
GPT.from_pretrained exactly like the real ones.

    python synthetic.py out/synthetic     # writes train.jsonl, val.jsonl, teacher/ and policy/
"""

import argparse
import json
import os
import random

import torch

# common before transformers: it keeps transformers from asking the hub for kernels
from common import (atomic_directory, atomic_write_text, check_output_path, read_json,
                    run_cli)
from transformers import GPTNeoConfig, GPTNeoForCausalLM
from model import GPT, GPTConfig
from tokenizer import EOT_TOKEN, gpt2_encoding, gpt2_hf_tokenizer
from weights import transformers_quietly

# objects and their one colour; every colour is a single GPT-2 token after a space
OBJECT_COLORS = {
    "banana": "yellow", "cherry": "red", "grass": "green", "plum": "purple", "pumpkin": "orange",
    "chocolate": "brown", "sky": "blue", "coal": "black", "snow": "white", "flamingo": "pink",
}
COLORS = sorted(set(OBJECT_COLORS.values()))
NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Frank",
         "Grace", "Henry", "Julia", "Kevin", "Laura", "Mark"]
TEMPLATES = [
    "{name} looked closely at the {obj}. The {obj} was",
    "{name} drew a picture of the {obj} and coloured it",
    "Everyone knows that the {obj} is",
    "{name} asked what colour the {obj} is. The answer was",
]
SUFFIXES = [".", ", of course.", " as always.", "."]


def make_examples(n, seed, split):
    """n HellaSwag-format records: ctx, 4 endings that differ only in the colour,
    label of the right one."""
    rng = random.Random(f"{seed}-{split}")
    objects = sorted(OBJECT_COLORS)
    examples = []
    for i in range(n):
        obj = rng.choice(objects)
        ctx = rng.choice(TEMPLATES).format(name=rng.choice(NAMES), obj=obj)
        right = OBJECT_COLORS[obj]
        colors = [right] + rng.sample([c for c in COLORS if c != right], 3)
        rng.shuffle(colors)
        suffix = rng.choice(SUFFIXES)
        examples.append({"ind": i, "activity_label": "Colours", "ctx": ctx,
                         "endings": [c + suffix for c in colors], "label": colors.index(right),
                         "split": split, "split_type": "indomain", "source_id": f"synthetic~{i}"})
    return examples


def write_jsonl(path, records):
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def fit_endings(hidden_fn, lm_head, parameters, rows, steps, batch_size=32, lr=3e-3, seed=0):
    """Language-model training on the ending tokens only (the LM head runs at a handful of
    positions). rows: (tokens, n_context) pairs; hidden_fn(idx) -> final hidden states (B, T, C).
    Returns the last loss."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    for _ in range(steps):
        batch = rng.sample(rows, batch_size)
        T = max(len(tokens) for tokens, _ in batch)
        idx = torch.full((batch_size, T), EOT_TOKEN)
        # positions whose next token is an ending token
        target = torch.zeros(batch_size, T, dtype=torch.bool)
        for i, (tokens, n_context) in enumerate(batch):
            idx[i, :len(tokens)] = torch.tensor(tokens)
            target[i, n_context - 1:len(tokens) - 1] = True
        logits = lm_head(hidden_fn(idx)[target])
        loss = torch.nn.functional.cross_entropy(logits, idx[:, 1:][target[:, :-1]])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss.item()


def ending_rows(examples, endings, block_size=None):
    """(context + ending tokens, context length) for each ending endings(example) names (a list of
    indices) of each example, the context cut from the left to fit block_size tokens."""
    encode = gpt2_encoding().encode_ordinary
    rows = []
    for ex in examples:
        context = encode(ex["ctx"])
        for i in endings(ex):
            ending = encode(" " + ex["endings"][i])
            tokens = (context + ending)[-block_size:] if block_size else context + ending
            rows.append((tokens, max(1, len(tokens) - len(ending))))
    return rows


def train_teacher(examples, out_dir, steps=300, seed=0):
    """A tiny GPT-Neo (GPT-2 vocabulary) trained on the right endings,
    saved as a transformers directory."""
    torch.manual_seed(seed)
    config = GPTNeoConfig(vocab_size=50257, max_position_embeddings=64, hidden_size=64,
                          num_layers=2, num_heads=2, attention_types=[[["global"], 2]],
                          intermediate_size=256, bos_token_id=EOT_TOKEN, eos_token_id=EOT_TOKEN,
                          embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0)
    model = GPTNeoForCausalLM(config).train()
    loss = fit_endings(lambda idx: model.transformer(input_ids=idx).last_hidden_state,
                       model.lm_head, model.parameters(),
                       ending_rows(examples, lambda ex: [ex["label"]]), steps, seed=seed)

    # an interrupted run leaves no half-written model
    with atomic_directory(out_dir) as tmp, transformers_quietly():
        model.eval().save_pretrained(tmp)
        gpt2_hf_tokenizer().save_pretrained(tmp)
    return loss


def pretrain_policy(examples, out_dir, steps=150, seed=0):
    """A tiny GPT (this project's model) that knows the format but not the rule: trained on a random
    one of the 4 endings, it writes "<colour>." after a context and picks each colour about equally
    often. PPO's job is to teach it the rule, as it would teach GPT-2 HellaSwag."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64)).train()
    rng = random.Random(seed)
    loss = fit_endings(model.hidden_states, model.lm_head, model.parameters(),
                       ending_rows(examples, lambda ex: [rng.randrange(4)]), steps, seed=seed)
    model.eval().save_pretrained(out_dir)  # atomic: a whole directory or none
    return loss


def task_paths(out_dir):
    return {"train": os.path.join(out_dir, "train.jsonl"),
            "val": os.path.join(out_dir, "val.jsonl"),
            "teacher": os.path.join(out_dir, "teacher"),
            "policy": os.path.join(out_dir, "policy")}


def is_complete(out_dir):
    """Whether out_dir holds the whole task: prepare() would only read it."""
    paths = task_paths(out_dir)
    return (os.path.isfile(paths["train"]) and os.path.isfile(paths["val"])
            and all(os.path.isfile(os.path.join(paths[m], "config.json"))
                    for m in ("teacher", "policy")))


def task_seed(out_dir):
    """The seed the task in out_dir was built with (each seed has its own task, teacher and policy),
    None if there is none or it does not say."""
    info_path = os.path.join(out_dir, "task.json")
    info = read_json(info_path) if os.path.isfile(info_path) else None
    return info.get("seed") if isinstance(info, dict) else None


def prepare(out_dir, n_train=2000, n_val=200, seed=0, teacher_steps=300, policy_steps=150,
            log=print):
    """Write the demo task into out_dir unless it is already there: train.jsonl, val.jsonl, teacher/
    (the reward model) and policy/ (the starting policy), the last two as transformers
    directories."""
    paths = task_paths(out_dir)
    if not os.path.exists(paths["train"]):
        atomic_write_text(os.path.join(out_dir, "task.json"), json.dumps({"seed": seed}) + "\n")
    for split, n in (("train", n_train), ("val", n_val)):
        if not os.path.exists(paths[split]):
            write_jsonl(paths[split], make_examples(n, seed, split))
    train_examples = None
    for name, fit, steps in (("teacher", train_teacher, teacher_steps),
                             ("policy", pretrain_policy, policy_steps)):
        if not os.path.exists(os.path.join(paths[name], "config.json")):
            if train_examples is None:
                train_examples = [json.loads(line)
                                  for line in open(paths["train"], encoding="utf-8")]
            log(f"training the synthetic {name} ({steps} steps) into {paths[name]}")
            loss = fit(train_examples, paths[name], steps=steps, seed=seed)
            log(f"synthetic {name} trained, final loss on its endings {loss:.3f}")
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the offline demo task: its data, a tiny "
                                                 "teacher and a tiny starting policy.")
    parser.add_argument("out_dir", help="where the task goes (train.jsonl, val.jsonl, teacher/, "
                                        "policy/); what is there already is kept")
    parser.add_argument("--seed", type=int, default=0, help="the task's seed (train_ppo.py's seed)")
    args = parser.parse_args(argv)
    check_output_path(args.out_dir, directory=True)  # before minutes of training
    return prepare(args.out_dir, seed=args.seed)


if __name__ == "__main__":
    run_cli(main)
