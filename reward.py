"""
Reward models: any transformers causal LM judges text, re-tokenized with its own tokenizer, so the judge need not
share GPT-2's vocabulary (gpt-neo does, Llama and Pythia do not).

    rm = RewardModel("EleutherAI/gpt-neo-2.7B", device="cuda")         # or a local transformers directory
    s = rm.score(contexts, continuations)                                 # dict of (N,) float32 tensors
    s = rm.score_tokens(context_ids, continuation_ids)                    # the same from GPT-2 token ids

The three reward kinds train_ppo.py can name (reward_kind = "likelihood" | "teacher" | "label"):

    LikelihoodReward(rm)(contexts, continuations)   # free text: the judge's mean log-prob, running-normalised
    TeacherReward(rm, examples)(indices, choices)   # multiple choice: the judge's probability of the chosen ending
    LabelReward(examples)(indices, choices)         # multiple choice: 1 if the choice is the gold label, else 0

CLI, to see what a judge thinks of some text:

    python reward.py --model EleutherAI/gpt-neo-2.7B --input pairs.jsonl [--output scores.jsonl]
"""

import argparse
import hashlib
import json
import math
import os
import re
import sys
import time

import torch

from common import (UserError, atomic_torch_save, atomic_write_text, check_output_path, keeps_logits, read_jsonl,
                    resolve_device, run_cli)
from model import logprobs_from_logits

DEFAULT_REWARD_MODEL = "EleutherAI/gpt-neo-2.7B"  # the seed project's judge: GPT-2's vocabulary, ~5.4 GB in bf16
REWARD_KINDS = ("likelihood", "teacher", "label")
TEACHER_CACHE_FORMAT = "reward-teacher-cache/1"


class PairError(UserError, ValueError):
    """A (context, continuation) pair that cannot be scored; .index is its position in the input."""

    def __init__(self, index, message):
        super().__init__(f"pair {index}: {message}")
        self.index, self.problem = index, message


# ----------------------------------------------------------------------------------------------------------------
# text -> tokens: the context/continuation boundary, lm-evaluation-harness style

def split_boundary_whitespace(context, continuation):
    """Trailing whitespace of the context belongs to the continuation ("A man " + "sits" -> "A man" + " sits"):
    BPE tokenizers attach a space to the word after it, so this keeps the boundary between tokens."""
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


def continuation_start(context_ids, whole_ids):
    """Where the continuation starts in whole_ids = encode(context + continuation): len(context_ids) when the whole
    encoding begins with the context's own (lm-evaluation-harness's split), else the first token that differs, so a
    token spanning the boundary ("Wait." + ".." -> "Wait" "...") counts as continuation and is never cut in two."""
    n = 0
    while n < len(context_ids) and n < len(whole_ids) and context_ids[n] == whole_ids[n]:
        n += 1
    return n


def fit_window(head, context_ids, continuation_ids, window):
    """head + context + continuation, dropping context tokens from the left so that the model input (all tokens
    but the last) fits in `window` positions. head (BOS, or a start token) is always kept. -> ids, or None if even
    the continuation alone does not fit."""
    room = window + 1 - len(head) - len(continuation_ids)  # context tokens that fit
    if room < (0 if head else 1):  # the first continuation token needs something to be predicted from
        return None
    context_ids = context_ids[max(0, len(context_ids) - room):]
    return head + context_ids + continuation_ids


SCORE_CHUNK = 1024  # scored positions per log-softmax: bounds the float32 (positions, vocab) copy in memory


