"""
A transformers causal LM as a scorer of text: loading it (one-line errors offline), its window, the
special tokens before a text, where a continuation starts, and the float32 log-probs of the scored
tokens. hellaswag.py scores the endings of other architectures through it, and reward.py's judges
and teachers are CausalLMs.

    # or a local transformers directory, or a .gguf file
    lm = CausalLM.load("EleutherAI/gpt-neo-2.7B", device="cuda")
    s = lm.score(contexts, continuations)               # dict of (N,) float32 tensors
    # the same from a policy's token ids (policy.tokens: GPT's are GPT-2's)
    s = lm.score_tokens(context_ids, continuation_ids, policy.tokens)
"""

import bisect
import codecs
import copy
import inspect
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import UserError, first_line, looks_like_a_path, resolve_device
from model import logprobs_from_logits
from weights import file_sha256, gguf_directory, is_gguf, load_transformers_checked

# scored positions per log-softmax: bounds the float32 (positions, vocab) copy in memory
SCORE_CHUNK = 1024


class PairError(UserError, ValueError):
    """A (context, continuation) pair that cannot be scored; .index is its position in the input."""

    def __init__(self, index, message):
        super().__init__(f"pair {index}: {message}")
        self.index, self.problem = index, message


# --------------------------------------------------------------------------------------------------
# text -> tokens: the one rule for the context/continuation boundary


def unicode_problem(text):
    """What makes text invalid Unicode, or None. A lone surrogate ("\\ud800", which json.loads
    accepts from a JSON escape without its pair) has no UTF-8 form, so no tokenizer can take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"a lone surrogate (U+{ord(text[e.start]):04X}) at character {e.start}, which is "
                "not valid Unicode text (a JSON escape without its pair?)")
    return None


def check_pair(index, context, continuation):
    """Refuse, before any tokenizer sees them, a pair that cannot be scored as text: an empty
    continuation, or a text that is not valid Unicode (the tokenizers library would raise a
    TypeError on it)."""
    if not continuation:
        raise PairError(index, "the continuation is empty; there is nothing to score")
    for name, text in (("context", context), ("continuation", continuation)):
        problem = unicode_problem(text)
        if problem:
            raise PairError(index, f"the {name} holds {problem}")


def split_boundary_whitespace(context, continuation):
    """Trailing whitespace of the context belongs to the continuation ("A man " + "sits" ->
    "A man" + " sits"): BPE tokenizers attach a space to the word after it, so this keeps the
    boundary between tokens."""
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


def continuation_start(context_ids, whole_ids):
    """Where the continuation starts in whole_ids = encode(context + continuation): len(context_ids)
    when the whole encoding begins with the context's own (lm-evaluation-harness's split), else the
    first token that differs, so a token spanning the boundary ("Wait." + ".." -> "Wait" "...")
    counts as continuation and is never cut in two."""
    n = 0
    while n < len(context_ids) and n < len(whole_ids) and context_ids[n] == whole_ids[n]:
        n += 1
    return n


def split_encode(encode, context, continuation):
    """-> (context ids, continuation ids) of the whole text encoded once, split by the rules above.
    encode: str -> list[int]. Joined, the two are always the encoding of context + continuation."""
    return split_encode_batch(lambda texts: [encode(t) for t in texts], [context],
                              [continuation])[0]


def split_encode_batch(encode_batch, contexts, continuations):
    """split_encode for many pairs. encode_batch: list[str] -> list[list[int]], such as a
    tokenizer's call on a list (several times faster than a call per text); a context that several
    pairs share is encoded once."""
    pairs = [split_boundary_whitespace(c, k) for c, k in zip(contexts, continuations)]
    unique = list(dict.fromkeys(context for context, _ in pairs))
    context_ids = dict(zip(unique, encode_batch(unique)))
    split = []
    for (context, _), whole in zip(pairs, encode_batch([c + k for c, k in pairs])):
        start = continuation_start(context_ids[context], whole)
        split.append((whole[:start], whole[start:]))
    return split


def fit_window(head, context_ids, continuation_ids, window):
    """head + context + continuation, dropping context tokens from the left so that the model input
    (all tokens but the last) fits in `window` positions. head (BOS, or a start token) is always
    kept. -> ids, or None if even the continuation alone does not fit."""
    room = window + 1 - len(head) - len(continuation_ids)  # context tokens that fit
    # the first continuation token needs something to be predicted from
    if room < (0 if head else 1):
        return None
    context_ids = context_ids[max(0, len(context_ids) - room):]
    return head + context_ids + continuation_ids


def char_ends(pieces):
    """Where each token's text ends, in characters of the whole text decoded from pieces (the
    tokens' bytes) with errors="replace". A character split across tokens belongs to the token that
    completes it."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    ends, n = [], 0
    for k, piece in enumerate(pieces):
        n += len(decoder.decode(piece, final=k == len(pieces) - 1))
        ends.append(n)
    return ends


