"""
The policy's interface: what the PPO rollouts, the update and the evaluation use of a policy, its
tokenizer included, written down once. model.GPT is its reference implementation (with
tokenizer.GPT2Tokens as its tokens); any other transformers causal LM comes in through
hf_policy.HFPolicy, which meets it. Nothing outside the GPT module assumes GPT-2's token ids:
text goes in and out through policy.tokens, and the multiple-choice rows through
policy.encode_choices.

    rows = policy.encode_choices(examples, "completion")   # what the evaluator and PPO both score
    prompts, mask = causal_lm.padded([policy.tokens.encode(ctx)], policy.tokens.pad_id, left=True)
    tokens, tokens_mask, logprobs = policy.generate(prompts, mask, max_new_tokens=24,
                                                    stop_tokens=policy.tokens.stop_tokens(True))
    text = policy.tokens.decode(tokens[0])
"""

from typing import Protocol

import torch


class Tokens(Protocol):
    """A policy's tokenizer, as the rollouts, the evaluator and the judges use it."""
    eos_id: int  # ends a sample; dropped from the text a judge reads
    pad_id: int  # fills padded rows (never attended to)
    bos_id: int | None  # the token put before every text, or None (GPT-2 puts none)

    def encode(self, text):
        """str -> list[int]: ordinary text, no special tokens added (a special token's text is
        text)."""

    def decode(self, ids):
        """list[int] -> str; bytes that are not valid UTF-8 become U+FFFD."""

    def token_bytes(self, token):
        """One id -> the bytes it stands for (a judge of another vocabulary lines its own tokens up
        with the policy's by them: causal_lm.align_by_chars)."""

    def stop_tokens(self, sentence_end):
        """The ids that end a sample: eos_id, and with sentence_end the single tokens that end a
        sentence (tokenizer.sentence_stop_tokens). -> a sorted list."""

    def vocab(self):
        """{token string: id}: a judge whose transformers tokenizer's get_vocab() equals it reads
        the policy's ids as they are (causal_lm.CausalLM.shares_vocab)."""


class Policy(Protocol):
    """
    A PPO policy: an nn.Module with a value head beside its language model (one module, so one DDP
    wrapper covers both). The rollouts and the update call it through forward (a DDP wrapper syncs
    the gradients only of what ran inside forward); log-probs and values come back float32.
    hellaswag.evaluate scores the rows of encode_choices without gradients; a GPT's with the
    shared-context scorer (hellaswag.score_choices, which reads GPT's own hidden_states and KV
    cache), a transformers policy's (hf_policy.HFPolicy) through its causal_lm, as hellaswag.py
    --model SOURCE scores that model.
    """
    tokens: Tokens
    value_head: torch.nn.Module  # frozen by the estimators that take no value baseline

    @property
    def block_size(self):
        """The longest row it takes, in tokens (prompt + sample, context + ending)."""

    def encode_choices(self, examples, style):
        """HellaSwag examples -> one entry each, in the policy's own row format (JSON-able; GPT's:
        (context ids, 4 ending id lists)), cut to block_size: what the evaluator
        (hellaswag.evaluate) and the choice rollouts both score, so the choice policy scores
        exactly as the evaluator. A bad example is a UserError that names it."""

    def choice_inputs(self, encoded):
        """Entries of encode_choices -> forward's keyword arguments (CPU tensors) for their choice
        forward (GPT's: idx and segments from model.pack_choices)."""

    def choice_lengths(self, encoded):
        """Entries of encode_choices -> each ending's scored tokens (N, 4) float32 (the per-token
        normaliser), and the tokens each entry's choice forward runs (N,) long."""

    def forward(self, idx, attention_mask=None, logits_at=None, segments=None):
        """
        The choice forward, with the keyword arguments of choice_inputs -> (N, 4) summed ending
        log-probs and (N,) values at each context's last token.
        The sequence forward, with logits_at (B, T) bool over right-padded rows: -> logits (K, V)
        at the K selected positions in row-major order, and values (B, T).
        """

    def generate(self, idx, attention_mask=None, max_new_tokens=32, temperature=1.0, top_k=None,
                 top_p=None, stop_tokens=(), generator=None, with_values=False):
        """Sample continuations of left-padded prompts, drawing only from generator. -> tokens
        (B, N), their mask (1 up to and including the first stop token) and their log-probs before
        top-k / top-p (float32, 0 where masked); with_values, also the value head's (B, N) at the
        state each token was drawn in (what forward gives at the position before it)."""

    def checkpoint_fields(self):
        """What rebuilds it besides its weights, a dict of plain data (a checkpoint's
        model_config; train_ppo.policy_from_checkpoint reads it)."""

    def train_top_blocks(self, n):
        """Leave only the top n transformer blocks and what follows them (the final norm, the value
        head, an LM head of its own) trainable: the embeddings (and an LM head tied to them) and the
        blocks below are frozen, and the backward stops at the lowest of the n
        (model.freeze_below_top_blocks)."""

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """The optimizer over the trainable parameters, the value head's in groups of their own
        marked "value_head": True (its learning rate is scaled apart: value_lr_scale)."""