@torch.no_grad()
def sequence_logprobs(model, rows, pad_id, batch_size=32, device="cpu"):
    """
    Log-probabilities of the last n tokens of each row under a transformers causal LM.
    rows: list of (ids, n) with ids a list of token ids and n >= 1 the number of tokens at its end to score.
    -> (len(rows), ) float32 sums, in input order. Rows run longest first (an out-of-memory batch fails at once),
    right-padded: padding after the real tokens never changes a causal LM's outputs at them, and positions stay
    0, 1, 2, ... without position ids, whatever padding side the tokenizer prefers.
    """
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    in_order = []
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        T = len(rows[batch[0]][0]) - 1  # the longest input in the batch: every token but the last
        input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), T), dtype=torch.long)
        for r, i in enumerate(batch):
            ids = rows[i][0]
            input_ids[r, :len(ids) - 1] = torch.tensor(ids[:-1])
            attention_mask[r, :len(ids) - 1] = 1
        # the LM head only over the span of positions that predict scored tokens (sorted rows: a short span)
        first = min(len(rows[i][0]) - 1 - rows[i][1] for i in batch)
        keep = keeps_logits(model)
        kwargs = {"logits_to_keep": torch.arange(first, T, device=device)} if keep else {}
        offset = first if keep else 0
        # which logits score which tokens, built on the host and moved once: logits at position t predict token
        # t + 1, and row r's scored tokens are its last n
        span = T - offset
        flat, targets = [], []
        for r, i in enumerate(batch):
            ids, n = rows[i]
            flat.extend(r * span + t - offset for t in range(len(ids) - 1 - n, len(ids) - 1))
            targets.extend(ids[-n:])
        flat, targets = (torch.tensor(x).to(device, non_blocking=True) for x in (flat, targets))
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False,
                       **kwargs).logits  # (B, T - first, V), or (B, T, V) for a model that cannot skip positions
        logits = logits.reshape(-1, logits.size(-1))
        # float32 log-probs of the scored tokens, a chunk of positions at a time to bound memory, put back in their
        # (row, position) slots and summed per row: deterministic, unlike an atomic index_add on CUDA
        token_logprobs = torch.cat([logprobs_from_logits(logits.index_select(0, f), t)
                                    for f, t in zip(flat.split(SCORE_CHUNK), targets.split(SCORE_CHUNK))])
        slots = torch.zeros(len(batch) * span, device=logits.device).index_put_((flat,), token_logprobs)
        in_order.append(slots.view(len(batch), span).sum(1))
    sums = torch.zeros(len(rows), dtype=torch.float32)
    if in_order:
        sums[torch.tensor(order, dtype=torch.long)] = torch.cat(in_order).cpu()
    return sums


# ----------------------------------------------------------------------------------------------------------------
# the reward model