def align_by_chars(judge_ends, policy_ends):
    """For each judge token, the policy token whose text holds its last character (where the judge
    token is complete). judge_ends: each judge token's end, in characters from the start of the
    policy's text (a judge token that ends before it, in the context, goes to the first policy
    token); policy_ends: as char_ends."""
    last = len(policy_ends) - 1
    return [min(bisect.bisect_right(policy_ends, end - 1), last) for end in judge_ends]


# --------------------------------------------------------------------------------------------------
# tokens -> log-probs


def keeps_logits(model):
    """Whether a transformers model's forward can apply its LM head to chosen positions only
    (logits_to_keep)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def cache_argument(model):
    """The name under which a transformers model's forward takes a KV cache to continue ("cache"
    in recent releases, "past_key_values" before), or None."""
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def can_continue(model):
    """Whether a transformers model's KV cache can be continued from given positions: its forward
    takes position ids and a cache."""
    return ("position_ids" in inspect.signature(model.forward).parameters
            and cache_argument(model) is not None
            and not getattr(model.config, "is_encoder_decoder", False))


def attention_window(model):
    """The span of a sliding-window (local) attention layer, in tokens, or None: a shared prefix
    whose continuation reaches past it is scored as a whole row, where the window is applied as
    the model always applies it."""
    config = model.config
    window = getattr(config, "sliding_window", None)
    if isinstance(window, int) and window > 0:
        return window
    if "local" in (getattr(config, "attention_layers", None) or ()):  # GPT-Neo
        return config.window_size
    return None


# models told once that their cache cannot be continued (scored as whole rows)
_WHOLE_ROWS_SAID = set()

# a scoring batch's logits and KV cache, in floats, beyond the model itself (1 GiB in float32):
# it bounds the rows a batch of shared prefixes holds, whatever the batch size asked for
SCORE_BUDGET = 1 << 28


@torch.no_grad()
def sequence_logprobs(model, rows, pad_id, batch_size=32, device="cpu", per_token=False,
                      share=True, progress=None):
    """
    Log-probabilities of the last n tokens of each row under a transformers causal LM.
    rows: list of (ids, n) with ids a list of token ids and n >= 1 the number of tokens at its end
    to score.
    -> (len(rows), ) float32 sums, in input order; per_token: also a list of each row's (n,) float32
    CPU log-probs, whose sums are the sums.
    Rows that share the tokens before their scored ones (a context and its continuations, as
    encode_pairs makes them) run those tokens once and continue their KV cache for each
    continuation (shared_prefix_logprobs); the others run whole (row_logprobs). Both give the
    same log-probs, to float rounding. share=False runs every row whole. progress: a
    common.progress_bar, advanced by one per row scored.
    """
    continuable = can_continue(model)
    if share and not continuable and type(model).__name__ not in _WHOLE_ROWS_SAID:
        _WHOLE_ROWS_SAID.add(type(model).__name__)
        print(f"note: {type(model).__name__}'s KV cache cannot be continued here, so contexts are "
              "not shared: every (context, continuation) pair runs as a whole row",
              file=sys.stderr)
    groups, alone = (shared_prefix_groups(rows, attention_window(model))
                     if share and continuable else ([], list(range(len(rows)))))
    logprobs = [None] * len(rows)  # each row's (n,) float32 log-probs, on device
    vocab_size = output_size(model)
    for batch in row_batches(rows, alone, batch_size, vocab_size, keeps_logits(model)):
        for i, lp in zip(batch, row_logprobs(model, [rows[i] for i in batch], pad_id, device)):
            logprobs[i] = lp
        if progress is not None:
            progress.update(len(batch))
    for batch in group_batches(rows, groups, batch_size, model.config, vocab_size,
                               input_limit(model), keeps_logits(model)):
        members = [i for group in batch for i in group]
        for i, lp in zip(members, shared_prefix_logprobs(model, rows, batch, pad_id, device)):
            logprobs[i] = lp
        if progress is not None:
            progress.update(len(members))
    sums = torch.stack([lp.sum() for lp in logprobs]).float().cpu() if rows else torch.zeros(0)
    return (sums, [lp.cpu() for lp in logprobs]) if per_token else sums


def output_size(model):
    """The size of the model's LM head's output (its vocabulary), or 0 where it cannot tell (a
    wrapper without one: no memory budget is applied)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        return head.weight.shape[0]
    return getattr(getattr(model, "config", None), "vocab_size", 0) or 0


