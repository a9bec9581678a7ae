r"""
HellaSwag: the data, one fast batched scorer, and the evaluation CLI.

    # downloads once into $HELLASWAG_CACHE
    examples = load_examples("val")
    # {"n": ..., "acc": ..., "acc_norm": ...}
    result = evaluate(model, examples, style="completion")

    python hellaswag.py --model gpt2 --split val --style completion --output results.json \
        --predictions preds.jsonl
    python hellaswag.py --compare before.jsonl after.jsonl

Two scoring styles, both documented in the README:
- "completion" (build-nanogpt): context = ctx, continuations = " " + ending; acc_norm divides the
  summed log-prob of an ending by its number of tokens.
- "lm-eval" (EleutherAI lm-evaluation-harness): context = activity label + ": " + ctx_a + " " +
  ctx_b capitalised, bracket tags cleaned; acc_norm divides by the ending's number of characters.
"""

import argparse
import hashlib
import http.client
import json
import math
import os
import re
import sys
import time
import urllib.request

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoTokenizer

from causal_lm import (CausalLM, PairError, load_causal_lm, sequence_logprobs, shares_vocab,
                       split_encode, unicode_problem)
from common import (PROGRESS_HELP, UserError, atomic_path, atomic_write_text, autocast,
                    autocast_dtype, check_output_path, first_line, looks_like_a_path, progress_bar,
                    read_json, read_jsonl, resolve_device, run_cli, same_error_on_every_rank,
                    shorten, write_errors_are_one_line)
from hf_policy import checkpoint_policy
from model import GPT, logprobs_from_logits
from tokenizer import gpt2_tokens
from weights import (check_finite_weights, checkpoint_source, gguf_directory, is_checkpoint,
                     is_gguf, unsupported_gpt2_setting, weights_fingerprint)

STYLES = ("completion", "lm-eval")
SPLITS = ("train", "val", "test")
# the official files, one example a line
SPLIT_LINES = {"train": 39905, "val": 10042, "test": 10003}
DATA_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
HUB_DATASET = "Rowan/hellaswag"
OPTIONAL_FIELDS = {"ind": int, "activity_label": str, "ctx_a": str, "ctx_b": str, "split": str,
                   "split_type": str, "source_id": str}

# --------------------------------------------------------------------------------------------------
# data: download, read, validate


def default_cache_dir():
    return (os.environ.get("HELLASWAG_CACHE")
            or os.path.join(os.path.expanduser("~"), ".cache", "hellaswag"))


def _fetch(url, out_path, desc, timeout):

    with urllib.request.urlopen(url, timeout=timeout) as response, open(out_path, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0) or None
        received = 0
        with progress_bar(total=total, unit="B", unit_scale=True, desc=desc) as bar:
            while chunk := response.read(1 << 16):
                f.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        if total is not None and received != total:
            raise OSError(f"connection closed after {received} of {total} bytes")


def _count_lines(path):
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def split_path(split, cache_dir=None):
    """Where the official jsonl of `split` is cached."""
    return os.path.join(cache_dir or default_cache_dir(), f"hellaswag_{split}.jsonl")


def download_split(split, cache_dir=None, url=None, retries=3, retry_wait=2.0, timeout=60):
    """Download the official jsonl of `split` into cache_dir (once) and return its path. The file
    appears only complete: it is written to a temporary name, its line count checked, then renamed.
    A cached file is checked too (one put there by hand may be cut short), so a split is never
    scored in part."""
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    path = split_path(split, cache_dir)
    if os.path.isdir(path):
        raise UserError(f"{path}: a directory where the cached {split} split should be; move it, "
                        "or point HELLASWAG_CACHE at another folder")
    if os.path.exists(path):
        try:
            n_lines = _count_lines(path)
        except OSError as e:
            raise UserError(f"{path}: cannot read the cached {split} split ({e.strerror}); fix its "
                            "permissions, or point HELLASWAG_CACHE at another folder") from None
        if n_lines != SPLIT_LINES[split]:
            raise UserError(f"{path}: {n_lines} examples, but the official {split} split has "
                            f"{SPLIT_LINES[split]}; delete the file to download it again, or pass "
                            "--data FILE to score a part on purpose")
        return path
    url = url or DATA_URL.format(split=split)
    for attempt in range(1, retries + 1):
        try:
            with atomic_path(path) as tmp:
                _fetch(url, tmp, desc=os.path.basename(path), timeout=timeout)
                n_lines = _count_lines(tmp)
                if n_lines != SPLIT_LINES[split]:
                    raise UserError(
                        f"{url}: downloaded {n_lines} examples, expected {SPLIT_LINES[split]} "
                        f"for the {split} split; nothing was saved, run again")
            return path
        # URLError, HTTPError, timeouts, cut connections
        except (OSError, http.client.HTTPException) as e:
            if attempt == retries:
                reason = getattr(e, "reason", None) or e
                raise UserError(
                    f"could not download {url} after {retries} tries ({reason}); without "
                    f"internet, put hellaswag_{split}.jsonl in {os.path.dirname(path)} or pass "
                    "--data FILE") from None
            print(f"download failed ({e}), retrying in {retry_wait * attempt:.0f}s",
                  file=sys.stderr)
            time.sleep(retry_wait * attempt)


def _read_hub(split):
    import datasets  # optional, and slow to import: only for --hub

    hub_split = {"val": "validation"}.get(split, split)
    try:
        data = datasets.load_dataset(HUB_DATASET, split=hub_split)
    except Exception as e:  # datasets raises many types for offline / missing
        raise UserError(f"could not load {HUB_DATASET} split '{hub_split}' through datasets "
                        f"({type(e).__name__}: {first_line(e)}); use the official files "
                        "instead") from None
    for n, obj in enumerate(data):
        yield f"{HUB_DATASET} {hub_split}, row {n}", obj