class RewardModel:
    """
    A transformers causal LM and its tokenizer, frozen: eval mode, no gradients, bf16 on CUDA and float32
    elsewhere unless dtype says otherwise. Never wrap it in DDP; each rank loads its own copy.
    source: a hub name or a local directory holding config.json, the weights and the tokenizer files.
    max_length: the model's window in tokens (default: the model config's max_position_embeddings).
    """

    def __init__(self, source=DEFAULT_REWARD_MODEL, device="cpu", dtype=None, max_length=None):
        self.source = os.fspath(source)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model, self.tokenizer = load_causal_lm(self.source, self.device, self.dtype)
        self.max_length = max_length or model_window(self.model.config, self.tokenizer, self.source)
        self.prefix_ids = special_prefix(self.tokenizer)  # e.g. [BOS] for Llama, [] for GPT-2
        tok = self.tokenizer
        self.start_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id  # for empty contexts
        self.pad_id = next((t for t in (tok.pad_token_id, tok.eos_token_id, 0) if t is not None))
        self._shares_gpt2_vocab = None

    def __repr__(self):
        return (f"RewardModel({self.source!r}, device={self.device!r}, dtype={self.dtype}, "
                f"max_length={self.max_length})")

    @property
    def shares_gpt2_vocab(self):
        """True when the tokenizer maps every GPT-2 token to GPT-2's id (gpt2, gpt-neo; not OPT, not Pythia)."""
        if self._shares_gpt2_vocab is None:
            from tokenizer import bpe_files
            with open(bpe_files()[0], encoding="utf-8") as f:
                self._shares_gpt2_vocab = self.tokenizer.get_vocab() == json.load(f)
        return self._shares_gpt2_vocab

    def fingerprint(self):
        """What the scores depend on, for cache keys: the model (for a local directory, its files' sizes and
        modification times), the dtype and the window."""
        parts = {"source": self.source, "dtype": str(self.dtype), "max_length": self.max_length,
                 "prefix_ids": self.prefix_ids}
        if os.path.isdir(self.source):
            parts["source"] = os.path.abspath(self.source)
            files = [os.path.join(self.source, name) for name in sorted(os.listdir(self.source))]
            parts["files"] = [(os.path.basename(p), os.stat(p).st_size, os.stat(p).st_mtime_ns)
                              for p in files if os.path.isfile(p)]
        else:
            parts["revision"] = getattr(self.model.config, "_commit_hash", None)
        return parts

    def _head(self, context_ids):
        """The tokens before the context: BOS where the tokenizer adds one; a start token (BOS or EOS, as
        lm-evaluation-harness does) when the context is empty, so the first continuation token has a prediction."""
        if self.prefix_ids or context_ids:
            return list(self.prefix_ids)
        return [self.start_id] if self.start_id is not None else []

    def _row(self, index, context_ids, continuation_ids):
        if not continuation_ids:
            raise PairError(index, "the continuation is empty after tokenization; there is nothing to score")
        ids = fit_window(self._head(context_ids), context_ids, continuation_ids, self.max_length)
        if ids is None:
            raise PairError(index, f"the continuation alone ({len(continuation_ids)} tokens) does not fit the "
                                   f"model's window of {self.max_length} tokens")
        return ids, len(continuation_ids)

    def encode_pairs(self, contexts, continuations):
        """Token rows (ids, n_continuation_tokens) for text pairs, with the reward model's own tokenizer."""
        if len(contexts) != len(continuations):
            raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
        for i, continuation in enumerate(continuations):
            if not continuation:
                raise PairError(i, "the continuation is empty; there is nothing to score")
        pairs = [split_boundary_whitespace(c, k) for c, k in zip(contexts, continuations)]
        context_ids = self._encode([c for c, _ in pairs])
        whole_ids = self._encode([c + k for c, k in pairs])
        rows = []
        for i, (ctx, whole) in enumerate(zip(context_ids, whole_ids)):
            start = continuation_start(ctx, whole)
            rows.append(self._row(i, whole[:start], whole[start:]))
        return rows

    def _encode(self, texts):
        if not texts:
            return []
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def score(self, contexts, continuations, batch_size=32):
        """
        log p(continuation | context) for each text pair under the reward model. -> dict of (N,) float32 CPU
        tensors in input order: sum_logprob, n_tokens, mean_logprob (per token), n_chars (len(continuation) as
        given), per_char_logprob. An empty continuation, or one that alone does not fit the window, is a PairError.
        """
        rows = self.encode_pairs(contexts, continuations)
        return self._score_rows(rows, [len(c) for c in continuations], batch_size)

    def score_tokens(self, context_tokens, continuation_tokens, batch_size=32):
        """
        score() for pairs given as GPT-2 token ids (lists of ints), e.g. a policy's prompt and sample.
        When the reward model shares GPT-2's vocabulary the ids are scored as they are; this equals
        score(decode(context), decode(continuation)) whenever the ids are what GPT-2's tokenizer gives for that
        text (tested), and scores the policy's own tokens where a sample is not canonically tokenized. Otherwise
        the ids are decoded to text and re-tokenized by score().
        """
        from tokenizer import gpt2_encoding

        if len(context_tokens) != len(continuation_tokens):
            raise ValueError(f"{len(context_tokens)} contexts but {len(continuation_tokens)} continuations")
        enc = gpt2_encoding()
        continuations = [enc.decode(list(t), errors="replace") for t in continuation_tokens]
        if not self.shares_gpt2_vocab:
            contexts = [enc.decode(list(t), errors="replace") for t in context_tokens]
            return self.score(contexts, continuations, batch_size)
        rows = [self._row(i, list(ctx), list(cont))
                for i, (ctx, cont) in enumerate(zip(context_tokens, continuation_tokens))]
        return self._score_rows(rows, [len(c) for c in continuations], batch_size)

    def _score_rows(self, rows, n_chars, batch_size):
        sum_logprob = sequence_logprobs(self.model, rows, self.pad_id, batch_size, self.device)
        n_tokens = torch.tensor([n for _, n in rows], dtype=torch.float32)
        n_chars = torch.tensor(n_chars, dtype=torch.float32)
        return {"sum_logprob": sum_logprob, "n_tokens": n_tokens, "mean_logprob": sum_logprob / n_tokens,
                "n_chars": n_chars, "per_char_logprob": sum_logprob / n_chars}


