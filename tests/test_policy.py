"""
The policy's interface (policy.Policy, policy.Tokens) on a stand-in whose tokenizer is not GPT-2's:
a tiny GPT over bytes (one token per UTF-8 byte, shifted past its own padding and EOS ids; 259 ids
in all), driven through both rollout kinds, the update, the evaluation and a judge of another
vocabulary. A path that still assumed GPT-2's token ids would feed ids past its vocabulary, stop at
GPT-2's stop tokens, or show the judge other text.
"""

import json
import os

import torch

import analyze
import run_management
import synthetic
import train_ppo
from causal_lm import CausalLM
from hellaswag import encode_for_model, evaluate, load_examples
from model import GPT, GPTConfig
from reward import LabelReward
from test_train_ppo import read_metrics, tiny_run
from tokenizer import gpt2_encoding, gpt2_hf_tokenizer, gpt2_tokens, sentence_stop_tokens

OFFSET = 3  # ids 0, 1, 2: padding, unused, EOS


class ByteTokens:
    """One token per UTF-8 byte (its value + OFFSET); EOS 2, padding 0, nothing before a text."""
    pad_id, eos_id, bos_id = 0, 2, None

    def encode(self, text):
        return [b + OFFSET for b in text.encode("utf-8")]

    def decode(self, ids):
        return bytes(i - OFFSET for i in ids if i >= OFFSET).decode("utf-8", errors="replace")

    def token_bytes(self, token):
        return bytes([token - OFFSET]) if token >= OFFSET else b""

    def stop_tokens(self, sentence_end):
        return sentence_stop_tokens(self.encode, self.eos_id) if sentence_end else [self.eos_id]

    def vocab(self):
        return {"<pad>": 0, "<unused>": 1, "<eos>": 2,
                **{f"<0x{b:02X}>": b + OFFSET for b in range(256)}}


BYTES = ByteTokens()


class BytePolicy(GPT):
    """GPT's network over ByteTokens' ids."""
    tokens = BYTES


def byte_policy(block_size=96, seed=0):
    torch.manual_seed(seed)
    return BytePolicy(GPTConfig(vocab_size=OFFSET + 256, n_layer=2, n_head=2, n_embd=64,
                                block_size=block_size)).eval()


def val_examples(tmp_path, n):
    synthetic.write_jsonl(tmp_path / "val.jsonl", synthetic.make_examples(n, seed=3, split="val"))
    return load_examples(data_file=str(tmp_path / "val.jsonl"))


def test_gpt2_tokens_are_gpt2s_encoding():
    enc, tokens = gpt2_encoding(), gpt2_tokens()
    text = "A café <|endoftext|> ☃."
    assert tokens.encode(text) == enc.encode_ordinary(text)
    ids = enc.encode_ordinary(" ☃")
    assert tokens.decode(ids[:-1]) == enc.decode(ids[:-1], errors="replace")
    assert b"".join(tokens.token_bytes(t) for t in ids) == " ☃".encode()
    assert tokens.eos_id == tokens.pad_id == enc.eot_token and tokens.bos_id is None
    assert tokens.vocab() == gpt2_hf_tokenizer().get_vocab()
    assert tokens.stop_tokens(False) == [enc.eot_token]
    assert tokens.stop_tokens(True) == sentence_stop_tokens(enc.encode_ordinary, enc.eot_token)


def test_choice_rollouts_score_the_policys_own_rows_as_the_evaluator(tmp_path):
    examples = val_examples(tmp_path, 10)
    policy = byte_policy(block_size=40)
    cfg = train_ppo.Config(rollout="choice", reward_kind="label", choice_temperature=0.5,
                           micro_batch_size=4)
    kind = train_ppo.build_rollouts(cfg, policy, examples, LabelReward(examples), "cpu")
    # the policy's bytes, contexts cut to its window
    assert kind.encoded == [encode_for_model(ex, BYTES.encode, 40) for ex in examples]
    assert kind.encoded[0][1] == [BYTES.encode(" " + e) for e in examples[0]["endings"]]
    assert any(len(c) < len(BYTES.encode(ex["ctx"])) for (c, _), ex in zip(kind.encoded, examples))
    batch = kind.collect(policy, policy, examples, list(range(10)),
                         torch.Generator().manual_seed(0), run_management.PhaseTimer("cpu"))
    result = evaluate(policy, examples, return_predictions=True)
    sums = torch.tensor([p["sum_logprobs"] for p in result["predictions"]])
    n_tokens = torch.tensor([[len(e) for e in endings] for _, endings in kind.encoded])
    torch.testing.assert_close(batch.choice_logprobs,
                               torch.log_softmax(sums / n_tokens / 0.5, -1), atol=1e-4, rtol=0)