def _parse_label(label, bad):
    if label is None or label == "":  # the test split has no labels ("" in the hub copy)
        return None
    # the hub copy stores "0".."3"; isdigit alone would take "²", which int() refuses
    if isinstance(label, str) and label.strip().isascii() and label.strip().isdigit():
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label <= 3:
        raise bad("label", f"expected an integer 0-3, found {label!r}")
    return label


def _check_unicode(example, bad):
    """Every text of an example must be valid Unicode: a lone surrogate would be scored as U+FFFD
    by this project's GPT and stop a transformers tokenizer, and cannot be written to a report."""
    texts = [(field, "", value) for field, value in example.items() if isinstance(value, str)]
    texts += [("endings", f"ending {j} ", ending) for j, ending in enumerate(example["endings"])]
    for field, which, text in texts:
        problem = unicode_problem(text)
        if problem:
            raise bad(field, f"{which}holds {problem}")


def validate_record(obj, where, index):
    """One record of the official schema -> an example dict, or a UserError naming `where` and the
    field."""
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
    # the official files have both; ctx = ctx_a + " " + ctx_b
    if ctx is None and "ctx_a" in example:
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
    _check_unicode(example, bad)
    example["label"] = _parse_label(obj.get("label"), bad)
    return example


def load_examples(split="val", data_file=None, cache_dir=None, limit=None, hub=False):
    """
    Validated examples, in file order: dicts with ctx, endings (4 str), label (0-3, None when
    unlabeled), index (0-based position) and the optional fields the data has. data_file reads any
    jsonl in the official schema; hub=True reads the Hugging Face copy (Rowan/hellaswag) through
    `datasets` instead of the official files.
    """
    if data_file is not None:
        records = read_jsonl(data_file)
    elif hub:
        records = _read_hub(split)
    else:
        data_file = download_split(split, cache_dir)
        records = read_jsonl(data_file)
    examples = []
    for where, obj in records:
        if limit is not None and len(examples) >= limit:
            break
        examples.append(validate_record(obj, where, index=len(examples)))
    if not examples:
        raise UserError(f"{data_file or HUB_DATASET}: no examples")
    return examples


# --------------------------------------------------------------------------------------------------
# rendering: the exact strings and tokens that are scored


def lm_eval_preprocess(text):
    """lm-evaluation-harness's hellaswag `preprocess`, kept exactly (one pass of the double-space
    replace included), so that the two styles' predictions can match the harness's."""
    text = text.strip()
    # bracket tags are artifacts of the WikiHow part of HellaSwag
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def example_texts(example, style="completion"):
    """-> (context, 4 continuations): the strings scored, each continuation with its leading
    space."""
    if style == "completion":
        return example["ctx"], [" " + ending for ending in example["endings"]]
    if style == "lm-eval":
        # data without ctx_a/ctx_b (e.g. a preprocessed copy) uses ctx uncapitalised; without an
        # activity label there is no prefix
        ctx_a, ctx_b = example.get("ctx_a", example["ctx"]), example.get("ctx_b", "")
        query = ctx_a + " " + ctx_b.capitalize()
        if "activity_label" in example:
            query = example["activity_label"] + ": " + query
        continuations = [" " + lm_eval_preprocess(ending) for ending in example["endings"]]
        return lm_eval_preprocess(query), continuations
    raise UserError(f"unknown style '{style}'; choose one of {', '.join(STYLES)}")


def encode_example(example, encode, style="completion"):
    """
    -> (context tokens, 4 ending token lists) for this project's GPT. encode: str -> list[int].
    Completion style encodes the context and each continuation separately (build-nanogpt). lm-eval
    style encodes context + continuation whole and splits it by causal_lm's boundary rule
    (lm-evaluation-harness's split, with a token that spans the boundary counted as the ending's).
    """
    context, continuations = example_texts(example, style)
    if style == "completion":
        context_tokens, endings = encode(context), [encode(c) for c in continuations]
    else:
        pairs = [split_encode(encode, context, c) for c in continuations]
        context_tokens, endings = min((c for c, _ in pairs), key=len), []
        for pair_context, ending in pairs:  # a spanning token moves context tokens into that ending
            endings.append(pair_context[len(context_tokens):] + ending)
    if not context_tokens:  # nothing would predict the first ending token
        raise UserError(f"example {example['index']}: the context is empty once {style}-style "
                        "cleaning is done")
    if not all(endings):
        raise UserError(f"example {example['index']}: an ending encodes to no tokens after the "
                        "context")
    return context_tokens, endings


def fit_to_length(context_tokens, ending_tokens, max_len, where="an example"):
    """Drop context tokens from the left so that context + the longest ending fit in max_len
    tokens."""
    room = max_len - max(len(e) for e in ending_tokens)
    if room < 1:
        raise UserError(f"{where}: an ending of {max_len - room} tokens does not fit the model's "
                        f"{max_len}-token window")
    return context_tokens[-room:], ending_tokens


def encode_for_model(example, encode, max_len, style="completion"):
    """encode_example, cut to fit a max_len-token window: what the scorer and PPO's choice rollouts
    score."""
    return fit_to_length(*encode_example(example, encode, style), max_len,
                         where=f"example {example['index']}")


# --------------------------------------------------------------------------------------------------
# the scorer

HEAD_CHUNK = 1024  # positions per LM-head call: bounds the (positions, vocab) logits in memory
ENDING_SLACK = 1.2  # an ending chunk's longest row may be 20% (+1 token) longer than its shortest


def _as_long(values):
    return torch.tensor(values, dtype=torch.long)


def _length_chunks(items, key, slack=ENDING_SLACK):
    """Cut items sorted by key into runs whose largest key is at most slack * the smallest + 1."""
    chunks = []
    for item in items:
        if chunks and key(item) <= slack * key(chunks[-1][0]) + 1:
            chunks[-1].append(item)
        else:
            chunks.append([item])
    return chunks