def resolve_dtype(dtype, device):
    """None or "auto" -> bfloat16 on CUDA, float32 elsewhere; names ("bfloat16") -> torch dtypes."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"unknown dtype '{dtype}'; choose float32, bfloat16 or float16")
    return getattr(torch, dtype)


def load_causal_lm(source, device, dtype):
    """(model, tokenizer) from a hub name or a local directory, frozen, on device. Failures are UserErrors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if os.path.isfile(source):
        raise UserError(f"{source}: a file, but transformers models load from a directory or a hub name "
                        "(export a checkpoint of this project with GPT.save_pretrained(DIR) and pass DIR)")
    local = os.path.isdir(source)
    if not local and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise UserError(f"{source}: no such directory")
    if local and not os.path.isfile(os.path.join(source, "config.json")):
        raise UserError(f"{source}: no config.json here; expected a transformers model directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except Exception as e:  # transformers raises many kinds (OSError, ValueError, safetensors errors, ...)
        if not local and isinstance(e, OSError):
            raise UserError(f"could not load '{source}' from the Hugging Face hub (offline, or no such repo?); "
                            f"download it where there is internet (hf download {source} --local-dir DIR) and pass "
                            "DIR instead") from None
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{source}: not a loadable transformers causal LM with its tokenizer ({first_line})") from None
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer


def model_window(config, tokenizer, source):
    """The longest input the model takes, in tokens."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    if 0 < getattr(tokenizer, "model_max_length", 0) < 1_000_000:  # tokenizers without a limit say 1e30
        return tokenizer.model_max_length
    raise UserError(f"{source}: cannot tell the model's context window from its config; pass max_length")


def special_prefix(tokenizer):
    """The special tokens the tokenizer puts before a text (e.g. [BOS]); ones it appends (EOS) are not wanted
    after a context and are left out."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i]
    return []


# ----------------------------------------------------------------------------------------------------------------
# reward kinds

class LikelihoodReward:
    """
    For free-text samples: the reward model's mean log-prob of the continuation given the context, per token
    (per="token") or per character (per="char"; fairer across tokenizers and lengths). With normalize, rewards
    are whitened with a running mean / std over every batch seen so far, updated before each batch is
    normalised. Under DDP pass all_reduce (e.g. torch.distributed.all_reduce: sums a tensor in place across
    ranks; the tensor lives on the reward model's device) so every rank keeps the same statistics. clip bounds
    the final reward to [-clip, clip]. An empty continuation (a sample that ended at once) is an error unless
    empty_reward gives its raw reward.
    __call__ takes lists of strings, or lists of GPT-2 token ids (scored by RewardModel.score_tokens).
    -> (N,) float32 CPU tensor.
    """

    def __init__(self, reward_model, per="token", clip=None, normalize=True, batch_size=32, all_reduce=None,
                 empty_reward=None, eps=1e-8):
        if per not in ("token", "char"):
            raise UserError(f"likelihood reward: per must be 'token' or 'char', not '{per}'")
        if clip is not None and clip <= 0:
            raise UserError(f"likelihood reward: clip must be positive (or None), not {clip}")
        self.reward_model, self.per, self.clip, self.normalize = reward_model, per, clip, normalize
        self.batch_size, self.all_reduce, self.empty_reward, self.eps = batch_size, all_reduce, empty_reward, eps
        self.count, self.mean, self.m2 = 0, 0.0, 0.0  # running moments (Chan et al.'s parallel update)

    def raw(self, contexts, continuations):
        """The reward model's per-token (or per-char) mean log-prob, before normalisation and clipping."""
        tokens = len(continuations) > 0 and not isinstance(continuations[0], str)
        keep = [i for i, c in enumerate(continuations) if len(c) > 0 or self.empty_reward is None]
        score = self.reward_model.score_tokens if tokens else self.reward_model.score
        raw = torch.full((len(continuations),), float(self.empty_reward or 0.0))
        if keep:
            scores = score([contexts[i] for i in keep], [continuations[i] for i in keep], self.batch_size)
            raw[keep] = scores["mean_logprob" if self.per == "token" else "per_char_logprob"]
        return raw

    def __call__(self, contexts, continuations):
        rewards = self.raw(contexts, continuations)
        if self.normalize:
            self.update(rewards)
            rewards = (rewards - self.mean) / max(self.std, self.eps)
        if self.clip is not None:
            rewards = rewards.clamp(-self.clip, self.clip)
        return rewards.float()

    @property
    def std(self):
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 0.0

    def update(self, rewards):
        """Fold a batch (gathered across ranks by all_reduce) into the running mean / std."""
        x = rewards.double()
        stats = torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64), x.sum(), (x * x).sum()])
        if self.all_reduce is not None:
            stats = stats.to(self.reward_model.device)
            self.all_reduce(stats)
        n, total, total_sq = stats.tolist()
        if n == 0:
            return
        batch_mean = total / n
        batch_m2 = max(total_sq - n * batch_mean * batch_mean, 0.0)
        delta, count = batch_mean - self.mean, self.count + n
        self.mean += delta * n / count
        self.m2 += batch_m2 + delta * delta * self.count * n / count
        self.count = count

    def state_dict(self):
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state):
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