def test_encode_choices_is_what_the_evaluator_and_the_choice_rollouts_score(tmp_path):
    asked = []

    class ShortContexts(GPT):
        """Rows of its own making: only the last 3 context tokens."""

        def encode_choices(self, examples, style):
            asked.append(style)
            return [(context[-3:], endings)
                    for context, endings in super().encode_choices(examples, style)]

    examples = val_examples(tmp_path, 6)
    torch.manual_seed(0)
    policy = ShortContexts(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64)).eval()
    cfg = train_ppo.Config(rollout="choice", reward_kind="label", choice_temperature=1.0,
                           micro_batch_size=4)
    kind = train_ppo.build_rollouts(cfg, policy, examples, LabelReward(examples), "cpu")
    assert all(len(context) == 3 for context, _ in kind.encoded)
    batch = kind.collect(policy, policy, examples, list(range(6)),
                         torch.Generator().manual_seed(0), run_management.PhaseTimer("cpu"))
    result = evaluate(policy, examples, return_predictions=True)
    assert asked == ["completion", "completion"]
    norm_scores = torch.tensor([p["norm_scores"] for p in result["predictions"]])
    torch.testing.assert_close(batch.choice_logprobs, torch.log_softmax(norm_scores, -1),
                               atol=1e-4, rtol=0)


def test_a_policy_with_other_tokens_trains_and_is_evaluated(tmp_path, synthetic_dir, monkeypatch):
    monkeypatch.setattr(train_ppo, "build_policy", lambda source, cfg: byte_policy())
    cfg = tiny_run(tmp_path, synthetic_dir, reward_kind="label", max_steps=1, eval_limit=16)
    summary = train_ppo.train(cfg)
    assert isinstance(summary["model"], BytePolicy)
    moved = [not torch.equal(a, b) for a, b in zip(summary["model"].parameters(),
                                                    byte_policy().parameters())]
    assert any(moved)
    metrics = read_metrics(tmp_path)
    first, last = metrics[0], metrics[-1]
    assert first["step"] == 0 and last["step"] == 1
    val = load_examples(data_file=os.path.join(synthetic_dir, "val.jsonl"))[:16]
    for logged, policy in ((first, byte_policy()), (last, summary["model"])):
        assert logged["eval/acc_norm"] == evaluate(policy, val,
                                                   batch_size=cfg.eval_batch_size)["acc_norm"]


def test_generate_rollouts_write_read_and_stop_in_the_policys_tokens(tmp_path, synthetic_dir,
                                                                     monkeypatch):
    cfg = train_ppo.Config(rollout="generate", reward_kind="likelihood", stop_at_sentence_end=True)
    kind = train_ppo.build_rollouts(cfg, byte_policy(), [], None, "cpu")
    assert kind.stop_tokens.tolist() == sorted({BYTES.eos_id,
                                                *(BYTES.encode(c)[0] for c in ".!?\n")})
    # a run: the judge (the demo's teacher, of GPT-2's vocabulary) is shown the policy's text
    judged, texts = [], []
    score_tokens, row_with_char_ends = CausalLM.score_tokens, CausalLM.row_with_char_ends

    def recording_score_tokens(self, contexts, samples, tokens, *args, **kwargs):
        judged.append((contexts, samples, tokens))
        return score_tokens(self, contexts, samples, tokens, *args, **kwargs)

    def recording_rows(self, index, context, continuation):
        texts.append((context, continuation))
        return row_with_char_ends(self, index, context, continuation)

    monkeypatch.setattr(CausalLM, "score_tokens", recording_score_tokens)
    monkeypatch.setattr(CausalLM, "row_with_char_ends", recording_rows)
    monkeypatch.setattr(train_ppo, "build_policy", lambda source, cfg: byte_policy())
    train_ppo.train(tiny_run(tmp_path, synthetic_dir, rollout="generate", reward_kind="likelihood",
                             likelihood_dense=True, max_new_tokens=8, batch_size=8,
                             minibatch_size=4, max_steps=1, eval_limit=8))
    contexts = {tuple(BYTES.encode(ex["ctx"]))
                for ex in load_examples(data_file=os.path.join(synthetic_dir, "train.jsonl"))}
    assert judged and all(tokens is BYTES for _, _, tokens in judged)
    ids = [(c, s) for batch_contexts, samples, _ in judged for c, s in zip(batch_contexts, samples)]
    assert all(tuple(c) in contexts for c, _ in ids)
    # samples without their EOS, every id the policy's
    assert all(s and all(0 <= t < OFFSET + 256 and t != BYTES.eos_id for t in s) for _, s in ids)
    assert texts == [(BYTES.decode(c), BYTES.decode(s)) for c, s in ids]
    with open(tmp_path / "samples.jsonl") as f:
        saved = [json.loads(line) for line in f]
    assert {s["continuation"] for s in saved if s.get("judge_score") is not None} <= {
        continuation for _, continuation in texts}
    judge = CausalLM.load(os.path.join(synthetic_dir, "teacher"))
    assert judge.shares_vocab(gpt2_tokens()) and not judge.shares_vocab(BYTES)


def test_analyze_reads_stops_in_the_runs_tokens():
    assert set(analyze.stop_endings(BYTES, True)) == {".", "!", "?", "\n"}
    assert analyze.stop_endings(BYTES, False) == ()
    endings = analyze.stop_endings(gpt2_tokens(), True)
    for text in ("He left.", 'She said "yes!"', "Why?", "One\n", "Two\n\n", '"Go."'):
        assert analyze.stopped(text, 24, 24, endings)
    assert not analyze.stopped("He left", 24, 24, endings)