def greedy_batches(items, fits):
    """items in order, cut into runs: each run takes items while fits(run) holds (at least one)."""
    batches, batch = [], []
    for item in items:
        if batch and not fits(batch + [item]):
            batches.append(batch)
            batch = []
        batch.append(item)
    return batches + ([batch] if batch else [])


def row_batches(rows, indices, batch_size, vocab_size, span_only=True):
    """The rows at indices in batches, longest first (an out-of-memory batch fails at once), so
    each batch pads little: at most batch_size rows and SCORE_BUDGET floats of logits (rows x the
    positions that predict scored tokens x vocabulary; every position without span_only)."""
    def fits(batch):
        longest = len(rows[batch[0]][0]) - 1
        span = (longest - min(len(rows[j][0]) - 1 - rows[j][1] for j in batch)
                if span_only else longest)
        return len(batch) <= batch_size and len(batch) * span * vocab_size <= SCORE_BUDGET

    return greedy_batches(sorted(indices, key=lambda i: -len(rows[i][0])), fits)


def shared_prefix_groups(rows, window=None):
    """-> (groups, alone): the rows whose tokens before the scored ones are the same, as lists of
    two or more row indices, and the other rows. A token that spans a context/continuation
    boundary belongs to the continuation (continuation_start), so a row split there has its own
    prefix and runs alone, as does a group whose longest row would reach past a sliding window."""
    by_prefix = {}
    for i, (ids, n) in enumerate(rows):
        by_prefix.setdefault(tuple(ids[:len(ids) - n]), []).append(i)
    groups, alone = [], []
    for prefix, members in by_prefix.items():
        longest = len(prefix) + max(rows[i][1] for i in members)
        if len(members) > 1 and (window is None or longest <= window):
            groups.append(members)
        else:
            alone.extend(members)
    return groups, alone


def input_limit(model):
    """The most input positions a forward of the model may hold (its window, or its sliding
    window's), or None."""
    limits = [getattr(model.config, name, None) for name in WINDOW_FIELDS]
    limits = [x for x in limits + [attention_window(model)] if isinstance(x, int) and x > 0]
    return min(limits) if limits else None


