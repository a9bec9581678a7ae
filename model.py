"""
GPT-2 as a PPO policy: the network of nanoGPT / build-nanogpt plus a scalar value head, padded
batches, KV-cache sampling and the shared-context multiple-choice forward. Reading GPT-2 weights
from every source and writing them as a transformers directory live in weights.py: from_pretrained
builds the GPT from what it reads, save_pretrained hands it the GPT's config and weights.
GPT is the reference implementation of the policy's interface (policy.Policy), its tokens GPT-2's.

    # or a transformers dir, a build-nanogpt .pt, a run's checkpoint
    model = GPT.from_pretrained("gpt2")
    logits, values = model(idx, attention_mask)     # (B, T, vocab), (B, T)
    tokens, mask, logprobs = model.generate(idx, attention_mask, max_new_tokens=32, temperature=1.0)
    # AutoModelForCausalLM / AutoTokenizer load it offline
    model.save_pretrained("out/hf")
"""

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import UserError
from tokenizer import EOT_TOKEN, gpt2_tokens
from weights import clean_state_dict, read_gpt2, write_gpt2

# cuDNN's attention kernel builds a plan for every new shape (about 3 ms of CPU each, measured on an
# H100 under bf16) and padded PPO and HellaSwag batches rarely repeat a shape, so attention uses the
# other kernels
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class GPTConfig:
    block_size: int = 1024  # max sequence length
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases in Linear and LayerNorm layers
    layer_norm_epsilon: float = 1e-5