def _shared_context_batch(encoded, pad_token):
    """
    Host-side tensors to score B examples with one pass over their contexts, then passes over their
    4B endings that reuse each context's KV cache. Contexts are left-padded (B, Tc), so every
    context's last token, which predicts the first token of its 4 endings, sits in the last column.
    The ending rows (r = 4b + j), minus their last token, are sorted by length and cut into chunks
    whose longest row is at most ENDING_SLACK times their shortest, each right-padded to its own
    longest: an example's 4 endings differ a lot in length, and padding them all to the batch's
    longest would waste most of the ending pass.
    """
    Tc = max(len(context) for context, _ in encoded)
    ctx_idx = _as_long([[pad_token] * (Tc - len(c)) + c for c, _ in encoded])  # (B, Tc)
    ctx_mask = _as_long([[0] * (Tc - len(c)) + [1] * len(c) for c, _ in encoded])
    first_tokens = _as_long([[ending[0] for ending in endings] for _, endings in encoded])  # (B, 4)
    endings = {4 * b + j: ending
               for b, (_, es) in enumerate(encoded) for j, ending in enumerate(es)}
    # 1 token: done
    order = sorted((r for r in endings if len(endings[r]) > 1), key=lambda r: len(endings[r]))
    chunks = []
    for chunk in _length_chunks(order, key=lambda r: len(endings[r])):
        Te = max(len(endings[r]) for r in chunk) - 1
        end_rows, end_mask, positions, rows, targets = [], [], [], [], []
        for i, r in enumerate(chunk):
            ending, n = endings[r], len(endings[r]) - 1
            end_rows.append(ending[:-1] + [pad_token] * (Te - n))
            end_mask.append([1] * n + [0] * (Te - n))
            # hidden state i * Te + t predicts token t + 1
            positions.extend(range(i * Te, i * Te + n))
            rows.extend([r] * n)
            targets.extend(ending[1:])
        chunks.append((_as_long([r // 4 for r in chunk]), _as_long(end_rows), _as_long(end_mask),
                       _as_long(positions), _as_long(rows), _as_long(targets)))
    return ctx_idx, ctx_mask, first_tokens, chunks


def _score_gpt_batch(model, encoded, pad_token, device):
    """Summed ending log-probs (B, 4) for this project's GPT: shared context pass, LM head only
    where needed."""
    ctx_idx, ctx_mask, first_tokens, chunks = _shared_context_batch(encoded, pad_token)
    ctx_idx, ctx_mask, first_tokens = (t.to(device, non_blocking=True)
                                       for t in (ctx_idx, ctx_mask, first_tokens))
    B = ctx_idx.size(0)
    hidden, kv = model.hidden_states(ctx_idx, ctx_mask, use_cache=True)  # (B, Tc, C)
    # row gathers from strided views are ~10x slower
    kv = [(k.contiguous(), v.contiguous()) for k, v in kv]
    # (B, V), once for the 4 endings
    first_logp = F.log_softmax(model.lm_head(hidden[:, -1]).float(), dim=-1)
    scores = first_logp.gather(1, first_tokens).reshape(4 * B)
    for chunk in chunks:
        example_of_row, end_idx, end_mask, positions, rows, targets = (
            t.to(device, non_blocking=True) for t in chunk)
        chunk_kv = [(k.index_select(0, example_of_row), v.index_select(0, example_of_row))
                    for k, v in kv]
        # (R, Tc + Te)
        mask = torch.cat([ctx_mask.index_select(0, example_of_row), end_mask], dim=1)
        hidden = model.hidden_states(end_idx, mask, past_kv=chunk_kv)  # (R, Te, C)
        # (M, C): the positions that predict a token
        picked = hidden.flatten(0, 1).index_select(0, positions)
        token_logp = torch.cat([
            logprobs_from_logits(model.lm_head(h), t)
            for h, t in zip(picked.split(HEAD_CHUNK), targets.split(HEAD_CHUNK))])
        scores = scores.index_add(0, rows, token_logp)
    return scores.view(B, 4)


@torch.no_grad()
def score_choices(model, encoded, batch_size=32, device="cpu", dtype="float32", pad_token=None,
                  progress=None):
    """
    The one HellaSwag scorer of this project's GPT: summed log-probs of the 4 endings of each
    encoded example (GPT.encode_choices), (N, 4) float32 on the host. Examples are scored
    batch_size at a time in order of context length (less padding); results stay on the device
    until the end, so there is no host sync per batch. The model must be in eval mode. pad_token:
    None for the model's own (model.tokens.pad_id). progress: a common.progress_bar, advanced by
    one per ending scored.
    """
    if pad_token is None:
        pad_token = model.tokens.pad_id
    order = sorted(range(len(encoded)),
                   key=lambda i: (len(encoded[i][0]), max(map(len, encoded[i][1]))))
    in_order = []
    for start in range(0, len(order), batch_size):
        with autocast(device, dtype):
            batch = [encoded[i] for i in order[start:start + batch_size]]
            in_order.append(_score_gpt_batch(model, batch, pad_token, device).float())
        if progress is not None:
            progress.update(4 * len(batch))
    scores = torch.zeros(len(encoded), 4)
    if in_order:
        scores[torch.tensor(order)] = torch.cat(in_order).cpu()
    return scores


def _unwrap(model):
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):  # DDP, torch.compile
        model = getattr(model, "module", None) or model._orig_mod
    return model


def source_name(source_id):
    """'activitynet~v_-JhWjGDPHMY' -> 'ActivityNet', 'wikihow~...' -> 'WikiHow'."""
    prefix = source_id.split("~")[0]
    return {"activitynet": "ActivityNet", "wikihow": "WikiHow"}.get(prefix.lower(), prefix)


def acc_norm_lengths(examples, style, n_tokens):
    """What acc_norm divides each ending's summed log-prob by, (N, 4) float32: its tokens
    (n_tokens, (N, 4)) in the completion style, its characters in the lm-eval style."""
    return n_tokens.float() if style == "completion" else ending_characters(examples, style)


def ending_characters(examples, style):
    """Each ending's characters as rendered in style, without the space before it (at least 1), as
    lm-evaluation-harness's acc_norm counts them: (N, 4) float32."""
    return torch.tensor([[max(1, len(c) - 1) for c in example_texts(ex, style)[1]]
                         for ex in examples], dtype=torch.float32)


def _prediction(example, pred, pred_norm, sum_logprobs, norm_scores):
    record = {"index": example["index"], "label": example["label"], "pred": int(pred),
              "pred_norm": int(pred_norm),
              "sum_logprobs": [round(x, 6) for x in sum_logprobs.tolist()],
              "norm_scores": [round(x, 6) for x in norm_scores.tolist()]}
    for field in ("ind", "split_type", "activity_label"):
        if field in example:
            record[field] = example[field]
    if "source_id" in example:
        record["source"] = source_name(example["source_id"])
    return record


def _score_with_gpt(model, examples, style, batch_size, device, dtype, progress):
    """-> summed ending log-probs and ending lengths in tokens, (N, 4) each, with the shared-context
    scorer."""
    with same_error_on_every_rank():
        encoded = model.encode_choices(examples, style)
    was_training = model.training
    model.eval()
    try:
        sum_logprobs = score_choices(model, encoded, batch_size, device, dtype, progress=progress)
    finally:
        model.train(was_training)
    n_tokens = torch.tensor([[len(e) for e in endings] for _, endings in encoded],
                            dtype=torch.float32)
    return sum_logprobs, n_tokens.view(-1, 4)


def causal_lm_rows(lm, examples, style):
    """-> 4 rows (ids, n scored tokens) per example, ending after ending: each ending a row of its
    own, with the model's own tokenizer, boundary, BOS and window rules (CausalLM.encode_pairs). A
    transformers policy's choice rows (hf_policy) are these."""
    contexts, continuations = [], []
    for ex in examples:
        context, endings = example_texts(ex, style)
        contexts += [context] * 4
        continuations += endings
    try:
        return lm.encode_pairs(contexts, continuations)
    except PairError as e:
        raise UserError(f"example {examples[e.index // 4]['index']}: {e.problem}") from None


def _score_with_causal_lm(lm, examples, style, batch_size, device, dtype, progress):
    """-> summed ending log-probs and ending lengths in tokens, (N, 4) each: each ending a row of
    its own, scored by causal_lm exactly as a teacher scores it in reward.py."""
    with same_error_on_every_rank():
        rows = causal_lm_rows(lm, examples, style)
    with autocast(device, dtype):
        sum_logprobs = sequence_logprobs(lm.model, rows, lm.pad_id, 4 * batch_size, device,
                                         progress=progress)
    n_tokens = torch.tensor([n for _, n in rows], dtype=torch.float32)
    return sum_logprobs.view(-1, 4), n_tokens.view(-1, 4)


def evaluate(model, examples, *, tokenizer=None, style="completion", batch_size=32, device=None,
             dtype="float32", return_predictions=False, progress=None):
    """
    HellaSwag accuracy of `model` on `examples` (from load_examples) -> {"n", "acc", "acc_norm",
    "seconds"} and "predictions" (one dict per example, in data order) if asked. model: this
    project's GPT (raw, DDP-wrapped or compiled), a causal_lm.CausalLM, or any transformers causal
    LM with its `tokenizer`. device defaults to the model's. Under torch.distributed each rank
    scores examples i % world_size == rank and every rank returns the same totals. progress: a
    common.progress_bar, advanced by one per ending this rank scores (the CLI's; training-time
    evaluations have none, their log line is the progress).
    """
    t0 = time.time()
    if style not in STYLES:
        raise UserError(f"unknown style '{style}'; choose one of {', '.join(STYLES)}")
    unlabeled = [ex["index"] for ex in examples if ex["label"] is None]
    if unlabeled:
        raise UserError(f"{len(unlabeled)} examples have no label (first: index {unlabeled[0]}); "
                        "the HellaSwag test split is unlabeled, evaluate on val (or train)")
    model = _unwrap(model)
    # a transformers policy (hf_policy.HFPolicy) scores as its causal LM does alone: what
    # hellaswag.py --model SOURCE says of it
    model = getattr(model, "causal_lm", model)
    if not isinstance(model, (GPT, CausalLM)):
        if tokenizer is None:
            raise ValueError("a transformers model needs its tokenizer: "
                             "evaluate(model, examples, tokenizer=...)")
        model = CausalLM(model, tokenizer)
    parameters = model.parameters() if isinstance(model, GPT) else model.model.parameters()
    device = torch.device(device) if device is not None else next(parameters).device
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world_size = ((torch.distributed.get_rank(), torch.distributed.get_world_size())
                        if distributed else (0, 1))
    mine = examples[rank::world_size]

    if isinstance(model, GPT):
        sum_logprobs, n_tokens = _score_with_gpt(model, mine, style, batch_size, device, dtype,
                                                 progress)
    else:
        sum_logprobs, n_tokens = _score_with_causal_lm(
            model, mine, style, batch_size, device, dtype, progress)
    norm_scores = sum_logprobs / acc_norm_lengths(mine, style, n_tokens)
    labels = torch.tensor([ex["label"] for ex in mine], dtype=torch.long)
    # ties go to the first ending, as np.argmax
    pred, pred_norm = sum_logprobs.argmax(1), norm_scores.argmax(1)
    counts = torch.tensor([len(mine), (pred == labels).sum(), (pred_norm == labels).sum()],
                          device=device)
    if distributed:
        torch.distributed.all_reduce(counts)
    n, correct, correct_norm = counts.tolist()
    result = {"n": n, "acc": correct / max(n, 1), "acc_norm": correct_norm / max(n, 1)}
    if return_predictions:
        predictions = [_prediction(ex, pred[i], pred_norm[i], sum_logprobs[i], norm_scores[i])
                       for i, ex in enumerate(mine)]
        if distributed:
            gathered = [None] * world_size
            torch.distributed.all_gather_object(gathered, predictions)
            predictions = sorted((p for part in gathered for p in part), key=lambda p: p["index"])
        result["predictions"] = predictions
    result["seconds"] = time.time() - t0
    return result


# --------------------------------------------------------------------------------------------------
# analysis: accuracy by group, paired comparison of two prediction files

GROUP_FIELDS = ("split_type", "source", "activity_label")


def group_accuracy(predictions, fields=GROUP_FIELDS):
    """{field: {value: {"n", "acc", "acc_norm"}}} for the group fields the predictions carry."""
    groups = {}
    for field in fields:
        by_value = {}
        for p in predictions:
            if field in p:
                by_value.setdefault(p[field], []).append(p)
        if by_value:
            groups[field] = {
                value: {"n": len(ps), "acc": sum(p["pred"] == p["label"] for p in ps) / len(ps),
                        "acc_norm": sum(p["pred_norm"] == p["label"] for p in ps) / len(ps)}
                for value, ps in sorted(by_value.items())}
    return groups


def mcnemar_exact_p(a_only, b_only):
    """Two-sided exact McNemar p-value: the discordant pairs against
    Binomial(a_only + b_only, 1/2)."""
    n, k = a_only + b_only, min(a_only, b_only)
    if n == 0:
        return 1.0
    # exact integers, one rounding
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def paired_difference(correct_a, correct_b):
    """Accuracy of B minus A on the same examples, with a 95% normal interval of the paired
    difference and McNemar's exact p-value. The two lists pair up item by item."""
    if len(correct_a) != len(correct_b) or not correct_a:
        raise ValueError(f"paired_difference needs two lists of the same examples, not "
                         f"{len(correct_a)} and {len(correct_b)} items")
    n = len(correct_a)
    diffs = [int(b) - int(a) for a, b in zip(correct_a, correct_b)]
    mean = sum(diffs) / n
    variance = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    half_width = 1.96 * math.sqrt(variance / n)
    a_only, b_only = diffs.count(-1), diffs.count(1)
    return {"n": n, "acc_a": sum(map(bool, correct_a)) / n, "acc_b": sum(map(bool, correct_b)) / n,
            "diff": mean, "ci95": [mean - half_width, mean + half_width], "a_only": a_only,
            "b_only": b_only, "p_value": mcnemar_exact_p(a_only, b_only)}


def write_predictions(path, predictions):
    """One JSON line per example (the --predictions schema), written atomically."""
    atomic_write_text(path, "".join(json.dumps(p) + "\n" for p in predictions))


def _check_prediction_texts(prediction, where):
    """The group fields are text, sorted, printed and drawn: a value of another type (a hand-edited
    3 among "indomain"s) would not sort with the others, a lone surrogate could be neither."""
    for field in GROUP_FIELDS:
        if field in prediction and not isinstance(prediction[field], str):
            raise UserError(f"{where}: '{field}' is {shorten(json.dumps(prediction[field]))}, but "
                            "a group field is text, as hellaswag.py writes it; quote it, or "
                            "remove the field")
    for key, value in prediction.items():
        invalid = unicode_problem(value) if isinstance(value, str) else None
        if invalid:
            raise UserError(f"{where}: '{key}' holds {invalid}")


def read_predictions(path, require_labels=True):
    """The lines of a --predictions file. require_labels=False also takes lines whose label is null
    (predictions of unlabelled data, which analyze.py can still describe but not score)."""
    records, line_of_index = [], {}
    for where, obj in read_jsonl(path):
        required = (("index", "label", "pred", "pred_norm") if require_labels
                    else ("index", "pred", "pred_norm"))
        missing = [k for k in required
                   if not isinstance(obj, dict) or not isinstance(obj.get(k), int)
                   or isinstance(obj[k], bool)]
        if (not require_labels and not missing
                and not isinstance(obj.get("label", None), (int, type(None)))):
            missing = ["label"]
        if missing:
            raise UserError(f"{where}: not a prediction line of hellaswag.py (missing or "
                            f"non-integer {missing})")
        # an ending number: anything else would compare as wrong
        for key in ("label", "pred", "pred_norm"):
            if obj.get(key) is not None and not 0 <= obj[key] <= 3:
                raise UserError(f"{where}: '{key}' is {obj[key]}, but an ending number is 0-3")
        _check_prediction_texts(obj, where)
        if obj["index"] in line_of_index:  # counted twice, it would inflate every paired test
            raise UserError(f"{where}: example {obj['index']} again (first at "
                            f"{line_of_index[obj['index']]}): a prediction file holds each example "
                            "once; were two files joined?")
        line_of_index[obj["index"]] = where.rsplit(", ", 1)[-1]
        obj.setdefault("label", None)  # unlabelled, as null says
        records.append(obj)
    if not records:
        raise UserError(f"{path}: no predictions")
    return records


def shared_examples(a, b, names=("A", "B")):
    """Two prediction lists of different example counts (one made with --limit, or eval_limit
    changed on a resume) are compared on the examples both cover, paired by index in a's order;
    -> (a, b, note), note None when they cover the same examples. Lists that share no example
    are not of the same data."""
    if [p["index"] for p in a] == [p["index"] for p in b]:
        return a, b, None
    b_by_index = {p["index"]: p for p in b}
    shared = [p for p in a if p["index"] in b_by_index]
    if not shared:
        raise UserError(f"{names[0]} ({len(a)} predictions) and {names[1]} ({len(b)}) share no "
                        "example index: not predictions of the same data")
    note = None
    if len(shared) < max(len(a), len(b)):
        note = (f"compared on the {len(shared)} examples both cover ({len(a)} and {len(b)} "
                "evaluated)")
    return shared, [b_by_index[p["index"]] for p in shared], note


def check_same_examples(a, b, names=("A", "B")):
    """Refuse two prediction lists that do not pair up line by line as the same examples: the
    index, the gold label and the data's ind (where recorded) must agree."""
    if len(a) != len(b):
        raise UserError(f"{names[0]} has {len(a)} predictions and {names[1]} {len(b)}: "
                        "not the same data")
    for i, (pa, pb) in enumerate(zip(a, b)):
        if (pa["index"], pa["label"], pa.get("ind")) != (pb["index"], pb["label"], pb.get("ind")):
            raise UserError(f"{names[0]} and {names[1]} differ in index/label/ind at prediction "
                            f"{i + 1} (index {pa['index']}): prediction files of different data")


def compare_predictions(a, b, names=("A", "B")):
    """Paired comparison of two prediction lists of the same data, overall (acc, acc_norm) and by
    group, on the examples both cover (shared_examples: "n", and "note" when that is not all of
    them)."""
    a, b, note = shared_examples(a, b, names)
    check_same_examples(a, b, names)
    result = {metric: paired_difference([p[key] == p["label"] for p in a],
                                        [p[key] == p["label"] for p in b])
              for metric, key in (("acc", "pred"), ("acc_norm", "pred_norm"))}
    result["groups"] = {}
    for field in GROUP_FIELDS:
        # lines i of a and b are the same example: its group from whichever file records it
        group = [pa.get(field, pb.get(field)) for pa, pb in zip(a, b)]
        result["groups"][field] = {
            value: paired_difference(*[[p["pred_norm"] == p["label"]
                                        for p, g in zip(preds, group) if g == value]
                                       for preds in (a, b)])
            for value in sorted({g for g in group if g is not None})}
    result["n"] = len(a)
    if note:
        result["note"] = note
    return result


def format_comparison(comparison, name_a, name_b, max_groups=12):
    lines = [f"A = {name_a}", f"B = {name_b}"]
    if "note" in comparison:
        lines.append(f"note: {comparison['note']}")
    lines.append(f"{'metric':<10} {'A':>7} {'B':>7} {'B-A':>8}  {'95% CI':<18} {'A only':>7} "
                 f"{'B only':>7} {'McNemar p':>10}")
    for metric in ("acc", "acc_norm"):
        c = comparison[metric]
        lines.append(f"{metric:<10} {c['acc_a']:>7.4f} {c['acc_b']:>7.4f} {c['diff']:>+8.4f}  "
                     f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] {c['a_only']:>7} "
                     f"{c['b_only']:>7} {c['p_value']:>10.3g}")
    for field, by_value in comparison["groups"].items():
        if not by_value:  # neither file records this field (a copy of the data without it)
            continue
        note = f" (the {max_groups} largest groups)" if len(by_value) > max_groups else ""
        lines.append(f"acc_norm by {field}" + note)
        largest = sorted(by_value.items(), key=lambda kv: -kv[1]["n"])[:max_groups]
        for value, c in sorted(largest):
            lines.append(f"  {str(value)[:28]:<28} n={c['n']:<5} {c['acc_a']:.4f} -> "
                         f"{c['acc_b']:.4f} ({c['diff']:+.4f}, p={c['p_value']:.3g})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# command line


def _transformers_config(source):
    """The config (a dict) of a transformers model directory or hub name, None for anything
    else."""
    config_path = os.path.join(source, "config.json")
    if os.path.isfile(config_path):
        config = read_json(config_path)
        if not isinstance(config, dict):
            raise UserError(f"{config_path}: expected a JSON object, found {type(config).__name__}")
        return config
    if os.path.exists(source) or looks_like_a_path(source):
        return None  # a checkpoint, or a path GPT.from_pretrained will explain
    try:
        return AutoConfig.from_pretrained(source).to_dict()
    except Exception:  # offline or unknown: GPT.from_pretrained gives the clear error
        return None


# the files that hold a tokenizer's vocabulary (tokenizer_config.json alone does not)
VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def _gpt2_tokenized(source):
    """Whether a transformers GPT-2 (directory or hub name) reads GPT-2's tokens: its tokenizer is
    GPT-2's, or it has none. A GPT-2 trained with another vocabulary (another language, a custom
    BPE) must be scored with its own tokenizer."""
    local = os.path.isdir(source)
    if local and not any(os.path.isfile(os.path.join(source, name))
                         for name in VOCABULARY_FILES):
        return True
    try:
        # GPT-2's own vocabulary: whether the source can be this project's GPT
        return shares_vocab(AutoTokenizer.from_pretrained(source), gpt2_tokens())
    except Exception:  # a local one: load_causal_lm says what is wrong with it
        return not local


def load_model(source):
    """-> (model, tokenizer): this project's GPT (tokenizer None) for anything GPT.from_pretrained
    takes that is GPT-2 exactly and reads GPT-2's tokens, else a transformers causal LM with its own
    tokenizer, in float32 on the CPU (--dtype sets the autocast, not the weights). A GGUF file
    is read through its cached transformers directory."""
    policy = checkpoint_policy(source)  # a transformers policy trained by this project
    if policy is not None:
        return policy, None
    if is_gguf(source):
        source = gguf_directory(source)
    config = _transformers_config(source)
    if config is None or (config.get("model_type") in (None, "gpt2")
                          and unsupported_gpt2_setting(config) is None
                          and _gpt2_tokenized(source)):
        return GPT.from_pretrained(source), None
    return load_causal_lm(source, "cpu", torch.float32)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="HellaSwag accuracy of a model, or a comparison of two runs.")
    parser.add_argument(
        "--model", help="GPT-2 hub name, transformers directory or hub name, or a .pt checkpoint")
    parser.add_argument("--split", default="val", choices=SPLITS)
    parser.add_argument(
        "--data", help="a local jsonl in the official schema (instead of the downloaded split)")
    parser.add_argument("--hub", action="store_true",
                        help=f"read the split from the {HUB_DATASET} dataset")
    parser.add_argument("--limit", type=int, help="score only the first N examples")
    parser.add_argument("--style", choices=STYLES,
                        help="default: a run's or checkpoint's own (its config's), else completion")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per forward")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="the autocast; default: the one a run's or checkpoint's evaluations "
                             "used on this device, else float32")
    parser.add_argument("--output",
                        help="write the results (accuracies, by group, speed) to this JSON file")
    parser.add_argument("--predictions", help="write one JSON line per example to this file")
    parser.add_argument("--compare", nargs=2, metavar=("A.jsonl", "B.jsonl"),
                        help="compare two --predictions files of the same data, on the "
                             "examples both cover")
    parser.add_argument("--no-progress", action="store_true", help=PROGRESS_HELP)
    args = parser.parse_args(argv)
    if args.compare is None and args.model is None:
        raise UserError("give --model SOURCE to evaluate, or --compare A.jsonl B.jsonl")
    if args.limit is not None and args.limit < 1 or args.batch_size < 1:
        raise UserError("--limit and --batch-size must be positive")
    if args.split == "test" and args.data is None:
        raise UserError("the HellaSwag test split has no labels, so it cannot be scored; "
                        "use --split val")
    return args