def group_batches(rows, groups, batch_size, config, vocab_size, limit=None, last_only=True):
    """Groups in batches, longest prefix first, each holding at most batch_size rows, at most
    SCORE_BUDGET floats of logits (rows x continuation x vocabulary, plus groups x prefix x
    vocabulary for a model that cannot keep only the prefix's last logits: last_only=False) and KV
    cache (rows x prefix x layers x 2 x width), and, padded, at most `limit` input positions (the
    longest prefix, then the longest continuation). A group that passes these alone (a judge
    scoring a large GRPO group) is split into pieces that fit, each running the prefix again."""
    cache_per_token = 2 * getattr(config, "num_hidden_layers", 1) * getattr(config,
                                                                            "hidden_size", 0)
    prefix_length = lambda group: len(rows[group[0]][0]) - rows[group[0]][1]

    def fits(batch):
        n_rows = sum(len(g) for g in batch)
        prefix = prefix_length(batch[0])
        longest = max(rows[i][1] for g in batch for i in g)
        prefix_logits = 0 if last_only else len(batch) * prefix * vocab_size
        cost = n_rows * (longest * vocab_size + prefix * cache_per_token) + prefix_logits
        too_long = limit is not None and prefix + longest - 1 > limit
        return n_rows <= batch_size and cost <= SCORE_BUDGET and not too_long

    pieces = []
    for group in groups:  # longest continuation first: a piece's rows pad little
        pieces.extend(greedy_batches(sorted(group, key=lambda i: -rows[i][1]),
                                     lambda piece: fits([piece])))
    return greedy_batches(sorted(pieces, key=lambda g: -prefix_length(g)), fits)


def scored_logprobs(logits, slots, targets):
    """log p(target) at each slot of logits (B, T, V) flattened, a chunk of slots at a time: a
    float32 (slots, V) copy of all of them at once could hold gigabytes."""
    logits = logits.reshape(-1, logits.size(-1))
    if not len(slots):
        return logits.new_zeros(0, dtype=torch.float32)
    return torch.cat([logprobs_from_logits(logits.index_select(0, f), t)
                      for f, t in zip(slots.split(SCORE_CHUNK), targets.split(SCORE_CHUNK))])


def padded(sequences, pad_id, left=False):
    """Token lists as one (N, longest) long tensor padded with pad_id, and its attention mask (1 at
    the real tokens); left=True puts the padding first."""
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for r, s in enumerate(sequences):
        columns = slice(T - len(s), T) if left else slice(0, len(s))
        ids[r, columns] = torch.tensor(s, dtype=torch.long)
        mask[r, columns] = 1
    return ids, mask


def row_logprobs(model, rows, pad_id, device):
    """The scored tokens' log-probs of rows run whole, right-padded: padding after the real tokens
    never changes a causal LM's outputs at them, and positions stay 0, 1, 2, ... without position
    ids, whatever padding side the tokenizer prefers. -> a list of (n,) float32 tensors."""
    input_ids, attention_mask = padded([ids[:-1] for ids, _ in rows], pad_id)  # all but the last
    T = input_ids.size(1)
    # the LM head only over the span of positions that predict scored tokens (sorted rows: a
    # short span)
    first = min(len(ids) - 1 - n for ids, n in rows)
    keep = keeps_logits(model)
    kwargs = {"logits_to_keep": torch.arange(first, T, device=device)} if keep else {}
    offset = first if keep else 0
    # which logits score which tokens, built on the host and moved once: logits at position t
    # predict token t + 1, and row r's scored tokens are its last n
    span = T - offset
    slots, targets = [], []
    for r, (ids, n) in enumerate(rows):
        slots.extend(r * span + t - offset for t in range(len(ids) - 1 - n, len(ids) - 1))
        targets.extend(ids[-n:])
    slots, targets = (torch.tensor(x).to(device, non_blocking=True) for x in (slots, targets))
    # (B, T - first, V), or (B, T, V) for a model that cannot skip positions
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                   use_cache=False, **kwargs).logits
    return list(scored_logprobs(logits, slots, targets).split([n for _, n in rows]))