def logprobs_from_logits(logits, tokens):
    """log p(tokens) under logits, in float32: (..., V), (...) -> (...).
    The project's one log-prob helper."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # q, k, v for all heads
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x, attn_mask=None, past_kv=None, cache=None):
        """
        past_kv (k, v), each (B, nh, T_past, hs): keys and values of earlier tokens to attend to,
        concatenated in front (differentiable: a shared context's). cache: this layer's KVCache,
        which the new keys and values are written into (generate). Returns the output and the (k, v)
        it attended over.
        """
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)  # (B, nh, T_past + T, hs)
            v = torch.cat([past_kv[1], v], dim=2)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nh, T_cached + T, hs), views into the cache
        dropout_p = self.dropout if self.training else 0.0
        if attn_mask is None:  # no padding, no cache: the fast causal kernel
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y)), (k, v)


class KVCache:
    """
    One layer's keys and values for up to max_len positions, allocated at the first write. A decode
    step writes its one new position in place, where growing the cache by torch.cat would copy all
    of it at every step.
    k, v: (B, nh, max_len, hs); positions [0, length) are filled, and attention only ever sees
    those.
    """

    def __init__(self, max_len):
        self.max_len = max_len
        self.length = 0
        self.k = self.v = None

    def append(self, k, v):
        """Write k, v (B, nh, T, hs) at positions [length, length + T) -> the filled
        (B, nh, length, hs), as views."""
        start, end = self.length, self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions cannot take {end}")
        # allocate here, where the activations' batch size, dtype and device are known
        if self.k is None:
            B, n_head, _, head_size = k.shape
            self.k = k.new_empty(B, n_head, self.max_len, head_size)
            self.v = v.new_empty(B, n_head, self.max_len, head_size)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, past_kv=None, cache=None):
        a, present_kv = self.attn(self.ln_1(x), attn_mask, past_kv, cache)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present_kv


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        # the value head starts at zero so a fresh policy's values do not disturb early PPO updates
        self.value_head = nn.Linear(config.n_embd, 1)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    # ----------------------------------------------------------------------------------------------
    # the policy interface (policy.Policy) besides forward and generate

    @property
    def tokens(self):
        """GPT-2's tokenizer (tokenizer.GPT2Tokens): this module is GPT-2."""
        return gpt2_tokens()

    @property
    def block_size(self):
        return self.config.block_size

    def checkpoint_fields(self):
        """What rebuilds it besides its weights (a checkpoint's model_config): GPTConfig's
        fields."""
        return dataclasses.asdict(self.config)

    def encode_choices(self, examples, style):
        """Each example's context and 4 endings as the HellaSwag scorer encodes them for this
        project's GPT (hellaswag.encode_for_model), cut to the window."""
        import hellaswag  # here, not at the top: hellaswag imports this module
        return [hellaswag.encode_for_model(ex, self.tokens.encode, self.block_size, style)
                for ex in examples]

    def choice_inputs(self, encoded):
        """forward's keyword arguments for the choice forward of rows of encode_choices: each
        context once, its endings packed after it (pack_choices)."""
        idx, segments = pack_choices(encoded, self.tokens.pad_id)
        return {"idx": idx, "segments": segments}

    def choice_lengths(self, encoded):
        """-> each ending's tokens (N, 4) float32 (the scorer's per-token normaliser), and the
        tokens of each example's packed row (N,) long (what its choice forward runs)."""
        endings = torch.tensor([[len(e) for e in endings] for _, endings in encoded],
                               dtype=torch.float32)
        packed = torch.tensor([len(context) + sum(map(len, endings))
                               for context, endings in encoded], dtype=torch.long)
        return endings, packed

    # ----------------------------------------------------------------------------------------------
    # forward

    def hidden_states(self, idx, attention_mask=None, past_kv=None, use_cache=False, cache=None):
        """
        Final hidden states (after ln_f) of idx (B, T) -> (B, T, C), and the keys and values (a list
        of (k, v) per layer, each (B, nh, T_past + T, hs)) if use_cache. Earlier tokens come either
        as past_kv, such a list (concatenated in front, differentiable), or as cache, one KVCache
        per layer (written in place: generate).
        attention_mask (B, T_past + T): 1 = token, 0 = padding, covering the earlier tokens too.
        Position ids come from the mask, so a left-padded row gets the same positions as the row
        alone.
        """
        B, T = idx.size()
        assert past_kv is None or cache is None, (
            "earlier tokens come as past_kv or as cache, not both")
        past_len = (past_kv[0][0].size(2) if past_kv is not None
                    else cache[0].length if cache is not None else 0)
        if attention_mask is None and past_len + T > self.config.block_size:
            raise ValueError(f"sequence of {past_len + T} tokens is longer than block_size "
                             f"{self.config.block_size}")
        if attention_mask is None and past_len == 0:
            attn_mask = None  # plain causal attention
            pos = torch.arange(T, device=idx.device).unsqueeze(0)  # (1, T)
        else:
            if attention_mask is None:
                attention_mask = torch.ones(B, past_len + T, dtype=torch.long, device=idx.device)
            assert attention_mask.shape == (B, past_len + T), (
                "attention_mask must cover past and current tokens")
            keep = attention_mask.bool()
            pos = (keep.long().cumsum(-1) - 1).clamp(min=0)[:, past_len:]  # (B, T)
            # padding takes no position, so only a padded batch longer than the window needs the
            # (syncing) check
            if past_len + T > self.config.block_size and pos.max().item() >= self.config.block_size:
                raise ValueError(f"a row of {pos.max().item() + 1} tokens is longer than "
                                 f"block_size {self.config.block_size}")
            q_pos = torch.arange(past_len, past_len + T, device=idx.device).view(T, 1)
            k_pos = torch.arange(past_len + T, device=idx.device).view(1, past_len + T)
            # (B, 1, T, T_past + T) causal and not padding
            attn_mask = (k_pos <= q_pos) & keep[:, None, None, :]
            # a padding query may have no key at all (left padding); let it see itself so softmax
            # stays finite
            attn_mask = attn_mask | (k_pos == q_pos)
        return self.transformer_pass(idx, pos, attn_mask, past_kv, use_cache, cache)

    def transformer_pass(self, idx, pos, attn_mask=None, past_kv=None, use_cache=False, cache=None):
        """hidden_states once positions pos (B or 1, T) and attn_mask (B, 1, T, T_past + T) bool are
        known (None: causal). For layouts that hidden_states does not build, such as
        choice_forward's."""
        # On a CPU the token embedding's gradient is left sparse (rows of the looked-up tokens):
        # the dense one is a fresh (vocab_size, n_embd) tensor zero-filled and added to the tied
        # lm_head's gradient every backward, ~8% of a PPO micro-batch at GPT-2 size. The lm_head's
        # dense gradient absorbs it, so the weight's .grad stays dense.
        sparse = (torch.is_grad_enabled() and idx.device.type == "cpu"
                  and not torch.compiler.is_compiling())
        tokens = F.embedding(idx, self.transformer.wte.weight, sparse=sparse)
        x = self.transformer.drop(tokens + self.transformer.wpe(pos))
        present = []
        with sdpa_kernel(ATTENTION_BACKENDS):
            for i, block in enumerate(self.transformer.h):
                x, kv = block(x, attn_mask, None if past_kv is None else past_kv[i],
                              None if cache is None else cache[i])
                if use_cache:
                    present.append(kv)
        x = self.transformer.ln_f(x)
        return (x, present) if use_cache else x

    def forward(self, idx, attention_mask=None, logits_at=None, segments=None):
        """
        -> logits (B, T, vocab_size), values (B, T) in float32.
        logits_at (B, T) bool: apply the LM head only there (it is a third of GPT-2's FLOPs); logits
        are then (K, vocab_size) for the K selected positions in row-major order.
        segments (B, T): idx holds packed multiple-choice rows (pack_choices); returns
        choice_forward(idx, segments) instead. This goes through forward because a
        DistributedDataParallel wrapper syncs the gradients only of what ran inside its forward.
        """
        if segments is not None:
            return self.choice_forward(idx, segments)
        x = self.hidden_states(idx, attention_mask)
        values = self.value_head(x).squeeze(-1).float()
        if logits_at is not None:
            x = x[logits_at]
        return self.lm_head(x), values

    def choice_forward(self, idx, segments):
        """
        Multiple choice with each context computed once. A row holds one context followed by its n
        endings, packed (pack_choices); each ending attends to the context and to its own earlier
        tokens only, and takes the positions it would have right after the context. So the numbers
        are those of n full rows context + ending (hellaswag.pad_choices), gradients reach the
        context through all n endings, and one pass runs half the token positions on HellaSwag
        (docs/results.md).
        idx (B, T): context, ending 1, ..., ending n, right-padded.
        segments (B, T): 0 context, j ending j, -1 pad.
        -> sum_logprobs (B, n): each ending's summed token log-probs given its context, float32
           values (B,): the value head at each context's last token, float32
        """
        B, T = idx.size()
        n = int(segments.max())
        col = torch.arange(T, device=idx.device)
        ctx_len = (segments == 0).sum(1, keepdim=True)  # (B, 1)
        # (B, T) first token of a segment (column 0: the context)
        starts = segments != segments.roll(1, dims=1)
        # (B, T) first column of each token's segment
        start = torch.where(starts, col, 0).cummax(dim=1).values
        # (B, T)
        pos = torch.where(segments > 0, ctx_len + col - start, col).masked_fill(segments < 0, 0)
        # (B, 1, T, 1), (B, 1, 1, T)
        seg_q, seg_k = segments[:, None, :, None], segments[:, None, None, :]
        causal = col[None, :] <= col[:, None]  # (T, T) key column <= query column
        attn_mask = causal & (seg_k >= 0) & ((seg_k == 0) | (seg_k == seg_q))  # (B, 1, T, T)
        # padding sees itself: finite
        attn_mask = attn_mask | torch.eye(T, dtype=torch.bool, device=idx.device)
        x = self.transformer_pass(idx, pos, attn_mask)  # (B, T, C)
        last_context = x[torch.arange(B, device=idx.device), ctx_len[:, 0] - 1]
        values = self.value_head(last_context).squeeze(-1).float()
        # an ending token is predicted by the state before it: its context's last token for the
        # ending's first
        predictor = torch.where(starts, ctx_len - 1, col - 1)  # (B, T)
        b, c = (segments > 0).nonzero(as_tuple=True)  # (K,), (K,) every ending token
        # LM head at K only
        token_logprobs = logprobs_from_logits(self.lm_head(x[b, predictor[b, c]]), idx[b, c])
        # put back in their (row, column) slots and summed per ending:
        # deterministic, unlike an atomic index_add on CUDA
        slots = torch.zeros(B, T, device=idx.device).index_put((b, c), token_logprobs)  # (B, T)
        # (B, n, T)
        endings = torch.arange(1, n + 1, device=idx.device)[None, :, None] == segments[:, None, :]
        return (slots[:, None, :] * endings).sum(-1), values

    # ----------------------------------------------------------------------------------------------
    # sampling

    @torch.no_grad()
    def generate(self, idx, attention_mask=None, max_new_tokens=32, temperature=1.0, top_k=None,
                 top_p=None, stop_tokens=(EOT_TOKEN,), generator=None, with_values=False):
        """
        Sample continuations of left-padded prompts idx (B, T) with a KV cache.
        Returns tokens (B, N), mask (B, N) (1 up to and including the first stop token) and the
        log-probs of the sampled tokens under the temperature-scaled distribution (before top-k /
        top-p), float32, 0 where masked; with_values, also the value head's (B, N) at each token's
        state (the position before it, as forward reads them), float32, 0 where masked.
        temperature=0 is greedy decoding (log-probs then under temperature 1). N <= max_new_tokens:
        sampling stops early once every row has stopped. Sampling draws only from generator (or
        torch's default one).
        """
        B, T = idx.size()
        if attention_mask is None:
            attention_mask = torch.ones_like(idx)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt of {T} + {max_new_tokens} new tokens exceeds block_size "
                             f"{self.config.block_size}")
        if not bool(attention_mask[:, -1].all()):  # the next token follows the last column
            raise ValueError("generate takes left-padded prompts: every row's last column must be "
                             "a token (attention_mask 1)")
        stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=idx.device)
        # the mask of the prompt and of every token to come, so each step's mask is a slice of it
        # (B, T + N)
        full_mask = torch.cat([attention_mask, attention_mask.new_ones(B, max_new_tokens)], dim=1)
        cache = [KVCache(T + max_new_tokens) for _ in self.transformer.h]
        # left padding: the last column is every row's last token
        hidden = self.hidden_states(idx, attention_mask, cache=cache)[:, -1]

        def next_step(next_token, step):
            hidden = self.hidden_states(next_token[:, None], full_mask[:, :T + step + 1],
                                        cache=cache)[:, -1]
            return self.lm_head(hidden).float(), hidden

        return sample_tokens((self.lm_head(hidden).float(), hidden), next_step, max_new_tokens,
                             temperature, top_k, top_p, stop, generator,
                             self.value_head if with_values else None)

    # ----------------------------------------------------------------------------------------------
    # optimizer

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        return policy_adamw(self, weight_decay, learning_rate, betas, device_type)

    def train_top_blocks(self, n):
        freeze_below_top_blocks((self.transformer.wte, self.transformer.wpe), self.transformer.h, n)

    # ----------------------------------------------------------------------------------------------
    # loading and export

    @classmethod
    def from_pretrained(cls, source):
        """
        source: a hub name ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", or another GPT-2 repo),
        a local transformers GPT-2 directory (ours from save_pretrained included), a build-nanogpt
        or nanoGPT checkpoint (.pt), or this project's checkpoint (.pt, or a run directory: its
        newest ckpt_<step>.pt). Read by weights.read_gpt2.
        """
        fields, sd, where = read_gpt2(source, dataclasses.asdict(GPTConfig()))
        model = cls(GPTConfig(**fields))
        model._load_state_dict(sd, where)
        return model

    def _load_state_dict(self, sd, where):
        clean = clean_state_dict(sd, where)
        expected = self.state_dict()
        for k, v in clean.items():  # load_state_dict would raise a page-long RuntimeError
            if k in expected and v.shape != expected[k].shape:
                c = self.config
                raise UserError(f"{where}: the weights and the model config disagree: {k} is "
                                f"{tuple(v.shape)}, but n_layer={c.n_layer}, n_head={c.n_head}, "
                                f"n_embd={c.n_embd}, vocab_size={c.vocab_size}, "
                                f"block_size={c.block_size} make it {tuple(expected[k].shape)}")
        missing, unexpected = self.load_state_dict(clean, strict=False)
        # a fresh value head is fine
        missing = [k for k in missing if not k.startswith("value_head.")]
        if missing or unexpected:
            raise UserError(f"{where}: weights do not fit a GPT-2 of this config "
                            f"(missing {missing[:4]}, unexpected {unexpected[:4]})")

    def save_pretrained(self, out_dir):
        """Write a transformers GPT-2 directory (config, safetensors, tokenizer) plus
        value_head.safetensors. The directory is replaced atomically: a crash leaves the old export
        or the new one, never half of one."""
        write_gpt2(out_dir, dataclasses.asdict(self.config), self.state_dict())


