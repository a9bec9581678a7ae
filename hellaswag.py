"""
HellaSwag: the data, one fast batched scorer, and the evaluation CLI.

    examples = load_examples("val")                              # downloads once into $HELLASWAG_CACHE
    result = evaluate(model, examples, style="completion")       # {"n": ..., "acc": ..., "acc_norm": ...}

    python hellaswag.py --model gpt2 --split val --style completion --output results.json --predictions preds.jsonl
    python hellaswag.py --compare before.jsonl after.jsonl

Two scoring styles, both documented in the README:
- "completion" (build-nanogpt): context = ctx, continuations = " " + ending; acc_norm divides the summed
  log-prob of an ending by its number of tokens.
- "lm-eval" (EleutherAI lm-evaluation-harness): context = activity label + ": " + ctx_a + " " + ctx_b capitalised,
  bracket tags cleaned; acc_norm divides by the ending's number of characters.
"""

import argparse
import json
import math
import os
import re
import sys
import time
import urllib.error
import urllib.request

import torch

from common import UserError, atomic_path, atomic_write_text, autocast, resolve_device, run_cli
from model import GPT, logprobs_from_logits
from tokenizer import EOT_TOKEN

STYLES = ("completion", "lm-eval")
SPLITS = ("train", "val", "test")
SPLIT_LINES = {"train": 39905, "val": 10042, "test": 10003}  # the official files, one example a line
DATA_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
HUB_DATASET = "Rowan/hellaswag"
OPTIONAL_FIELDS = {"ind": int, "activity_label": str, "ctx_a": str, "ctx_b": str, "split": str, "split_type": str,
                   "source_id": str}

# -----------------------------------------------------------------------------------------------------------------
# data: download, read, validate


def default_cache_dir():
    return os.environ.get("HELLASWAG_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hellaswag")


def download_split(split, cache_dir=None, url=None, retries=3, retry_wait=2.0, timeout=60):
    """Download the official jsonl of `split` into cache_dir (once) and return its path. The file appears only
    complete: it is written to a temporary name, its line count checked, then renamed."""
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    path = os.path.join(cache_dir or default_cache_dir(), f"hellaswag_{split}.jsonl")
    if os.path.exists(path):
        return path
    url = url or DATA_URL.format(split=split)
    for attempt in range(1, retries + 1):
        try:
            with atomic_path(path) as tmp:
                _fetch(url, tmp, desc=os.path.basename(path), timeout=timeout)
                with open(tmp, "rb") as f:
                    n_lines = sum(1 for line in f if line.strip())
                if n_lines != SPLIT_LINES[split]:
                    raise UserError(f"{url}: downloaded {n_lines} examples, expected {SPLIT_LINES[split]} "
                                    f"for the {split} split; nothing was saved, run again")
            return path
        except (urllib.error.URLError, OSError) as e:  # HTTPError is a URLError
            if attempt == retries:
                reason = getattr(e, "reason", None) or e
                raise UserError(f"could not download {url} after {retries} tries ({reason}); without internet, "
                                f"put hellaswag_{split}.jsonl in {os.path.dirname(path)} or pass --data FILE") from None
            print(f"download failed ({e}), retrying in {retry_wait * attempt:.0f}s", file=sys.stderr)
            time.sleep(retry_wait * attempt)


def _fetch(url, out_path, desc, timeout):
    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=timeout) as response, open(out_path, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr) as bar:
            while chunk := response.read(1 << 16):
                f.write(chunk)
                bar.update(len(chunk))
        if total is not None and bar.n != total:
            raise OSError(f"connection closed after {bar.n} of {total} bytes")