def check_outputs(args):
    """Refuse --output / --predictions paths that could not be written, before any data or model
    loads."""
    data = args.data or (None if args.hub else split_path(args.split))
    if (args.output and args.predictions
            and os.path.realpath(args.output) == os.path.realpath(args.predictions)):
        raise UserError(f"--output and --predictions are the same file ({args.predictions}); "
                        "give each its own path")
    if (args.output and args.predictions and os.path.realpath(args.output)
            == os.path.realpath(args.predictions + PARTIAL_SUFFIX)):
        # the results would replace the progress file, and go with it when the evaluation ends
        raise UserError(f"--output {args.output} is where --predictions {args.predictions} keeps "
                        "its progress; give --output another path")
    check_output_path(args.output, inputs=[data, args.model])
    check_output_path(args.predictions, inputs=[data, args.model, args.output])
    if args.predictions:  # where a long evaluation keeps its progress
        check_output_path(args.predictions + PARTIAL_SUFFIX, inputs=[data, args.model])


# a long --predictions evaluation keeps its progress in PREDICTIONS.partial, a chunk at a time: a
# first line {"settings": ..., "weights": ...}, then one prediction a line
PARTIAL_SUFFIX = ".partial"
PARTIAL_CHUNK = 256


def evaluation_settings(source, device):
    """The style and autocast dtype a checkpoint of this project's runs was evaluated in (its
    config's; dtype as the run resolves it on device): what --model RUN_DIR defaults to, so that it
    scores as the run's evaluations did. {} for any other source."""
    if not (source.endswith(".pt") and os.path.isfile(source)):
        return {}
    try:
        ckpt = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # load_model says what is wrong with it
        return {}
    config = ckpt.get("config") if is_checkpoint(ckpt) else None
    if not isinstance(config, dict):
        return {}
    dtype = config.get("dtype", "auto")
    if dtype == "float16" and not device.startswith("cuda"):
        dtype = "auto"
    return {"style": config.get("style", "completion"), "dtype": autocast_dtype(dtype, device)}