class TeacherReward:
    """
    For the multiple-choice rollout: the reward model, as teacher, scores the 4 endings of each example as
    hellaswag.py's acc_norm does: the ending's log-prob given hellaswag.example_texts(example, style), per token
    for style="completion" (build-nanogpt), per character of the ending for style="lm-eval" (lm-evaluation-harness).
    The reward for choosing ending c is softmax(scores / temperature)[c] (mode="prob") or 1 / 0 for agreeing with
    the teacher's pick (mode="agree"); ties go to the first ending.
    Scores depend only on the example, so they are computed once, lazily, kept in memory and in cache_dir (one
    file keyed by the model, the scored texts and the style; data_id only names the file), so a rerun on the same
    data does no forwards. Under DDP each rank scores the examples it meets and merges the file's contents into
    its own before each (atomic) save; the rare entry lost to two simultaneous saves is only scored again.
    examples: dicts as from hellaswag.load_examples; indices are positions in this list.
    """

    def __init__(self, reward_model, examples, *, style="completion", temperature=1.0, mode="prob",
                 cache_dir=None, data_id=None, batch_size=32):
        import hellaswag  # here, not at the top: hellaswag.py may itself import this module

        if mode not in ("prob", "agree"):
            raise UserError(f"teacher reward: mode must be 'prob' or 'agree', not '{mode}'")
        if not temperature > 0:
            raise UserError(f"teacher reward: temperature must be positive, not {temperature}")
        self.reward_model, self.style, self.temperature, self.mode = reward_model, style, temperature, mode
        self.batch_size = batch_size
        self.texts = [hellaswag.example_texts(ex, style) for ex in examples]
        self.labels = [ex.get("label") for ex in examples]
        # characters of each ending without the space before it: lm-evaluation-harness's acc_norm length
        self.n_chars = torch.tensor([[max(1, len(c) - 1) for c in endings] for _, endings in self.texts],
                                    dtype=torch.float32).view(-1, 4)
        self.sum_logprob = torch.full((len(examples), 4), float("nan"))
        self.n_tokens = torch.full((len(examples), 4), float("nan"))
        data_hash = hashlib.sha256(json.dumps(self.texts).encode("utf-8")).hexdigest()
        key = {"format": TEACHER_CACHE_FORMAT, "model": reward_model.fingerprint(), "style": style, "data": data_hash}
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()
        self.cache_path = None
        if cache_dir is not None:
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", data_id or "data")
            self.cache_path = os.path.join(cache_dir, f"teacher-{name}-{style}-{self.key[:16]}.pt")
            self._merge_cache()
        self.n_forward_examples = 0  # examples scored by this object (0 when everything came from the cache)

    def __len__(self):
        return len(self.texts)

    def teacher_scores(self, indices):
        """(N, 4) float32: the teacher's normalised log-prob of each ending of examples[indices]."""
        indices = self._check(indices)
        missing = sorted({i for i in indices if math.isnan(self.sum_logprob[i, 0])})
        if missing:
            self._score(missing)
        lengths = self.n_chars[indices] if self.style == "lm-eval" else self.n_tokens[indices]
        return self.sum_logprob[indices] / lengths

    def __call__(self, example_indices, choices):
        """-> (N,) float32 CPU rewards for choosing ending choices[k] (0..3) of examples[example_indices[k]]."""
        choices = torch.as_tensor(choices).long().cpu()
        if choices.shape != (len(example_indices),):
            raise ValueError(f"choices of shape {tuple(choices.shape)} for {len(example_indices)} examples")
        scores = self.teacher_scores(example_indices)
        if self.mode == "agree":
            return (scores.argmax(dim=-1) == choices).float()
        probs = torch.softmax(scores / self.temperature, dim=-1)
        return probs.gather(-1, choices[:, None]).squeeze(-1)

    def accuracy(self, indices=None):
        """How often the teacher's pick is the gold label, over the labelled examples among indices (all by
        default): a teacher worth learning from beats the policy here. None if none are labelled."""
        indices = range(len(self)) if indices is None else indices
        labelled = [i for i in indices if self.labels[i] is not None]
        if not labelled:
            return None
        picks = self.teacher_scores(labelled).argmax(dim=-1)
        return (picks == torch.tensor([self.labels[i] for i in labelled])).float().mean().item()

    def _check(self, indices):
        indices = [int(i) for i in indices]
        bad = [i for i in indices if not 0 <= i < len(self)]
        if bad:
            raise IndexError(f"teacher reward: example index {bad[0]} out of range (have {len(self)} examples)")
        return indices

    def _score(self, missing):
        contexts, continuations = [], []
        for i in missing:
            context, endings = self.texts[i]
            contexts += [context] * 4
            continuations += list(endings)
        scores = self.reward_model.score(contexts, continuations, self.batch_size)
        self.sum_logprob[missing] = scores["sum_logprob"].view(-1, 4)
        self.n_tokens[missing] = scores["n_tokens"].view(-1, 4)
        self.n_forward_examples += len(missing)
        if self.cache_path is not None:
            self._merge_cache()  # pick up what other ranks wrote meanwhile, so the file keeps everyone's work
            atomic_torch_save({"format": TEACHER_CACHE_FORMAT, "key": self.key, "sum_logprob": self.sum_logprob,
                               "n_tokens": self.n_tokens}, self.cache_path)

    def _merge_cache(self):
        """Fill unscored examples from the cache file. A cache that cannot be read is ignored (and replaced on
        the next save): it only costs time."""
        if not os.path.exists(self.cache_path):
            return
        try:
            cache = torch.load(self.cache_path, map_location="cpu", weights_only=True)
            ok = (cache.get("format") == TEACHER_CACHE_FORMAT and cache.get("key") == self.key
                  and cache["sum_logprob"].shape == self.sum_logprob.shape)
        except Exception as e:
            print(f"warning: {self.cache_path}: unreadable teacher cache, rescoring ({type(e).__name__})",
                  file=sys.stderr)
            return
        if not ok:
            print(f"warning: {self.cache_path}: teacher cache for other data or another model, ignored",
                  file=sys.stderr)
            return
        fill = torch.isnan(self.sum_logprob[:, 0]) & ~torch.isnan(cache["sum_logprob"][:, 0])
        self.sum_logprob[fill] = cache["sum_logprob"][fill]
        self.n_tokens[fill] = cache["n_tokens"][fill]