def shared_prefix_logprobs(model, rows, groups, pad_id, device):
    """
    The scored tokens' log-probs of the rows of some groups (from shared_prefix_groups), in group
    order: each group's prefix runs once, left-padded so that every prefix ends in the last column
    and its continuations follow it without a gap (a sliding window then sees the distances it
    would in a whole row). The prefix's last logits score each row's first token; the rest run
    after a copy of their group's KV cache (continue_prefixes). -> a list of (n,) float32 tensors.
    """
    prefix_ids, prefix_mask = padded([rows[g[0]][0][:len(rows[g[0]][0]) - rows[g[0]][1]]
                                      for g in groups], pad_id, left=True)
    keep = {"logits_to_keep": 1} if keeps_logits(model) else {}
    out = model(input_ids=prefix_ids.to(device), attention_mask=prefix_mask.to(device),
                position_ids=(prefix_mask.cumsum(1) - 1).clamp(min=0).to(device), use_cache=True,
                **keep)
    members = [i for g in groups for i in g]
    owner = torch.tensor([g for g, group in enumerate(groups) for _ in group])
    # (G, V): each prefix's prediction of what follows it -> (R,)
    first = logprobs_from_logits(out.logits[:, -1].index_select(0, owner.to(device)),
                                 torch.tensor([rows[i][0][-rows[i][1]] for i in members],
                                              device=device))
    suffixes = [rows[i][0][len(rows[i][0]) - rows[i][1]:] for i in members]
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    rest = continue_prefixes(model, cache, prefix_mask, owner, suffixes, pad_id, device)
    return [torch.cat([f.view(1), r]) for f, r in zip(first, rest)]


def suffix_chunks(lengths, slack=0.8):
    """Row indices in chunks of similar length, longest first: a chunk takes rows down to `slack`
    of its longest, so that little of a forward is padding (the rows of a group may differ a
    lot)."""
    order = sorted(range(len(lengths)), key=lambda r: -lengths[r])
    chunks = []
    for r in order:
        if chunks and lengths[r] >= slack * lengths[chunks[-1][0]]:
            chunks[-1].append(r)
        else:
            chunks.append([r])
    return chunks


def continue_prefixes(model, cache, prefix_mask, owner, suffixes, pad_id, device):
    """The log-probs of each suffix's tokens after its first, each predicted by the token before
    it, with the suffix run after its group's cached prefix (owner: each suffix's group): in
    chunks of similar length, each with its own copy of the cache, one row per suffix,
    right-padded, positions carried on from the prefix's length. -> a list of (len - 1,) float32
    tensors, in suffix order."""
    results = [None] * len(suffixes)
    chunks = [c for c in suffix_chunks([len(s) - 1 for s in suffixes])
              if len(suffixes[c[0]]) > 1]
    for r in range(len(suffixes)):
        if len(suffixes[r]) == 1:
            results[r] = torch.zeros(0, device=device)
    for k, chunk in enumerate(chunks):
        rows_cache = cache if k == len(chunks) - 1 else copy.deepcopy(cache)  # the last: in place
        rows_cache.batch_select_indices(owner[chunk].to(device))
        suffix_ids, suffix_mask = padded([suffixes[r][:-1] for r in chunk], pad_id)
        S = suffix_ids.size(1)
        # carried on from each prefix; padding takes the first one's (any position in the model's
        # range: it is never attended to)
        positions = prefix_mask.sum(1)[owner[chunk], None] + torch.arange(S) * suffix_mask
        mask = torch.cat([prefix_mask[owner[chunk]], suffix_mask], 1)
        logits = model(input_ids=suffix_ids.to(device), attention_mask=mask.to(device),
                       position_ids=positions.to(device), use_cache=True,
                       **{cache_argument(model): rows_cache}).logits  # (rows, S, V)
        slots = torch.tensor([row * S + t for row, r in enumerate(chunk)
                              for t in range(len(suffixes[r]) - 1)])
        targets = torch.tensor([t for r in chunk for t in suffixes[r][1:]])
        logprobs = scored_logprobs(logits, slots.to(device), targets.to(device))
        for r, lp in zip(chunk, logprobs.split([len(suffixes[r]) - 1 for r in chunk])):
            results[r] = lp
    return results


# --------------------------------------------------------------------------------------------------
# loading


