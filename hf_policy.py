"""
Any transformers causal LM as a PPO policy (policy.Policy), beside model.py's hand-written GPT-2:
the model, a value head on its last hidden state, and its own tokenizer as the policy's tokens.

    policy = HFPolicy.load("HuggingFaceTB/SmolLM2-135M")   # or a directory, or a .gguf file
    rows = policy.encode_choices(examples, "completion")  # as hellaswag.py --model SOURCE scores

What it scores, it scores as the evaluator scores that model (hellaswag.causal_lm_rows: each
ending a row of its own, with the model's BOS, boundary and window rules), through the model's own
forward (so Gemma's logit soft-capping is what the evaluator and the judges compute), with the LM
head only where a log-prob is needed (logits_to_keep: Gemma 3's vocabulary is 262k).
"""

import functools
import json
import os
import re

import torch
import torch.nn as nn
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from causal_lm import (CausalLM, cache_argument, keeps_logits, load_causal_lm, padded,
                       special_prefix)
from common import UserError, atomic_directory, first_line
from model import freeze_below_top_blocks, logprobs_from_logits, policy_adamw, sample_tokens
from tokenizer import SENTENCE_ENDS, bytes_to_unicode
from weights import (clean_state_dict, gguf_directory, is_checkpoint, is_gguf,
                     transformers_quietly, write_value_head)

BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's token for a raw byte