def run_settings(args, source, examples):
    """What a --predictions file's scores depend on, bar the weights (weights_fingerprint, known
    once they load): the model as given and the checkpoint it resolved to (checkpoint_source: a run
    directory's newest), the examples themselves (a file changed in place is other data), and how
    they are scored. An unfinished evaluation resumes only under the same."""
    def where(path):
        return os.path.abspath(path) if os.path.exists(path) else path

    data = os.path.abspath(args.data) if args.data else ("hub" if args.hub else "official")
    examples_sha256 = hashlib.sha256(json.dumps(examples).encode("utf-8")).hexdigest()
    return {"model": where(args.model), "checkpoint": where(source), "data": data,
            "examples_sha256": examples_sha256, "split": args.split, "style": args.style,
            "dtype": args.dtype, "limit": args.limit}


def _settings_difference(found, settings):
    """The first setting an unfinished evaluation was made with that differs from these, as
    "key: then -> now"."""
    found = found if isinstance(found, dict) else {}
    key = next(k for k in [*settings, *found] if found.get(k) != settings.get(k))
    # a long value is cut from the left: paths differ in their last part (ckpt_000010.pt)
    then, now = (str(v) if len(str(v)) <= 80 else "..." + str(v)[-77:]
                 for v in (found.get(key), settings.get(key)))
    return f"{key}: {then} -> {now}"