class LabelReward:
    """For the multiple-choice rollout on labelled data: 1.0 if the chosen ending is the gold label, else 0.0."""

    def __init__(self, examples):
        self.labels = [ex.get("label") for ex in examples]
        unlabelled = [i for i, label in enumerate(self.labels) if label is None]
        if unlabelled:
            raise UserError(f"label reward needs gold labels, but {len(unlabelled)} of {len(self.labels)} examples "
                            f"have none (first: example {unlabelled[0]}); the test split is unlabelled, train on "
                            "train or val, or use reward_kind='teacher'")
        self.labels = torch.tensor(self.labels, dtype=torch.long)

    def __call__(self, example_indices, choices):
        """-> (N,) float32 CPU: 1.0 where choices[k] == label of examples[example_indices[k]]."""
        choices = torch.as_tensor(choices).long().cpu()
        return (self.labels[torch.as_tensor(list(example_indices), dtype=torch.long)] == choices).float()


# ----------------------------------------------------------------------------------------------------------------
# CLI

def read_pairs(path):
    """-> contexts, continuations, and where each pair is ("PATH, line N") from a jsonl file of
    {"context": str, "continuation": str}."""
    contexts, continuations, wheres = [], [], []
    for where, obj in read_jsonl(path):
        if not isinstance(obj, dict):
            raise UserError(f'{where}: expected an object {{"context": ..., "continuation": ...}}')
        for key in ("context", "continuation"):
            if not isinstance(obj.get(key), str):
                problem = "missing" if key not in obj else f"not a string ({type(obj[key]).__name__})"
                raise UserError(f"{where}: '{key}' {problem}")
        if not obj["continuation"]:
            raise UserError(f"{where}: empty continuation; there is nothing to score")
        contexts.append(obj["context"])
        continuations.append(obj["continuation"])
        wheres.append(where)
    if not contexts:
        raise UserError(f"{path}: no pairs to score")
    return contexts, continuations, wheres