def resolve_dtype(dtype, device):
    """None or "auto" -> bfloat16 on CUDA, float32 elsewhere; names ("bfloat16") -> torch dtypes."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"unknown dtype '{dtype}'; choose float32, bfloat16 or float16")
    return getattr(torch, dtype)


def shares_vocab(tokenizer, tokens):
    """True when a transformers tokenizer's vocabulary is that of a policy's tokens (policy.Tokens),
    token for token and id for id (for GPT's, GPT-2's: gpt2, gpt-neo, this project's exports; not
    OPT, not Pythia)."""
    return tokenizer.get_vocab() == tokens.vocab()


def load_causal_lm(source, device, dtype):
    """(model, tokenizer) from a hub name, a local directory or a GGUF file (through its cached
    transformers directory), frozen, on device. Failures are UserErrors."""
    if is_gguf(source):
        source = gguf_directory(source)
    elif os.path.isfile(source):
        raise UserError(
            f"{source}: a file, but transformers models load from a directory, a hub name or a "
            ".gguf file (export a checkpoint of this project with GPT.save_pretrained(DIR) and "
            "pass DIR)")
    local = os.path.isdir(source)
    if not local and looks_like_a_path(source):
        raise UserError(f"{source}: no such directory")
    if local and not os.path.isfile(os.path.join(source, "config.json")):
        raise UserError(f"{source}: no config.json here; expected a transformers model directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        # without its files, transformers may build a GPT-2 tokenizer of one token
        if not tokenizer("A man sits.", add_special_tokens=False)["input_ids"]:
            raise UserError(f"{source}: its tokenizer turns text into no tokens (no tokenizer "
                            "files beside config.json?); save the model's tokenizer there "
                            "(tokenizer.save_pretrained(DIR))")
        # a tensor missing from the weights (an incomplete download) would be filled with random
        # values; tensors the model does not use are left out, as transformers does
        model = load_transformers_checked(AutoModelForCausalLM, source, allow_unexpected=True,
                                          dtype=dtype)
    except UserError:
        raise
    # transformers raises many kinds (OSError, ValueError, safetensors errors, ...)
    except Exception as e:
        if not local and isinstance(e, OSError):
            raise UserError(f"could not load '{source}' from the Hugging Face hub (offline, or no "
                            f"such repo?); download it where there is internet (hf download "
                            f"{source} --local-dir DIR) and pass DIR instead") from None
        raise UserError(f"{source}: not a loadable transformers causal LM with its tokenizer "
                        f"({first_line(e)})") from None
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer


# where a transformers config keeps the longest input its model takes
WINDOW_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")


def model_window(config, tokenizer, source):
    """The longest input the model takes, in tokens."""
    for name in WINDOW_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    # tokenizers without a limit say 1e30
    if 0 < getattr(tokenizer, "model_max_length", 0) < 1_000_000:
        return tokenizer.model_max_length
    raise UserError(f"{source}: cannot tell the model's context window from its config; "
                    "pass max_length")


def special_prefix(tokenizer):
    """The special tokens the tokenizer puts before a text (e.g. [BOS]); ones it appends (EOS) are
    not wanted after a context and are left out."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i]
    return []


# --------------------------------------------------------------------------------------------------
# the scorer