def read_partial(path, settings, examples):
    """-> (the predictions an unfinished evaluation kept in path, the fingerprint of the weights
    that made them); ([], None) when there is nothing to resume: no file, or an empty one (a kill
    before its first line was written). The file is checked against the settings and the data
    before the model loads (the weights once they have), and only a file known to be a progress
    file loses a last line torn by a kill."""
    if not os.path.exists(path):
        return [], None
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        return [], None
    complete = data[:data.rfind(b"\n") + 1]  # a last line without its newline was torn
    try:
        lines = [json.loads(line) for line in complete.decode("utf-8").splitlines()]
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not the progress file of an evaluation ({first_line(e)}); "
                        "remove it to start the evaluation over") from None
    if not (lines and isinstance(lines[0], dict) and "settings" in lines[0]):
        raise UserError(f"{path}: not the progress file of an evaluation (no settings line); "
                        "remove it to start the evaluation over")
    if lines[0]["settings"] != settings:
        raise UserError(f"{path}: an unfinished evaluation with other settings "
                        f"({_settings_difference(lines[0]['settings'], settings)}); run with "
                        "those to resume it, or remove the file to start over")
    done = lines[1:]
    for prediction, example in zip(done, examples):
        if (not isinstance(prediction, dict) or prediction.get("index") != example["index"]
                or prediction.get("label") != example["label"]):
            raise UserError(f"{path}: its predictions do not follow the data (example "
                            f"{example['index']}); remove the file to start over")
    if len(done) > len(examples):
        raise UserError(f"{path}: more predictions ({len(done)}) than examples "
                        f"({len(examples)}); remove the file to start over")
    if len(complete) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    return done, lines[0].get("weights")