class HFTokens:
    """
    A transformers tokenizer as a policy's tokens (policy.Tokens): ordinary encoding (no special
    tokens added), decoding with bad bytes replaced, the tokenizer's EOS, its padding (EOS where it
    has none), and the BOS it puts before a text.
    """

    def __init__(self, tokenizer, source=""):
        if tokenizer.eos_token_id is None:
            raise UserError(f"{source}: its tokenizer has no EOS token, so a sample could not "
                            "end; set eos_token in its tokenizer_config.json")
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                       else tokenizer.eos_token_id)
        prefix = special_prefix(tokenizer)
        self.bos_id = prefix[0] if prefix else None

    def encode(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)

    def token_bytes(self, token):
        return self._bytes()[token] if token < len(self._bytes()) else b""

    @functools.cache
    def _bytes(self):
        """Each id's bytes: byte-level BPE (GPT-2's table of printable stand-ins), SentencePiece
        (its "▁" for a space, <0xNN> for a raw byte), or the token's text; special tokens none."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)  # a fast tokenizer's
        byte_level = backend is not None and "ByteLevel" in repr(backend.decoder)
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        special = set(self.tokenizer.all_special_ids)
        table = []
        for i, piece in enumerate(self.tokenizer.convert_ids_to_tokens(range(len(self.tokenizer)))):
            fallback = BYTE_FALLBACK.fullmatch(piece or "")
            if i in special or piece is None:
                table.append(b"")
            elif fallback:
                table.append(bytes([int(fallback.group(1), 16)]))
            elif byte_level and all(c in byte_of for c in piece):
                table.append(bytes(byte_of[c] for c in piece))
            else:
                table.append(piece.replace("\u2581", " ").encode("utf-8"))
        return table

    @functools.cache
    def _sentence_ends(self):
        ends = {text.encode("utf-8") for text in SENTENCE_ENDS}
        return [i for i, b in enumerate(self._bytes()) if b in ends]

    def stop_tokens(self, sentence_end):
        """eos_id, and with sentence_end every single token whose bytes end a sentence
        (tokenizer.SENTENCE_ENDS): read from the vocabulary, since a SentencePiece tokenizer
        encodes "." alone as "▁."."""
        return sorted({self.eos_id, *(self._sentence_ends() if sentence_end else ())})

    def vocab(self):
        return self.tokenizer.get_vocab()


class HFPolicy(nn.Module):
    """A transformers causal LM and a zero-initialised value head on its last hidden state, one
    module (one DDP wrapper covers both), meeting policy.Policy."""

    def __init__(self, model, tokenizer, source=""):
        super().__init__()
        self.model = model
        # the value head starts at zero so a fresh policy's values do not disturb early PPO updates
        self.value_head = nn.Linear(model.config.get_text_config().hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.source = str(source)
        self.tokens = HFTokens(tokenizer, self.source)
        # the evaluator's scorer of this very model (hellaswag.evaluate scores through it)
        self.causal_lm = CausalLM(model, tokenizer, self.source)

    @classmethod
    def load(cls, source):
        """From anything a judge loads from (a hub name, a transformers directory, a .gguf file),
        in float32 on the CPU."""
        return cls.wrap(*load_causal_lm(str(source), "cpu", torch.float32), source=source)

    @classmethod
    def wrap(cls, model, tokenizer, source):
        """The policy of a loaded model, with the value head that this project's export keeps
        beside it (value_head.safetensors in the source directory) if there is one."""
        policy = cls(model, tokenizer, source)
        value_head = os.path.join(str(source), "value_head.safetensors")
        if os.path.isfile(value_head):
            policy.value_head.load_state_dict(load_file(value_head))
        return policy

    @property
    def block_size(self):
        return self.causal_lm.max_length

    # ----------------------------------------------------------------------------------------------
    # checkpoints: what rebuilds it (its source, for the tokenizer, and its transformers config)
    # beside its weights

    def checkpoint_fields(self):
        return {"source": self.source, "transformers_config": self.model.config.to_json_string()}

    @staticmethod
    def records(fields):
        """Whether a checkpoint's model_config is an HFPolicy's (checkpoint_fields)."""
        return isinstance(fields, dict) and "transformers_config" in fields

    @classmethod
    def from_checkpoint(cls, fields, state_dict, where):
        """The policy a checkpoint holds: its transformers config, its weights, and the tokenizer
        of the source it came from (which must still load)."""
        source = fields["source"]
        try:
            config = json.loads(fields["transformers_config"])
            config = AutoConfig.for_model(config.pop("model_type"), **config)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        except Exception as e:  # transformers raises many kinds for a config it cannot build
            raise UserError(f"{where}: its policy's architecture cannot be rebuilt by this "
                            f"transformers ({first_line(e)}); install the version it was "
                            "trained with") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_directory(source) if is_gguf(source)
                                                      else source)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{where}: the tokenizer of {source}, where its policy came from, "
                            f"does not load ({first_line(e)}); put that model back there") from None
        policy = cls(model.eval(), tokenizer, source)
        missing, unexpected = policy.load_state_dict(clean_state_dict(state_dict, where),
                                                     strict=False)
        # a tied LM head is saved once
        missing = [k for k in missing if k not in tied_names(model)]
        if missing or unexpected:
            raise UserError(f"{where}: its weights do not fit its policy's architecture (missing "
                            f"{missing[:4]}, unexpected {unexpected[:4]})")
        return policy

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    # ----------------------------------------------------------------------------------------------
    # the choice rows: 4 whole rows per example, the evaluator's

    def encode_choices(self, examples, style):
        """Each example's 4 rows [ids, n scored tokens] as hellaswag.py --model SOURCE scores them
        (an ending may take context tokens of its own: a token spanning the boundary)."""
        import hellaswag  # here, not at the top: hellaswag imports this module
        rows = hellaswag.causal_lm_rows(self.causal_lm, examples, style)
        return [[list(row) for row in rows[i:i + 4]] for i in range(0, len(rows), 4)]

    def choice_inputs(self, encoded):
        """idx: every row but its last token, right-padded (R = 4N rows); segments (R, T): the
        token each position predicts where it is scored, -1 elsewhere."""
        rows = [row for entry in encoded for row in entry]
        idx, mask = padded([ids[:-1] for ids, _ in rows], self.tokens.pad_id)
        segments = torch.full(idx.shape, -1, dtype=torch.long)
        for r, (ids, n) in enumerate(rows):
            segments[r, len(ids) - 1 - n:len(ids) - 1] = torch.tensor(ids[-n:])
        return {"idx": idx, "attention_mask": mask, "segments": segments}

    def choice_lengths(self, encoded):
        scored = torch.tensor([[n for _, n in entry] for entry in encoded], dtype=torch.float32)
        run = torch.tensor([sum(len(ids) - 1 for ids, _ in entry) for entry in encoded],
                           dtype=torch.long)
        return scored, run

    # ----------------------------------------------------------------------------------------------
    # forward

    def run(self, idx, attention_mask, at=None):
        """The model's own forward -> logits (K, V) at the K positions that at (B, T) bool marks, in
        row-major order (every position's (B, T, V) without at), and the last hidden states
        (B, T, C). Position ids come from the mask, so a left-padded row has the positions it has
        alone. The LM head runs at the marked positions only: the model's body hands its head
        their hidden states as one row (a hook on the body's output), so what the head does
        (Gemma's logit soft-capping) is the model's own; a model whose forward cannot keep fewer
        logits computes them all, and the marked ones are picked."""
        positions = None
        if attention_mask is not None:
            positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        inputs = {"input_ids": idx, "attention_mask": attention_mask, "position_ids": positions,
                  "use_cache": False}
        if at is None or not keeps_logits(self.model):
            out = self.model(**inputs, output_hidden_states=True)
            return (out.logits if at is None else out.logits[at]), out.hidden_states[-1]
        body = {}

        def marked_only(module, args, kwargs, output):
            body["hidden"] = output.last_hidden_state
            output.last_hidden_state = output.last_hidden_state[at][None]
            return output

        hook = self.model.base_model.register_forward_hook(marked_only, with_kwargs=True)
        try:
            out = self.model(**inputs, logits_to_keep=0)  # 0: every position the head is given
        finally:
            hook.remove()
        # a model whose head did not read its body's output gave every position's logits
        K = int(at.sum())
        return (out.logits[0] if out.logits.shape[:2] == (1, K) else out.logits[at]), body["hidden"]

    def forward(self, idx, attention_mask=None, logits_at=None, segments=None):
        """As policy.Policy.forward: the choice forward with segments (choice_inputs), else
        logits (at logits_at only) and values (B, T), float32."""
        if segments is not None:
            return self.choice_forward(idx, attention_mask, segments)
        logits, hidden = self.run(idx, attention_mask, logits_at)
        return logits, self.value_head(hidden).squeeze(-1).float()

    def choice_forward(self, idx, attention_mask, segments):
        """-> (N, 4) summed log-probs of the scored tokens of each example's 4 rows, (N,) values
        at the last context token of its first row, float32."""
        scored = segments >= 0  # (R, T)
        starts = scored.float().argmax(1)  # (R,) each row's first scored column
        # the LM head where a token is predicted only
        logits, hidden = self.run(idx, attention_mask, scored)
        r, c = scored.nonzero(as_tuple=True)
        token_logprobs = logprobs_from_logits(logits, segments[r, c])
        # put back in their (row, column) slots and summed per row: deterministic, unlike an
        # atomic index_add on CUDA
        slots = torch.zeros(scored.shape, device=idx.device).index_put((r, c), token_logprobs)
        firsts = torch.arange(0, idx.size(0), 4, device=idx.device)
        values = self.value_head(hidden[firsts, starts[firsts]]).squeeze(-1).float()
        return slots.sum(1).view(-1, 4), values

    # ----------------------------------------------------------------------------------------------
    # sampling

    @torch.no_grad()
    def generate(self, idx, attention_mask=None, max_new_tokens=32, temperature=1.0, top_k=None,
                 top_p=None, stop_tokens=(), generator=None, with_values=False):
        """As GPT.generate: left-padded prompts, the project's sampling loop (model.sample_tokens)
        over the model's KV cache, drawing only from generator; with_values, the value head's too
        (the hidden states are read only then)."""
        B, T = idx.size()
        if attention_mask is None:
            attention_mask = torch.ones_like(idx)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        if T + max_new_tokens > self.block_size:
            raise ValueError(f"prompt of {T} + {max_new_tokens} new tokens exceeds block_size "
                             f"{self.block_size}")
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("generate takes left-padded prompts: every row's last column must be "
                             "a token (attention_mask 1)")
        stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=idx.device)
        full_mask = torch.cat([attention_mask, attention_mask.new_ones(B, max_new_tokens)], dim=1)
        positions = (full_mask.cumsum(1) - 1).clamp(min=0)
        keep = {"logits_to_keep": 1} if keeps_logits(self.model) else {}

        def last(out):
            """-> the logits after the last column and its last hidden state (None unless
            with_values)."""
            return (out.logits[:, -1].float(),
                    out.hidden_states[-1][:, -1] if with_values else None)

        out = self.model(input_ids=idx, attention_mask=attention_mask,
                         position_ids=positions[:, :T], use_cache=True,
                         output_hidden_states=with_values, **keep)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values

        def next_step(next_token, step):
            now = T + step  # the column of the token just drawn
            return last(self.model(input_ids=next_token[:, None],
                                   attention_mask=full_mask[:, :now + 1],
                                   position_ids=positions[:, now:now + 1], use_cache=True,
                                   output_hidden_states=with_values,
                                   **{cache_argument(self.model): cache}, **keep))

        return sample_tokens(last(out), next_step, max_new_tokens, temperature, top_k, top_p, stop,
                             generator, self.value_head if with_values else None)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        return policy_adamw(self, weight_decay, learning_rate, betas, device_type)

    def train_top_blocks(self, n):
        freeze_below_top_blocks([self.model.get_input_embeddings()], decoder_blocks(self.model), n)

    def save_pretrained(self, out_dir):
        """A transformers directory (the model and its tokenizer: AutoModelForCausalLM and
        lm-evaluation-harness load it) plus value_head.safetensors, replaced atomically: a crash
        leaves the old export or the new one, never half of one."""
        with atomic_directory(out_dir) as tmp, transformers_quietly():
            self.model.save_pretrained(tmp)
            self.tokens.tokenizer.save_pretrained(tmp)
            write_value_head(tmp, self.state_dict())


def tied_names(model):
    """The names of the model's parameters that another parameter's tensor stands for (a tied LM
    head), as HFPolicy names them."""
    seen, tied = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add("model." + name)
        seen.add(id(p))
    return tied


def decoder_blocks(model):
    """A transformers causal LM's transformer blocks: the nn.ModuleList of as many modules as its
    config has hidden layers (Llama's and Gemma's model.layers, GPT-2's transformer.h)."""
    n = model.config.get_text_config().num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise UserError(f"{type(model).__name__}: no list of its {n} transformer blocks found, so "
                    "train_top_blocks cannot pick the top ones; use train_top_blocks=0")


def checkpoint_policy(path):
    """A checkpoint file of this project that holds an HFPolicy -> that policy; None for
    any other source (GPT.from_pretrained and load_causal_lm read those)."""
    if not (isinstance(path, str) and path.endswith(".pt") and os.path.isfile(path)):
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # GPT.from_pretrained says what is wrong with it
        return None
    if not is_checkpoint(ckpt) or not HFPolicy.records(ckpt.get("model_config")):
        return None
    return HFPolicy.from_checkpoint(ckpt["model_config"], ckpt["model"], path)