def main(argv=None):
    parser = argparse.ArgumentParser(description="Score (context, continuation) pairs with a reward model.")
    parser.add_argument("--model", default=DEFAULT_REWARD_MODEL, help="hub name or local transformers directory")
    parser.add_argument("--input", required=True, help='jsonl file of {"context": ..., "continuation": ...}')
    parser.add_argument("--output", default=None, help="jsonl file of scores (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on CUDA, float32 elsewhere")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {args.batch_size}")
    check_output_path(args.output, inputs=[args.input, args.model])  # before the model loads, not after scoring

    contexts, continuations, wheres = read_pairs(args.input)
    t0 = time.time()
    reward_model = RewardModel(args.model, device=args.device, dtype=args.dtype)
    try:
        scores = reward_model.score(contexts, continuations, batch_size=args.batch_size)
    except PairError as e:
        raise UserError(f"{wheres[e.index]}: {e.problem}") from None
    lines = []
    for i in range(len(contexts)):
        lines.append(json.dumps({"sum_logprob": scores["sum_logprob"][i].item(),
                                 "n_tokens": int(scores["n_tokens"][i]),
                                 "mean_logprob": scores["mean_logprob"][i].item(),
                                 "n_chars": int(scores["n_chars"][i]),
                                 "per_char_logprob": scores["per_char_logprob"][i].item()}))
    text = "\n".join(lines) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        atomic_write_text(args.output, text)
    print(f"scored {len(contexts)} pairs with {reward_model} in {time.time() - t0:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