def evaluate_resumably(score, examples, predictions_path, settings, weights, done):
    """score(examples) (evaluate with return_predictions) a chunk at a time, each chunk's
    predictions appended to PREDICTIONS.partial and synced, after `done` (read_partial's): a
    stopped evaluation continues where it stopped. A new progress file starts whole with its
    settings line (written atomically), so a kill never leaves one without it. -> evaluate's
    result for all examples, "seconds" those of this process."""
    partial = predictions_path + PARTIAL_SUFFIX
    resumed, seconds = len(done), 0.0
    if not done:
        atomic_write_text(partial, json.dumps({"settings": settings, "weights": weights}) + "\n")
    with write_errors_are_one_line(partial), open(partial, "a", encoding="utf-8") as f:
        for start in range(len(done), len(examples), PARTIAL_CHUNK):
            result = score(examples[start:start + PARTIAL_CHUNK])
            f.write("".join(json.dumps(p) + "\n" for p in result["predictions"]))
            f.flush()
            os.fsync(f.fileno())
            done += result["predictions"]
            seconds += result["seconds"]
    n = len(done)
    return {"n": n, "acc": sum(p["pred"] == p["label"] for p in done) / max(n, 1),
            "acc_norm": sum(p["pred_norm"] == p["label"] for p in done) / max(n, 1),
            "seconds": seconds, "n_scored": n - resumed, "predictions": done}