def filter_logits(logits, top_k=None, top_p=None):
    """Set logits outside the top-k and outside the top-p nucleus to -inf. (B, V) -> (B, V)"""
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # keep the smallest set whose mass reaches top_p: a token whose predecessors' mass is
        # already top_p is dropped
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pack_choices(encoded, pad_token=EOT_TOKEN):
    """
    N encoded examples (context tokens, n ending token lists) -> GPT.choice_forward's idx (N, T) and
    segments (N, T), long: each row is the context, then ending 1 ... ending n, right-padded to the
    longest row; segments marks the context 0, ending j j and padding -1.
    """
    rows = [context + [t for ending in endings for t in ending] for context, endings in encoded]
    T = max(len(row) for row in rows)
    idx = torch.full((len(rows), T), pad_token, dtype=torch.long)
    segments = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, (row, (context, endings)) in enumerate(zip(rows, encoded)):
        idx[i, :len(row)] = torch.tensor(row)
        row_segments = [0] * len(context) + [j + 1 for j, e in enumerate(endings) for _ in e]
        segments[i, :len(row)] = torch.tensor(row_segments)
    return idx, segments


def policy_adamw(policy, weight_decay, learning_rate, betas, device_type):
    """A policy's AdamW (policy.Policy.configure_optimizers): decay the matrices (and embeddings),
    not the biases and norm gains; the value head's in groups of their own (a learning rate of its
    own), each after its policy group: the head is the last module, so the parameters keep the
    order of a single group."""
    groups = []
    for decay in (True, False):
        for value_head in (False, True):
            params = [p for name, p in policy.named_parameters()
                      if p.requires_grad and (p.dim() >= 2) == decay
                      and name.startswith("value_head.") == value_head]
            if params:  # no group for a frozen value head
                groups.append({"params": params, "weight_decay": weight_decay if decay else 0.0,
                               "value_head": value_head})
    # one fused kernel for all parameters: on a CPU 4x faster than the per-tensor loop, at
    # GPT-2 124M about 0.3 s saved per optimizer step
    fused = device_type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)