class CausalLM:
    """
    A transformers causal LM and its tokenizer as a scorer of (context, continuation) text pairs,
    re-tokenized with its own tokenizer, so it need not share the policy's vocabulary (gpt-neo does
    Llama and Pythia do not). Frozen: eval mode, no gradients. Never wrap it in DDP; each rank loads
    its own copy.
    max_length: the model's window in tokens (default: from the model's config).
    """

    def __init__(self, model, tokenizer, source="", max_length=None):
        self.model, self.tokenizer, self.source = model, tokenizer, os.fspath(source)
        self.device = str(next(model.parameters()).device)
        self.dtype = next(model.parameters()).dtype
        self.max_length = max_length or model_window(model.config, tokenizer, self.source)
        self.prefix_ids = special_prefix(tokenizer)  # e.g. [BOS] for Llama, [] for GPT-2
        self.start_id = (tokenizer.bos_token_id if tokenizer.bos_token_id is not None
                         else tokenizer.eos_token_id)
        pad_candidates = (tokenizer.pad_token_id, tokenizer.eos_token_id, 0)
        self.pad_id = next((t for t in pad_candidates if t is not None))
        self._shares_vocab = {}  # per policy tokens object

    @classmethod
    def load(cls, source, device="cpu", dtype=None, max_length=None):
        """From a hub name, a local directory holding config.json, the weights and the tokenizer
        files, or a GGUF file (weights and tokenizer from the file); dtype None: bfloat16 on CUDA,
        float32 elsewhere."""
        device = resolve_device(device)
        model, tokenizer = load_causal_lm(os.fspath(source), device, resolve_dtype(dtype, device))
        return cls(model, tokenizer, source, max_length)

    def __repr__(self):
        return (f"CausalLM({self.source!r}, device={self.device!r}, dtype={self.dtype}, "
                f"max_length={self.max_length})")

    def shares_vocab(self, tokens):
        """True when the tokenizer maps every token of a policy's tokens (policy.Tokens) to the same
        id (GPT's, GPT-2's: gpt2, gpt-neo; not OPT, not Pythia)."""
        if tokens not in self._shares_vocab:
            self._shares_vocab[tokens] = shares_vocab(self.tokenizer, tokens)
        return self._shares_vocab[tokens]

    def fingerprint(self):
        """What the scores depend on, for cache keys: the model (for a local directory, its files'
        sizes and modification times), the dtype and the window."""
        parts = {"source": self.source, "dtype": str(self.dtype), "max_length": self.max_length,
                 "prefix_ids": self.prefix_ids}
        if is_gguf(self.source):
            parts["source"] = os.path.abspath(self.source)
            parts["sha256"] = file_sha256(self.source)
        elif os.path.isdir(self.source):
            parts["source"] = os.path.abspath(self.source)
            files = [os.path.join(self.source, name) for name in sorted(os.listdir(self.source))]
            parts["files"] = [(os.path.basename(p), os.stat(p).st_size, os.stat(p).st_mtime_ns)
                              for p in files if os.path.isfile(p)]
        else:
            parts["revision"] = getattr(self.model.config, "_commit_hash", None)
        return parts

    def encode(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_batch(self, texts, chunk=1024):
        """encode() of each text, by the tokenizer's list call, chunk texts at a time: a call's
        intermediate encodings of 160,000 texts would hold gigabytes."""
        texts = list(texts)
        return [ids for start in range(0, len(texts), chunk)
                for ids in self.tokenizer(texts[start:start + chunk],
                                          add_special_tokens=False)["input_ids"]]

    def _head(self, context_ids):
        """The tokens before the context: BOS where the tokenizer adds one; a start token (BOS or
        EOS, as lm-evaluation-harness does) when the context is empty, so the first continuation
        token has a prediction."""
        if self.prefix_ids or context_ids:
            return list(self.prefix_ids)
        return [self.start_id] if self.start_id is not None else []

    def row(self, index, context_ids, continuation_ids):
        """(ids, n_continuation_tokens) for the model: head + context + continuation, fit to the
        window."""
        if not continuation_ids:
            raise PairError(index, "the continuation is empty after tokenization; "
                                   "there is nothing to score")
        head = self._head(context_ids)
        if not head and not context_ids:
            raise PairError(index, "nothing comes before the continuation (an empty context, and "
                                   "the tokenizer has no BOS or EOS token to start from), so its "
                                   "first token cannot be scored; give a context")
        ids = fit_window(head, context_ids, continuation_ids, self.max_length)
        if ids is None:
            raise PairError(index, f"the continuation alone ({len(continuation_ids)} tokens) "
                                   f"does not fit the model's window of {self.max_length} tokens")
        return ids, len(continuation_ids)

    def encode_pairs(self, contexts, continuations):
        """Token rows (ids, n_continuation_tokens) for text pairs, with the model's own
        tokenizer."""
        if len(contexts) != len(continuations):
            raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
        for i, pair in enumerate(zip(contexts, continuations)):
            check_pair(i, *pair)
        split = split_encode_batch(self.encode_batch, contexts, continuations)
        return [self.row(i, context_ids, continuation_ids)
                for i, (context_ids, continuation_ids) in enumerate(split)]

    def score(self, contexts, continuations, batch_size=32, progress=None):
        """
        log p(continuation | context) for each text pair. -> dict of (N,) float32 CPU tensors in
        input order: sum_logprob, n_tokens, mean_logprob (per token), n_chars (len(continuation) as
        given), per_char_logprob.
        An empty continuation, or one that alone does not fit the window, is a PairError.
        progress: a common.progress_bar, advanced by one per pair scored.
        """
        rows = self.encode_pairs(contexts, continuations)
        return self.score_rows(rows, [len(c) for c in continuations], batch_size,
                               progress=progress)

    def score_tokens(self, context_tokens, continuation_tokens, tokens, batch_size=32,
                     per_token=False):
        """
        score() for pairs given as a policy's token ids (lists of ints), e.g. its prompt and sample;
        tokens: the policy's tokens (policy.Tokens), which wrote them. When the model shares that
        vocabulary (shares_vocab) the ids are scored as they are: this equals
        score(decode(context), decode(continuation)) whenever the ids are what the policy's
        tokenizer gives for that text, and scores the policy's own tokens where a sample is not
        canonically tokenized. Otherwise the ids are decoded to text and re-tokenized by score().
        per_token: the dict also holds "token_logprobs", one (len(continuation),) float32 tensor per
        pair: the log-prob of each given token, or, for another vocabulary, the sum of the log-probs
        of the model's tokens that end inside its text (align_by_chars). Each sums to the pair's
        sum_logprob.
        """
        if len(context_tokens) != len(continuation_tokens):
            raise ValueError(f"{len(context_tokens)} contexts but "
                             f"{len(continuation_tokens)} continuations")
        continuations = [tokens.decode(list(t)) for t in continuation_tokens]
        n_chars = [len(c) for c in continuations]
        if self.shares_vocab(tokens):
            rows = [self.row(i, list(ctx), list(cont))
                    for i, (ctx, cont) in enumerate(zip(context_tokens, continuation_tokens))]
            return self.score_rows(rows, n_chars, batch_size, per_token)
        contexts = [tokens.decode(list(t)) for t in context_tokens]
        if not per_token:
            return self.score(contexts, continuations, batch_size)
        rows, owners = [], []
        for i, (context, sample) in enumerate(zip(contexts, continuation_tokens)):
            row, judge_ends = self.row_with_char_ends(i, context, continuations[i])
            rows.append(row)
            policy_ends = char_ends([tokens.token_bytes(t) for t in sample])
            owners.append(align_by_chars([e - len(context) for e in judge_ends], policy_ends))
        scores = self.score_rows(rows, n_chars, batch_size, per_token)
        per_pair = zip(continuation_tokens, owners, scores["token_logprobs"])
        scores["token_logprobs"] = [
            torch.zeros(len(sample)).index_add_(0, torch.tensor(owner), logprobs)
            for sample, owner, logprobs in per_pair]
        return scores

    def row_with_char_ends(self, index, context, continuation):
        """row() for a text pair, split as encode_pairs splits it, and where each scored token ends
        in context + continuation, in characters (from the fast tokenizer's offsets)."""
        check_pair(index, context, continuation)
        if not self.tokenizer.is_fast:
            raise UserError(f"{self.source}: per-token scores of another vocabulary need a fast "
                            "tokenizer (its character offsets); this model has a slow one")
        context, continuation = split_boundary_whitespace(context, continuation)
        encoded = self.tokenizer(context + continuation, add_special_tokens=False,
                                 return_offsets_mapping=True)
        whole, offsets = encoded["input_ids"], encoded["offset_mapping"]
        start = continuation_start(self.encode(context), whole)
        return self.row(index, whole[:start], whole[start:]), [end for _, end in offsets[start:]]

    def score_rows(self, rows, n_chars, batch_size=32, per_token=False, progress=None):
        sum_logprob = sequence_logprobs(self.model, rows, self.pad_id, batch_size, self.device,
                                        per_token, progress=progress)
        if per_token:
            sum_logprob, token_logprobs = sum_logprob
        n_tokens = torch.tensor([n for _, n in rows], dtype=torch.float32)
        n_chars = torch.tensor(n_chars, dtype=torch.float32)
        scores = {"sum_logprob": sum_logprob, "n_tokens": n_tokens,
                  "mean_logprob": sum_logprob / n_tokens, "n_chars": n_chars,
                  "per_char_logprob": sum_logprob / n_chars}
        if per_token:
            scores["token_logprobs"] = token_logprobs
        return scores
