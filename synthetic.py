"""
The offline demo task: a synthetic HellaSwag-format dataset whose right ending follows a rule a tiny model can
learn (every object has one colour), and a tiny GPT-Neo teacher that has learned the rule. The teacher is saved as
a transformers directory, so train_ppo.py loads it through reward.py exactly like a real reward model.

    python synthetic.py out/synthetic     # writes train.jsonl, val.jsonl and teacher/ (a transformers dir)
"""

import json
import os
import random
import shutil
import sys
import tempfile

import torch

from common import atomic_write_text

# objects and their one colour; every colour is a single GPT-2 token after a space
OBJECT_COLORS = {
    "banana": "yellow", "lemon": "yellow", "cherry": "red", "tomato": "red", "lime": "green", "grass": "green",
    "plum": "purple", "pumpkin": "orange", "carrot": "orange", "chocolate": "brown", "coffee": "brown",
    "sky": "blue", "ocean": "blue", "coal": "black", "snow": "white", "milk": "white", "flamingo": "pink",
}
COLORS = sorted(set(OBJECT_COLORS.values()))
NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Frank", "Grace", "Henry", "Julia", "Kevin", "Laura", "Mark"]
TEMPLATES = [
    "{name} looked closely at the {obj}. The {obj} was",
    "{name} drew a picture of the {obj} and coloured it",
    "Everyone knows that the {obj} is",
    "{name} asked what colour the {obj} is. The answer was",
]
SUFFIXES = [".", ", of course.", " as always.", "."]


def make_examples(n, seed, split):
    """n HellaSwag-format records: ctx, 4 endings that differ only in the colour, label of the right one."""
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
        examples.append({"ind": i, "activity_label": "Colours", "ctx": ctx, "endings": [c + suffix for c in colors],
                         "label": colors.index(right), "split": split, "split_type": "indomain",
                         "source_id": f"synthetic~{i}"})
    return examples


def write_jsonl(path, records):
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def train_teacher(examples, out_dir, steps=300, batch_size=32, lr=3e-3, seed=0):
    """Train a tiny GPT-Neo (GPT-2 vocabulary) on the right endings and save it as a transformers directory.
    The loss is taken on the ending tokens only, so the LM head runs at a handful of positions."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from tokenizer import EOT_TOKEN, gpt2_encoding, gpt2_hf_tokenizer

    enc = gpt2_encoding()
    torch.manual_seed(seed)
    config = GPTNeoConfig(vocab_size=50257, max_position_embeddings=64, hidden_size=64, num_layers=2, num_heads=2,
                          attention_types=[[["global"], 2]], intermediate_size=256, bos_token_id=EOT_TOKEN,
                          eos_token_id=EOT_TOKEN, embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0)
    model = GPTNeoForCausalLM(config)
    rows = []
    for ex in examples:
        ctx, ending = enc.encode_ordinary(ex["ctx"]), enc.encode_ordinary(" " + ex["endings"][ex["label"]])
        rows.append((ctx + ending, len(ctx)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        batch = rng.sample(rows, batch_size)
        T = max(len(tokens) for tokens, _ in batch)
        idx = torch.full((batch_size, T), EOT_TOKEN)
        target = torch.zeros(batch_size, T, dtype=torch.bool)  # positions whose next token is an ending token
        for i, (tokens, n_ctx) in enumerate(batch):
            idx[i, :len(tokens)] = torch.tensor(tokens)
            target[i, n_ctx - 1:len(tokens) - 1] = True
        hidden = model.transformer(input_ids=idx).last_hidden_state
        logits = model.lm_head(hidden[target])
        loss = torch.nn.functional.cross_entropy(logits, idx[:, 1:][target[:, :-1]])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    # write into a temp dir and rename, so an interrupted run never leaves a half-written teacher
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".teacher.")
    try:
        model.save_pretrained(tmp)
        gpt2_hf_tokenizer().save_pretrained(tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return loss.item()


def prepare(out_dir, n_train=2000, n_val=200, seed=0, teacher_steps=300, log=print):
    """Write the demo task into out_dir (train.jsonl, val.jsonl, teacher/) unless it is already there."""
    paths = {"train": os.path.join(out_dir, "train.jsonl"), "val": os.path.join(out_dir, "val.jsonl"),
             "teacher": os.path.join(out_dir, "teacher")}
    for split, n in (("train", n_train), ("val", n_val)):
        if not os.path.exists(paths[split]):
            write_jsonl(paths[split], make_examples(n, seed, split))
    if not os.path.exists(os.path.join(paths["teacher"], "config.json")):
        log(f"training the synthetic teacher ({teacher_steps} steps) into {paths['teacher']}")
        train_examples = [json.loads(line) for line in open(paths["train"], encoding="utf-8")]
        loss = train_teacher(train_examples, paths["teacher"], steps=teacher_steps, seed=seed)
        log(f"teacher trained, final loss on the right endings {loss:.3f}")
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python synthetic.py OUT_DIR", file=sys.stderr)
        sys.exit(2)
    prepare(sys.argv[1])