def freeze_below_top_blocks(embeddings, blocks, n):
    """Policy.train_top_blocks: freeze the embeddings (and an LM head tied to them) and every block
    below the top n, so that no gradient flows below those n: the backward, most of an update's
    cost, then runs through n blocks and the LM head only."""
    if not 1 <= n <= len(blocks):
        raise UserError(f"train_top_blocks={n}: the policy has {len(blocks)} transformer blocks; "
                        f"give 1 to {len(blocks)}, or 0 to train them all")
    for module in (*embeddings, *blocks[:len(blocks) - n]):
        module.requires_grad_(False)


def sample_tokens(first, next_step, max_new_tokens, temperature, top_k, top_p, stop, generator,
                  value_head=None):
    """
    The sampling loop of a policy's generate with a KV cache: first, the logits (B, V) float32
    after the prompt and the last hidden state (B, C) they came from; next_step(next_token (B,),
    step) runs the tokens just drawn and gives the same pair after them. -> tokens (B, N), mask
    (B, N) (1 up to and including the first stop token: stop, a long tensor) and their log-probs
    before top-k / top-p, 0 where masked; with a value_head, also its (B, N) values at the hidden
    state each token was drawn from (float32, 0 where masked). Stops early once every row has
    stopped.
    """
    logits, hidden = first
    done = torch.zeros(logits.size(0), dtype=torch.bool, device=logits.device)
    tokens, masks, logprobs, values = [], [], [], []
    for step in range(max_new_tokens):
        next_token, logp = sample_next_token(logits, temperature, top_k, top_p, generator)
        alive = ~done
        tokens.append(next_token)
        masks.append(alive)
        logprobs.append(logp * alive)
        if value_head is not None:
            values.append(value_head(hidden).squeeze(-1).float() * alive)
        done = done | torch.isin(next_token, stop)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        logits, hidden = next_step(next_token, step)
    sampled = torch.stack(tokens, 1), torch.stack(masks, 1).long(), torch.stack(logprobs, 1)
    return (*sampled, torch.stack(values, 1)) if value_head is not None else sampled


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """
    Next tokens (B,) from logits (B, V) float32, and their log-probs (B,) under the
    temperature-scaled distribution (before top-k / top-p). temperature=0 is greedy, with log-probs
    under temperature 1.
    """
    if temperature not in (0, 1):  # x / 1 == x: the division would only cost a pass over (B, V)
        logits = logits / temperature
    # (B, 1): log-probs are logits - log_norm
    log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
    if temperature == 0:
        next_token = logits.argmax(dim=-1)
    else:
        # softmax's numerators over the kept tokens; the race needs no normalization
        # (-inf logits give 0)
        numerators = torch.exp(filter_logits(logits, top_k, top_p) - log_norm)
        next_token = sample_from_probs(numerators, generator)
    return next_token, (logits.gather(-1, next_token[:, None]) - log_norm).squeeze(-1)


def sample_from_probs(probs, generator=None):
    """
    One index per row of probs (B, V), drawn with probability p_i / sum(p) (probs need not sum to
    1): the exponential race argmax_i p_i / E_i with E_i ~ Exp(1) independent, which is Gumbel-max
    with one log per entry instead of two. On a CPU with 1 thread it took a third of
    torch.multinomial's time (docs/results.md). The draw depends only on generator's state.
    """
    race = torch.empty_like(probs).uniform_(generator=generator)  # u in [0, 1)
    # E = -log u ~ Exp(1). u = 0 (one draw in 2**24) would make E infinite and a kept token's
    # ratio 0, as low as a filtered one's: the only kept token could lose to a filtered one.
    # The smallest normal float instead is below every other draw, so nothing else changes.
    race.clamp_(min=torch.finfo(race.dtype).tiny).log_().neg_()
    return torch.div(probs, race, out=race).argmax(dim=-1)