def load_examples(split="val", data_file=None, cache_dir=None, limit=None, hub=False):
    """
    Validated examples, in file order: dicts with ctx, endings (4 str), label (0-3, None when unlabeled), index
    (0-based position) and the optional fields the data has. data_file reads any jsonl in the official schema;
    hub=True reads the Hugging Face copy (Rowan/hellaswag) through `datasets` instead of the official files.
    """
    if data_file is not None:
        records = _read_jsonl(data_file)
    elif hub:
        records = _read_hub(split)
    else:
        data_file = download_split(split, cache_dir)
        records = _read_jsonl(data_file)
    examples = []
    for where, obj in records:
        if limit is not None and len(examples) >= limit:
            break
        examples.append(validate_record(obj, where, index=len(examples)))
    if not examples:
        raise UserError(f"{data_file or HUB_DATASET}: no examples")
    return examples


def _read_jsonl(path):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
            yield f"{path}, line {n}", obj


def _read_hub(split):
    import datasets

    hub_split = {"val": "validation"}.get(split, split)
    try:
        data = datasets.load_dataset(HUB_DATASET, split=hub_split)
    except Exception as e:  # datasets raises many types for offline / missing
        raise UserError(f"could not load {HUB_DATASET} split '{hub_split}' through datasets ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); use the official files instead") from None
    for n, obj in enumerate(data):
        yield f"{HUB_DATASET} {hub_split}, row {n}", obj


def validate_record(obj, where, index):
    """One record of the official schema -> an example dict, or a UserError naming `where` and the field."""
    def bad(field, problem):
        return UserError(f"{where}: field '{field}': {problem}")

    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    example = {"index": index}
    for field, kind in OPTIONAL_FIELDS.items():
        value = obj.get(field)
        if value is None:
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            raise bad(field, f"expected {kind.__name__}, found {type(value).__name__}")
        example[field] = value
    ctx = obj.get("ctx")
    if ctx is None and "ctx_a" in example:  # the official files have both; ctx = ctx_a + " " + ctx_b
        ctx = " ".join(part for part in (example["ctx_a"], example.get("ctx_b", "")) if part)
    if not isinstance(ctx, str) or not ctx.strip():
        raise bad("ctx", "missing or empty (need ctx, or ctx_a and ctx_b)")
    example["ctx"] = ctx
    endings = obj.get("endings")
    if not isinstance(endings, list) or len(endings) != 4:
        found = f"{len(endings)} items" if isinstance(endings, list) else type(endings).__name__
        raise bad("endings", f"expected a list of 4 strings, found {found}")
    for j, ending in enumerate(endings):
        if not isinstance(ending, str) or not ending.strip():
            raise bad("endings", f"ending {j} is empty or not a string")
    example["endings"] = list(endings)
    example["label"] = _parse_label(obj.get("label"), bad)
    return example


def _parse_label(label, bad):
    if label is None or label == "":  # the test split has no labels ("" in the hub copy)
        return None
    if isinstance(label, str) and label.strip().isdigit():  # the hub copy stores "0".."3"
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label <= 3:
        raise bad("label", f"expected an integer 0-3, found {label!r}")
    return label


# -----------------------------------------------------------------------------------------------------------------
# rendering: the exact strings and tokens that are scored


def lm_eval_preprocess(text):
    """lm-evaluation-harness's hellaswag `preprocess`, kept exactly (one pass of the double-space replace included),
    so that the two styles' predictions can match the harness's."""
    text = text.strip()
    text = text.replace(" [title]", ". ")  # bracket tags are artifacts of the WikiHow part of HellaSwag
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def example_texts(example, style="completion"):
    """-> (context, 4 continuations): the strings scored, each continuation with its leading space."""
    if style == "completion":
        return example["ctx"], [" " + ending for ending in example["endings"]]
    if style == "lm-eval":
        # data without ctx_a/ctx_b (e.g. a preprocessed copy) uses ctx uncapitalised; without an activity label
        # there is no prefix
        ctx_a, ctx_b = example.get("ctx_a", example["ctx"]), example.get("ctx_b", "")
        query = ctx_a + " " + ctx_b.capitalize()
        if "activity_label" in example:
            query = example["activity_label"] + ": " + query
        return lm_eval_preprocess(query), [" " + lm_eval_preprocess(ending) for ending in example["endings"]]
    raise UserError(f"unknown style '{style}'; choose one of {', '.join(STYLES)}")