def main(argv=None):
    args = parse_args(argv)
    if args.compare:
        a, b = (read_predictions(path) for path in args.compare)
        print(format_comparison(compare_predictions(a, b, names=args.compare), *args.compare))
        return

    check_outputs(args)
    examples = load_examples(args.split, args.data, limit=args.limit, hub=args.hub)
    device = resolve_device(args.device)
    # a run directory as the checkpoint it holds now: the one scored, whatever the run saves next
    source = checkpoint_source(args.model)
    run = evaluation_settings(source, device)
    args.style = args.style or run.get("style", "completion")
    args.dtype = args.dtype or run.get("dtype", "float32")
    done, done_weights = [], None
    if args.predictions:  # a progress file of other settings is refused before the model loads
        partial = args.predictions + PARTIAL_SUFFIX
        settings = run_settings(args, source, examples)
        done, done_weights = read_partial(partial, settings, examples)
    model, tokenizer = load_model(source)
    check_finite_weights(model, args.model)  # NaN weights would score as chance, not fail
    weights = weights_fingerprint(model) if args.predictions else None
    if done and done_weights != weights:
        raise UserError(f"{partial}: an unfinished evaluation of other weights than {args.model} "
                        "holds now (a file replaced since it stopped); remove it to start over")
    if done:
        print(f"resuming {partial}: {len(done)} of {len(examples)} examples already scored")
    model.to(device)
    with progress_bar(total=4 * len(examples), initial=4 * len(done), desc="hellaswag",
                      unit=" ending", enabled=not args.no_progress) as bar:
        score = lambda part: evaluate(model, part, tokenizer=tokenizer, style=args.style,
                                      batch_size=args.batch_size, device=device,
                                      dtype=args.dtype, return_predictions=True, progress=bar)
        if args.predictions:
            result = evaluate_resumably(score, examples, args.predictions, settings, weights,
                                        done)
        else:
            result = score(examples)
    predictions = result.pop("predictions")
    summary = {"model": args.model, "split": args.split,
               "data": args.data or ("hub" if args.hub else "official"),
               "style": args.style, "dtype": args.dtype, "n": result["n"], "acc": result["acc"],
               "acc_norm": result["acc_norm"], "seconds": result["seconds"],
               # this process's speed (a resumed evaluation scored only the rest)
               "examples_per_s": result.get("n_scored", result["n"]) / max(result["seconds"],
                                                                            1e-9),
               "groups": group_accuracy(predictions)}

    print(f"hellaswag {args.split} | {args.style} style | {args.model} | {summary['n']} examples | "
          f"{summary['seconds']:.1f}s | {summary['examples_per_s']:.1f} examples/s")
    print(f"acc       {summary['acc']:.4f}\nacc_norm  {summary['acc_norm']:.4f}")
    for field in ("split_type", "source"):
        for value, g in summary["groups"].get(field, {}).items():
            print(f"  {field}={value:<12} n={g['n']:<6} acc {g['acc']:.4f}  "
                  f"acc_norm {g['acc_norm']:.4f}")
    if args.output:
        atomic_write_text(args.output, json.dumps(summary, indent=2) + "\n")
    if args.predictions:
        write_predictions(args.predictions, predictions)
        os.remove(partial)


if __name__ == "__main__":
    run_cli(main)
