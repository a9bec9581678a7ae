"""
causal_lm.py's CausalLM and reward.py's CLI against tiny models built here (2 layers, 64 dims),
saved with save_pretrained and loaded back by path: a GPT-Neo with GPT-2's vocabulary, a Llama whose
own BPE adds a BOS token, and a Pythia-style GPT-NeoX with a byte-level BPE that pads on the left.
Every score is checked against a plain reference: the model's own tokenizer, lm-evaluation-harness's
boundary rule, one unbatched forward per pair.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from common import UserError, run_cli
import causal_lm
from causal_lm import CausalLM, PairError
from reward import main
from tokenizer import EOT_TOKEN, gpt2_encoding, gpt2_hf_tokenizer, gpt2_tokens

CORPUS = [
    "A man is sitting on a roof. He starts pulling up roofing on a roof.",
    "The quick brown fox jumps over the lazy dog, doesn't it? Yes!",
    "Héllo wörld: ünïcode ☃ snow and 日本語 text, 123 456 7.89 numbers.",
    "Wait... the weather is nice today. Line one\nLine two\n\nThe cats are here.",
]


def build_gpt_neo(path, window=64):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(0)
    config = GPTNeoConfig(vocab_size=50257, hidden_size=64, num_layers=2, num_heads=4,
                          intermediate_size=128, attention_types=[[["global", "local"], 1]],
                          window_size=16, max_position_embeddings=window, initializer_range=0.2,
                          bos_token_id=EOT_TOKEN, eos_token_id=EOT_TOKEN)
    GPTNeoForCausalLM(config).save_pretrained(path)
    gpt2_hf_tokenizer().save_pretrained(path)
    return str(path)


def train_tokenizer(kind):
    """A small BPE unlike GPT-2's: SentencePiece-style metaspace with a BOS ("llama"), or
    byte-level ("pythia")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>"]
    if kind == "llama":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = sorted(set("".join(CORPUS)))
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                                            initial_alphabet=alphabet))
    if kind == "llama":
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                       unk_token="<unk>", pad_token="<pad>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                   padding_side="left")


def build_llama(path, window=48):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer("llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=window, initializer_range=0.2,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def build_pythia(path, window=64):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = train_tokenizer("pythia")
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=window, initializer_range=0.2,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    GPTNeoXForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def build_gemma3(path, window=48, sliding_window=32):
    """Gemma 3's shape: a sliding-window layer, then a global one; BOS first."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = train_tokenizer("llama")
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=16, max_position_embeddings=window,
                              sliding_window=sliding_window, initializer_range=0.2,
                              layer_types=["sliding_attention", "full_attention"],
                              bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    Gemma3ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def neo(tmp_path_factory):
    return CausalLM.load(build_gpt_neo(tmp_path_factory.mktemp("neo")))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return CausalLM.load(build_llama(tmp_path_factory.mktemp("llama")))


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    return CausalLM.load(build_gemma3(tmp_path_factory.mktemp("gemma3")))


@pytest.fixture(scope="module")
def pythia(tmp_path_factory):
    return CausalLM.load(build_pythia(tmp_path_factory.mktemp("pythia")))


# --------------------------------------------------------------------------------------------------
# the reference: lm-evaluation-harness's rule and one plain forward per pair, sharing
# nothing with causal_lm.py

def reference_score(model, encode, context, continuation, start_id=None, window=None):
    """(sum log-prob, n tokens) of continuation given context. encode: the model's own tokenizer,
    special tokens included. start_id begins an empty context; window left-truncates the context
    (the head token stays)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole, ctx = encode(context + continuation), encode(context)
    assert whole[:len(ctx)] == ctx, "pick reference pairs whose boundary falls between tokens"
    cont = whole[len(ctx):]
    if not ctx:
        ctx = [start_id]
    if window is not None and len(ctx) + len(cont) - 1 > window:
        head = ctx[:1] if start_id is None else []  # a tokenizer that adds BOS keeps it
        ctx = head + ctx[len(head):][-(window + 1 - len(head) - len(cont)):]
    return reference_token_score(model, ctx, cont), len(cont)


def reference_token_score(model, context_ids, continuation_ids):
    return reference_token_logprobs(model, context_ids, continuation_ids).sum().item()


def reference_token_logprobs(model, context_ids, continuation_ids):
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits[0].float()
    # the predictions of the continuation tokens
    logp = torch.log_softmax(logits, dim=-1)[len(context_ids) - 1:]
    return logp.gather(1, torch.tensor(continuation_ids)[:, None]).squeeze(1)


def tiktoken_encode(text):
    return gpt2_encoding().encode(text)


def hf_encode(rm):
    return lambda text: rm.tokenizer(text)["input_ids"]


PAIRS = [
    ("A man is sitting on a roof.", " He starts pulling up roofing."),
    # trailing space moves to the continuation
    ("A man is sitting on a roof. ", "He starts pulling up roofing."),
    # punctuation, apostrophe
    ("The quick brown fox", " jumps over the lazy dog, doesn't it? Yes!"),
    ("Héllo wörld:", " ünïcode ☃ snow and 日本語 text"),  # unicode, multi-byte characters
    ("The weather is", "  nice today."),  # two spaces at the boundary
    # empty context: a start token (GPT-2's) or BOS (Llama) comes first
    ("", " A man is sitting on a roof."),
    ("numbers", " 123 456 7.89"),
    ("Yes.", " No!"),
]
# boundaries that fall between GPT-2 tokens but inside a metaspace token (that
# case has its own test below)
GPT2_PAIRS = [("Yes", "!"), ("He said", ' "no," and left.\n\nThen'), ("Line one\n", "Line two"),
              ("x", " y")]


def check_against_reference(rm, encode, pairs, start_id=None, batch_size=3):
    contexts, continuations = [c for c, _ in pairs], [k for _, k in pairs]
    scores = rm.score(contexts, continuations, batch_size=batch_size)  # mixed lengths in each batch
    assert set(scores) == {"sum_logprob", "n_tokens", "mean_logprob", "n_chars", "per_char_logprob"}
    for i, (context, continuation) in enumerate(pairs):
        expected, n_tokens = reference_score(rm.model, encode, context, continuation, start_id)
        assert scores["sum_logprob"][i].item() == pytest.approx(expected, abs=1e-4), (
            context, continuation)
        assert scores["n_tokens"][i].item() == n_tokens
        assert scores["n_chars"][i].item() == len(continuation)
        assert scores["mean_logprob"][i].item() == pytest.approx(expected / n_tokens, abs=1e-4)
        assert scores["per_char_logprob"][i].item() == pytest.approx(expected / len(continuation),
                                                                     abs=1e-4)
    assert all(v.dtype == torch.float32 and v.shape == (len(pairs),) for v in scores.values())
    return scores


# --------------------------------------------------------------------------------------------------
# scoring text

def test_gpt_neo_scores_match_reference(neo):
    scores = check_against_reference(neo, tiktoken_encode, PAIRS + GPT2_PAIRS, start_id=EOT_TOKEN)
    # the model is not uniform: scores differ between pairs by far more than the tolerance
    assert scores["mean_logprob"].std() > 0.1


def test_llama_with_bos_scores_match_reference(llama):
    assert llama.prefix_ids == [llama.tokenizer.bos_token_id]
    check_against_reference(llama, hf_encode(llama), PAIRS)
    rows = llama.encode_pairs(["A man", ""], [" sits", " sits"])
    # BOS once, also for an empty context
    assert [ids[0] for ids, _ in rows] == [llama.tokenizer.bos_token_id] * 2


def test_pythia_left_padding_tokenizer_scores_match_reference(pythia):
    assert pythia.tokenizer.padding_side == "left" and pythia.prefix_ids == []
    check_against_reference(pythia, hf_encode(pythia), PAIRS + GPT2_PAIRS,
                            start_id=pythia.tokenizer.eos_token_id)


def test_padding_side_and_batch_size_do_not_change_scores(neo):
    contexts, continuations = [c for c, _ in PAIRS], [k for _, k in PAIRS]
    one_by_one = neo.score(contexts, continuations, batch_size=1)["sum_logprob"]
    neo.tokenizer.padding_side = "left"
    try:
        batched = neo.score(contexts, continuations, batch_size=8)["sum_logprob"]
    finally:
        neo.tokenizer.padding_side = "right"
    torch.testing.assert_close(batched, one_by_one, atol=1e-4, rtol=0)


def test_models_without_logits_to_keep_score_the_same(neo, monkeypatch):
    contexts, continuations = [c for c, _ in PAIRS], [k for _, k in PAIRS]
    span_only = neo.score(contexts, continuations, batch_size=3)["sum_logprob"]
    # the LM head over every position
    monkeypatch.setattr(causal_lm, "keeps_logits", lambda model: False)
    torch.testing.assert_close(neo.score(contexts, continuations, batch_size=3)["sum_logprob"],
                               span_only, atol=1e-4, rtol=0)


def test_scoring_in_small_chunks_of_positions_gives_the_same_sums(neo, monkeypatch):
    contexts, continuations = [c for c, _ in PAIRS], [k for _, k in PAIRS]
    whole = neo.score(contexts, continuations, batch_size=4)["sum_logprob"]
    monkeypatch.setattr(causal_lm, "SCORE_CHUNK", 3)  # a chunk boundary inside most rows
    torch.testing.assert_close(neo.score(contexts, continuations, batch_size=4)["sum_logprob"],
                               whole, atol=1e-5, rtol=0)


def test_boundary_whitespace_belongs_to_the_continuation(neo):
    a = neo.score(["A man is "], ["sitting"])
    b = neo.score(["A man is"], [" sitting"])
    # " sitting" is one token
    assert torch.equal(a["sum_logprob"], b["sum_logprob"]) and a["n_tokens"].item() == 1
    # characters of the continuation as given
    assert (a["n_chars"].item(), b["n_chars"].item()) == (7, 8)


def test_token_spanning_the_boundary_counts_as_continuation(neo, llama):
    # GPT-2 reads "Wait..." as "Wait" "...": the continuation ".." shares a
    # token with the context's "."
    ids, n = neo.encode_pairs(["Wait."], [".."])[0]
    assert ids == tiktoken_encode("Wait...") and n == 1
    expected, _ = reference_score(neo.model, tiktoken_encode, "Wait", "...")
    assert neo.score(["Wait."], [".."])["sum_logprob"].item() == pytest.approx(expected, abs=1e-4)
    # the metaspace tokenizer merges across a newline: "Line one\n" + "Line two"
    # -> ... "▁one\nLine" "▁two"
    ids, n = llama.encode_pairs(["Line one\n"], ["Line two"])[0]
    tokens = llama.tokenizer.convert_ids_to_tokens(ids)
    assert tokens[:3] == ["<s>", "▁Line", "▁one\nLine"] and n == len(tokens) - 2
    expected, _ = reference_score(llama.model, hf_encode(llama), "Line", " one\nLine two")
    assert llama.score(["Line one\n"], ["Line two"])["sum_logprob"].item() == pytest.approx(
        expected, abs=1e-4)


def test_long_context_is_truncated_from_the_left(neo, llama):
    # ~240 GPT-2 tokens, windows of 64 and 48
    context = " ".join(["A man is sitting on a roof."] * 30)
    continuation = " He starts pulling up roofing."
    expected, n = reference_score(neo.model, tiktoken_encode, context, continuation, EOT_TOKEN,
                                  window=64)
    got = neo.score([context, "Short"], [continuation, " one"], batch_size=2)
    assert (got["sum_logprob"][0].item() == pytest.approx(expected, abs=1e-4)
            and got["n_tokens"][0] == n)
    ids, _ = neo.encode_pairs([context], [continuation])[0]
    assert len(ids) == 64 + 1  # the window is full: 64 inputs, the last token only a target
    expected, n = reference_score(llama.model, hf_encode(llama), context, continuation, window=48)
    assert llama.score([context], [continuation])["sum_logprob"].item() == pytest.approx(
        expected, abs=1e-4)
    ids, _ = llama.encode_pairs([context], [continuation])[0]
    # BOS survives the truncation
    assert len(ids) == 48 + 1 and ids[0] == llama.tokenizer.bos_token_id


# --------------------------------------------------------------------------------------------------
# a context scored once, its KV cache continued by each continuation

# HellaSwag's shape: contexts of several lengths, 4 endings each (one ending merges with the
# context at the boundary, one context outgrows the models' windows and is cut from the left)
SHARED_CONTEXTS = ["Roofing: A man is sitting on a roof. He", "The weather is nice today. The dog",
                   "Héllo wörld: the café owner opens the door. She", "Wait.",
                   " ".join(["A man is sitting on a roof."] * 12)]
SHARED_ENDINGS = [" starts pulling up roofing.", " is using a phone.", " jumps.", "..",
                  " eats a sandwich."]


def count_positions(model):
    """A list that grows by the token positions of each forward of model."""
    positions = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: positions.append(kwargs["input_ids"].numel()),
        with_kwargs=True)
    return positions


@pytest.mark.parametrize("name", ["neo", "llama", "gemma3"])
def test_shared_contexts_score_as_whole_rows(name, request):
    lm = request.getfixturevalue(name)
    pairs = [(c, e) for c in SHARED_CONTEXTS for e in SHARED_ENDINGS[:4 + len(c) % 2]]
    rows = lm.encode_pairs(*zip(*pairs))
    groups, alone = causal_lm.shared_prefix_groups(rows, causal_lm.attention_window(lm.model))
    assert len(groups) >= 2  # sharing is tested, not skipped
    positions = count_positions(lm.model)
    try:
        shared, per_token = causal_lm.sequence_logprobs(lm.model, rows, lm.pad_id, 12,
                                                        per_token=True)
        shared_positions = sum(positions)
        positions.clear()
        whole, whole_per_token = causal_lm.sequence_logprobs(lm.model, rows, lm.pad_id, 12,
                                                             per_token=True, share=False)
    finally:
        lm.model._forward_pre_hooks.clear()
    torch.testing.assert_close(shared, whole, atol=1e-4, rtol=0)
    for a, b in zip(per_token, whole_per_token):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    # fewer positions run (padding included); a windowed model shares its short rows only
    assert shared_positions < (0.8 if name == "llama" else 1) * sum(positions)
    # and each pair as one plain forward with the model's own tokenizer
    for i, (ids, n) in enumerate(rows):
        expected = reference_token_score(lm.model, ids[:-n], ids[-n:])
        assert shared[i].item() == pytest.approx(expected, abs=1e-4)


def test_a_continuation_reaching_past_a_sliding_window_runs_as_a_whole_row(gemma3):
    rows = gemma3.encode_pairs(["A man", "A man", "The weather is", "The weather is"],
                               [" sits.", " sits on a roof, then jumps into the big blue pool "
                                          "below it.", " nice.", " bad."])
    assert causal_lm.attention_window(gemma3.model) == 32 < len(rows[1][0]) < 48
    groups, alone = causal_lm.shared_prefix_groups(rows, 32)
    assert groups == [[2, 3]] and alone == [0, 1]  # the long continuation's group runs whole


def test_a_model_whose_cache_cannot_be_continued_is_scored_in_rows_said_once(neo, monkeypatch,
                                                                             capsys):
    contexts, continuations = ["A man"] * 4, [" sits.", " runs.", " eats.", " jumps."]
    shared = neo.score(contexts, continuations)["sum_logprob"]
    monkeypatch.setattr(causal_lm, "can_continue", lambda model: False)
    monkeypatch.setattr(causal_lm, "_WHOLE_ROWS_SAID", set())
    capsys.readouterr()
    torch.testing.assert_close(neo.score(contexts, continuations)["sum_logprob"], shared,
                               atol=1e-4, rtol=0)
    neo.score(contexts, continuations)
    err = capsys.readouterr().err
    assert err.count("cannot be continued") == 1 and "GPTNeoForCausalLM" in err


def test_a_scoring_batch_of_shared_contexts_stays_within_its_budget(neo, monkeypatch):
    rows = neo.encode_pairs(["A man is sitting"] * 4 + ["The weather"] * 4,
                            [" on a roof.", " down.", " up.", " here."] * 2)
    groups, _ = causal_lm.shared_prefix_groups(rows)
    vocab = neo.model.get_output_embeddings().weight.shape[0]
    assert len(causal_lm.group_batches(rows, groups, 32, neo.model.config, vocab)) == 1
    assert [len(b) for b in causal_lm.group_batches(rows, groups, 4, neo.model.config,
                                                    vocab)] == [1, 1]
    # a budget that holds one group's logits and cache, not two
    monkeypatch.setattr(causal_lm, "SCORE_BUDGET", 4 * (4 * vocab + 4 * 2 * 2 * 64) + 1)
    assert [len(b) for b in causal_lm.group_batches(rows, groups, 32, neo.model.config,
                                                    vocab)] == [1, 1]
    whole = causal_lm.sequence_logprobs(neo.model, rows, neo.pad_id, share=False)
    torch.testing.assert_close(causal_lm.sequence_logprobs(neo.model, rows, neo.pad_id), whole,
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("keeps_logits", [True, False])
def test_one_context_with_many_continuations_is_split_within_the_budget(neo, monkeypatch,
                                                                        keeps_logits):
    """A judge scoring a large GRPO group: one context, twelve continuations."""
    rows = neo.encode_pairs(["A man is sitting on a roof. He"] * 12,
                            [" starts pulling up roofing.", " jumps.", " is using a phone."] * 4)
    monkeypatch.setattr(causal_lm, "keeps_logits", lambda model: keeps_logits)
    unsplit = causal_lm.sequence_logprobs(neo.model, rows, neo.pad_id)
    vocab = neo.model.get_output_embeddings().weight.shape[0]
    longest = max(n for _, n in rows)
    # a budget that holds the logits of three rows' continuations (and, without logits_to_keep,
    # of one prefix), not twelve
    budget = 3 * longest * vocab + (0 if keeps_logits else len(rows[0][0]) * vocab)
    monkeypatch.setattr(causal_lm, "SCORE_BUDGET", budget)
    logits_sizes = []
    hook = neo.model.register_forward_hook(
        lambda module, args, output: logits_sizes.append(output.logits.numel()))
    try:
        split = causal_lm.sequence_logprobs(neo.model, rows, neo.pad_id)
    finally:
        hook.remove()
    assert len(logits_sizes) > 2 and max(logits_sizes) <= budget
    torch.testing.assert_close(split, unsplit, atol=1e-5, rtol=0)


def test_a_batch_of_whole_rows_stays_within_the_budget(neo, monkeypatch):
    rows = neo.encode_pairs(["A man is sitting", "The weather", "x", "Yes"],
                            [" on a roof.", " is nice today.", " y", " no"])
    vocab = neo.model.get_output_embeddings().weight.shape[0]
    assert causal_lm.row_batches(rows, range(4), 32, vocab) == [[0, 1, 2, 3]]
    assert causal_lm.row_batches(rows, range(4), 3, vocab) == [[0, 1, 2], [3]]
    # room for the logits of two rows' scored spans, not three
    span = len(rows[0][0]) - 1 - min(len(ids) - 1 - n for ids, n in rows[:2])
    monkeypatch.setattr(causal_lm, "SCORE_BUDGET", 2 * span * vocab)
    batches = causal_lm.row_batches(rows, range(4), 32, vocab)
    assert len(batches) >= 2 and all(len(b) <= 2 for b in batches)
    whole = causal_lm.sequence_logprobs(neo.model, rows, neo.pad_id, share=False)
    monkeypatch.undo()
    torch.testing.assert_close(whole, causal_lm.sequence_logprobs(neo.model, rows, neo.pad_id,
                                                                  share=False), atol=1e-4, rtol=0)


def test_unscoreable_pairs_are_errors_not_zeros(neo):
    with pytest.raises(PairError, match="pair 1: the continuation is empty"):
        neo.score(["A man", "A man "], [" sits", ""])
    too_long = " roof" * 65  # 65 tokens cannot fit a window of 64 even without context
    with pytest.raises(PairError,
                       match=r"pair 0: the continuation alone \(65 tokens\) does not fit .* 64"):
        neo.score(["A man"], [too_long])
    neo.score([""], [" roof" * 64])  # 64 tokens after the start token fit exactly
    with pytest.raises(ValueError, match="2 contexts but 1 continuations"):
        neo.score(["a", "b"], [" c"])
    with pytest.raises(PairError, match="empty"):
        neo.score_tokens([[1, 2]], [[]], gpt2_tokens())


@pytest.mark.parametrize("context, continuation, message", [
    ("A \ud800 man", " sits", "the context holds a lone surrogate (U+D800) at character 2"),
    ("A man", " sits\udfff", "the continuation holds a lone surrogate (U+DFFF) at character 5"),
])
def test_text_that_is_not_valid_unicode_is_a_pair_error(neo, llama, context, continuation,
                                                         message):
    """json.loads takes the escape "\\ud800" without its pair; the tokenizers library then raises
    a TypeError that says nothing of where the text came from."""
    for lm in (neo, llama):
        with pytest.raises(PairError, match=rf"^pair 1: {re.escape(message)}"):
            lm.score(["A man", context], [" sits", continuation])
    assert neo.score(["A \U0001F600 man"], [" sits"])["n_tokens"].item() >= 1  # a proper pair


def test_an_empty_context_needs_a_start_token(tmp_path):
    """With neither BOS nor EOS in the tokenizer, nothing would come before the continuation: its
    first token would be "predicted" from the row's last position. An error instead."""
    from transformers import AutoTokenizer

    path = build_pythia(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.eos_token = tokenizer.bos_token = None
    tokenizer.save_pretrained(path)
    lm = CausalLM.load(path)
    assert lm.start_id is None
    with pytest.raises(PairError, match="pair 0: nothing comes before the continuation"):
        lm.score([""], [" A man"])
    assert lm.score(["A man"], [" sits"])["n_tokens"].item() >= 1


# --------------------------------------------------------------------------------------------------
# GPT-2 token ids in

TOKEN_TEXTS = PAIRS + GPT2_PAIRS + [("Tabs\tand", " spaces   here"), ("end", ".")]


def test_score_tokens_equals_the_text_path_for_canonical_tokens(neo):
    assert neo.shares_vocab(gpt2_tokens())
    enc = gpt2_encoding()
    contexts, continuations, ctx_ids, cont_ids = [], [], [], []
    for context, continuation in TOKEN_TEXTS:
        context, continuation = context.rstrip(), context[len(context.rstrip()):] + continuation
        whole, ctx = enc.encode(context + continuation), enc.encode(context)
        if whole[:len(ctx)] != ctx:
            continue
        contexts.append(context), continuations.append(continuation)
        ctx_ids.append(ctx), cont_ids.append(whole[len(ctx):])
    assert len(contexts) == len(TOKEN_TEXTS)
    from_text = neo.score(contexts, continuations, batch_size=4)
    from_tokens = neo.score_tokens(ctx_ids, cont_ids, gpt2_tokens(), batch_size=4)
    for key in from_text:
        # the very same forwards, bit for bit
        assert torch.equal(from_text[key], from_tokens[key]), key


def test_score_tokens_scores_the_given_tokens(neo, llama):
    # a sampled, non-canonical tokenization (" roof" as " ro" "of") is scored as
    # sampled on a GPT-2-vocab model
    enc = gpt2_encoding()
    ctx, sample = enc.encode("A man on the"), enc.encode(" ro") + enc.encode("of")
    assert sample != enc.encode(" roof")
    direct = neo.score_tokens([ctx], [sample], gpt2_tokens())["sum_logprob"].item()
    assert direct == pytest.approx(reference_token_score(neo.model, ctx, sample), abs=1e-4)
    canonical = neo.score(["A man on the"], [" roof"])["sum_logprob"].item()
    # the text path would have scored " roof", a different token
    assert abs(direct - canonical) > 1e-3
    # another vocabulary: decoded and re-tokenized by the reward model's tokenizer
    assert not llama.shares_vocab(gpt2_tokens())
    got = llama.score_tokens([ctx], [sample], gpt2_tokens())
    want = llama.score(["A man on the"], [" roof"])
    assert torch.equal(got["sum_logprob"], want["sum_logprob"]) and got["n_chars"].item() == 5


# --------------------------------------------------------------------------------------------------
# per-token log-probs of GPT-2 tokens (dense rewards)

def test_char_ends_give_a_split_character_to_the_token_that_completes_it():
    # " ü" "n" " ☃" "!" cut inside characters
    pieces = [b" \xc3", b"\xbc", b"n", b" \xe2\x98", b"\x83", b"!"]
    assert b"".join(pieces).decode() == " ün ☃!"
    assert causal_lm.char_ends(pieces) == [1, 2, 3, 4, 5, 6]
    # invalid bytes: one replacement character
    assert causal_lm.char_ends([b"ab", b"\xff", b"c"]) == [2, 3, 4]


def test_align_by_chars_gives_each_judge_token_to_the_policy_token_holding_its_last_character():
    policy_ends = [3, 5, 9]  # policy tokens over chars [0, 3), [3, 5), [5, 9)
    assert causal_lm.align_by_chars([3, 4, 5, 9], policy_ends) == [0, 1, 1, 2]
    # ending in the context: the first
    assert causal_lm.align_by_chars([-2, 0, 1], policy_ends) == [0, 0, 0]
    # past the end (cannot happen): the last
    assert causal_lm.align_by_chars([12], policy_ends) == [2]


def test_per_token_logprobs_of_a_gpt2_vocab_judge_are_its_logprobs_of_the_same_tokens(neo):
    enc = gpt2_encoding()
    contexts = [enc.encode("A man on the"), enc.encode("He said"), []]
    samples = [enc.encode(" ro") + enc.encode("of"), enc.encode(' "no," and left.'),
               enc.encode(" Yes!")]
    scores = neo.score_tokens(contexts, samples, gpt2_tokens(), batch_size=2, per_token=True)
    for i, (ctx, sample) in enumerate(zip(contexts, samples)):
        expected = reference_token_logprobs(neo.model, ctx or [EOT_TOKEN], sample)
        torch.testing.assert_close(scores["token_logprobs"][i], expected, atol=1e-4, rtol=0)
        assert scores["token_logprobs"][i].sum().item() == pytest.approx(
            scores["sum_logprob"][i].item(), abs=1e-5)
    plain = neo.score_tokens(contexts, samples, gpt2_tokens(), batch_size=2)
    assert torch.equal(plain["sum_logprob"], scores["sum_logprob"])  # the sums do not change


def judge_logprobs(rm, text, n):
    """The reference log-probs of the last n of the judge's own tokens of text
    (BOS first), one forward."""
    ids = rm.tokenizer(text)["input_ids"]
    return reference_token_logprobs(rm.model, ids[:-n], ids[-n:])


def test_per_token_logprobs_of_another_vocabulary_align_by_characters(llama):
    enc = gpt2_encoding()
    # (context, the GPT-2 tokens' bytes, the judge's continuation tokens, where each goes)
    cases = [
        # the judge's "▁roofing" spans GPT-2's " roof" "ing": it goes to "ing", where it is complete
        ("He starts pulling up", [b" roof", b"ing", b"."], 2, lambda lp: [0.0, lp[0], lp[1]]),
        # the judge's "▁one\nLine" spans the context/continuation boundary: it goes to
        # "Line"; "▁t" "w" "o" to " two"
        ("Line one", [b"\n", b"Line", b" two"], 4, lambda lp: [0.0, lp[0], lp[1] + lp[2] + lp[3]]),
        # GPT-2 tokens that cut characters in two, one judge token per word
        ("Héllo wörld:",
         [b" \xc3", b"\xbc", b"n", b"\xc3\xaf", b"code", b" \xe2\x98", b"\x83", b" snow"], 3,
         lambda lp: [0.0, 0.0, 0.0, 0.0, lp[0], 0.0, lp[1], lp[2]]),
    ]
    contexts = [enc.encode(context) for context, _, _, _ in cases]
    samples = [[enc.encode_single_token(piece) for piece in pieces] for _, pieces, _, _ in cases]
    scores = llama.score_tokens(contexts, samples, gpt2_tokens(), batch_size=2,
                                per_token=True)
    for i, (context, pieces, n_judge, expected) in enumerate(cases):
        text = context + b"".join(pieces).decode()
        want = torch.tensor(expected(judge_logprobs(llama, text, n_judge).tolist()),
                            dtype=torch.float32)
        torch.testing.assert_close(scores["token_logprobs"][i], want, atol=1e-4, rtol=0)
        assert scores["token_logprobs"][i].sum().item() == pytest.approx(
            scores["sum_logprob"][i].item(), abs=1e-5)
    text_scores = llama.score([enc.decode(c) for c in contexts], [enc.decode(s) for s in samples],
                              batch_size=2)
    torch.testing.assert_close(scores["sum_logprob"], text_scores["sum_logprob"], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------
# loading

def test_reward_model_is_frozen_float32_on_cpu(neo, tmp_path):
    assert not neo.model.training and not any(p.requires_grad for p in neo.model.parameters())
    assert neo.model.dtype == torch.float32 and neo.max_length == 64
    bf16 = CausalLM.load(neo.source, dtype="bfloat16")
    assert bf16.model.dtype == torch.bfloat16
    s32, s16 = neo.score(["A man is"], [" sitting"]), bf16.score(["A man is"], [" sitting"])
    # log-probs in float32 whatever the model's dtype
    assert s16["sum_logprob"].dtype == torch.float32
    assert s16["sum_logprob"].item() == pytest.approx(s32["sum_logprob"].item(), abs=0.5)


def test_this_projects_exported_policy_can_judge(tmp_path):
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    policy = GPT(GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=64)).eval()
    policy.save_pretrained(tmp_path / "hf")
    judge = CausalLM.load(str(tmp_path / "hf"))
    assert judge.shares_vocab(gpt2_tokens()) and judge.max_length == 64
    context, continuation = (tiktoken_encode("A man is sitting on a roof."),
                             tiktoken_encode(" He starts pulling."))
    with torch.no_grad():
        logits, _ = policy(torch.tensor([context + continuation[:-1]]))
    logp = torch.log_softmax(logits[0, len(context) - 1:].float(), dim=-1)
    expected = logp.gather(1, torch.tensor(continuation)[:, None]).sum().item()
    got = judge.score(["A man is sitting on a roof."],
                      [" He starts pulling."])["sum_logprob"].item()
    assert got == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("chunk", [1, 2, 1024])
def test_encode_batch_is_encode_of_each_text(neo, llama, chunk):
    texts = [text for pair in PAIRS for text in pair] + [""]
    for lm in (neo, llama):
        assert lm.encode_batch(texts, chunk=chunk) == [lm.encode(t) for t in texts]


def test_unloadable_sources_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        CausalLM.load(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="no config.json"):
        CausalLM.load(str(tmp_path))
    (tmp_path / "ckpt.pt").write_bytes(b"x")
    with pytest.raises(UserError, match="save_pretrained"):
        CausalLM.load(str(tmp_path / "ckpt.pt"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="not a loadable transformers causal LM"):
        CausalLM.load(str(tmp_path))
    # offline in tests
    with pytest.raises(UserError, match=r"hf download EleutherAI/gpt-neo-2.7B --local-dir DIR"):
        CausalLM.load("EleutherAI/gpt-neo-2.7B")
    with pytest.raises(UserError, match="unknown dtype"):
        CausalLM.load(str(tmp_path), dtype="int8")


@pytest.mark.parametrize("build, fault, message", [
    (build_gpt_neo, "without", r"the weights lack 1 tensor\(s\) of this config "
                               r"\(transformer.h.1.mlp.c_fc.weight\)"),
    (build_llama, "without", r"the weights lack 1 tensor\(s\) of this config "
                             r"\(model.layers.1.mlp.up_proj.weight\)"),
    (build_gpt_neo, "misshapen", r"transformer.h.1.mlp.c_fc.weight is \(128, 32\), but the config "
                                 r"makes it \(128, 64\)"),
], ids=["gpt-neo without a tensor", "llama without a tensor", "gpt-neo misshapen tensor"])
def test_weights_transformers_would_fill_at_random_are_refused(tmp_path, build, fault, message):
    """An incomplete download of the judge: transformers would load it with random tensors in the
    holes and a run would score against them for hours."""
    from safetensors.torch import load_file, save_file

    path = build(tmp_path / "judge")
    weights = load_file(os.path.join(path, "model.safetensors"))
    key = next(k for k in weights if k.endswith("1.mlp.c_fc.weight")
               or k.endswith("1.mlp.up_proj.weight"))
    if fault == "without":
        del weights[key]
    else:
        weights[key] = torch.zeros(128, 32)
    save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=f"{path}: .*{message}"):
        CausalLM.load(path)


@pytest.mark.parametrize("build", [build_gpt_neo, build_llama], ids=["gpt-neo", "llama"])
def test_weights_of_a_non_float_dtype_are_refused(tmp_path, build):
    """transformers casts an int64 tensor into a float weight without a word, and an int64 copy of
    the judge would score. A bool causal mask stored beside the weights (old GPT-Neo files have
    one), which transformers leaves out, is no reason to refuse."""
    from safetensors.torch import load_file, save_file

    path = build(tmp_path / "judge")
    file = os.path.join(path, "model.safetensors")
    weights = load_file(file)
    weights["transformer.h.0.attn.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    save_file(weights, file, metadata={"format": "pt"})
    CausalLM.load(path)
    key = next(k for k in weights if k.endswith("1.mlp.c_fc.weight")
               or k.endswith("1.mlp.up_proj.weight"))
    weights[key] = weights[key].to(torch.int64)
    save_file(weights, file, metadata={"format": "pt"})
    with pytest.raises(UserError, match=re.escape(f"{file}: non-float weights (int64) in {key};")):
        CausalLM.load(path)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_weights_of_a_non_float_dtype_in_a_pytorch_model_bin_are_refused(tmp_path, zip_format):
    """The older weights file, pytorch_model.bin, which transformers still loads, in torch.save's
    format or its legacy one (which cannot be memory-mapped): the same check as for safetensors.
    Beside model.safetensors, which transformers reads instead, a stale .bin is not judged."""
    from safetensors.torch import load_file

    path = build_gpt_neo(tmp_path / "judge")
    weights = load_file(os.path.join(path, "model.safetensors"))
    file = os.path.join(path, "pytorch_model.bin")
    key = next(k for k in weights if k.endswith("1.mlp.c_fc.weight"))
    damaged = {**weights, key: weights[key].to(torch.int64)}
    torch.save(damaged, file, _use_new_zipfile_serialization=zip_format)
    CausalLM.load(path)  # the safetensors weights, float: loaded
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(UserError, match=re.escape(f"{file}: non-float weights (int64) in {key};")):
        CausalLM.load(path)
    torch.save(weights, file, _use_new_zipfile_serialization=zip_format)
    CausalLM.load(path)  # float weights: loaded


def test_a_gpt2_directory_without_its_tokenizer_is_refused(tmp_path):
    """transformers builds a GPT-2 tokenizer of one token for it, which encodes every text to
    nothing: the first reward call would fail hours in, blaming the continuation."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = str(tmp_path / "gpt2")
    config = GPT2Config(n_positions=64, n_embd=64, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(path)
    with pytest.raises(UserError, match=f"{path}: its tokenizer turns text into no tokens"):
        CausalLM.load(path)
    gpt2_hf_tokenizer().save_pretrained(path)
    assert CausalLM.load(path).encode(" He sits.") == gpt2_encoding().encode(" He sits.")


# --------------------------------------------------------------------------------------------------
# CLI

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_cli_writes_scores_in_input_order(neo, tmp_path, capsys):
    pairs = PAIRS[:4]
    src = write_jsonl(tmp_path / "pairs.jsonl",
                      [{"context": c, "continuation": k} for c, k in pairs])
    lines = (tmp_path / "pairs.jsonl").read_text().splitlines()
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines[:2] + [""] + lines[2:]) + "\n")
    out = tmp_path / "scores.jsonl"
    main(["--model", neo.source, "--input", src, "--output", str(out), "--batch-size", "2",
          "--device", "cpu"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 4, 5]  # a blank line in the input is skipped
    expected = neo.score([c for c, _ in pairs], [k for _, k in pairs])
    assert [r["n_chars"] for r in rows] == [len(k) for _, k in pairs]
    for i, r in enumerate(rows):
        assert r["sum_logprob"] == pytest.approx(expected["sum_logprob"][i].item(), abs=1e-4)
        assert r["n_tokens"] == int(expected["n_tokens"][i])
        assert r["mean_logprob"] == pytest.approx(r["sum_logprob"] / r["n_tokens"], rel=1e-5)
    main(["--model", neo.source, "--input", src, "--batch-size", "2"])  # no --output: stdout
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == rows


@pytest.mark.parametrize("lines, message", [
    (['{"context": "a", "continuation": " b"}', '{"context": "a", "continuation": " b"'],
     ", line 2: not valid JSON"),
    (['{"context": "a"}'], ", line 1: 'continuation' missing"),
    (['{"context": 3, "continuation": " b"}'], ", line 1: 'context' not a string"),
    (['', '{"context": "a", "continuation": ""}'], ", line 2: empty continuation"),
    (['[1, 2]'], ", line 1: expected an object"),
    (['{"context": "a", "continuation": " b"}', '{"context": "a", "continuation": " b\\ud800"}'],
     r", line 2: 'continuation' holds a lone surrogate \(U\+D800\) at character 2"),
])
def test_cli_bad_input_names_file_and_line(tmp_path, lines, message):
    from reward import read_pairs

    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=f"pairs.jsonl{message}"):
        read_pairs(str(path))


def test_cli_pair_that_cannot_fit_names_its_line(neo, tmp_path):
    src = write_jsonl(tmp_path / "pairs.jsonl", [{"context": "a", "continuation": " b"},
                                                 {"context": "a", "continuation": " roof" * 80}])
    with pytest.raises(UserError, match=(r"pairs.jsonl, line 2: the continuation alone "
                                         r"\(80 tokens\) does not fit")):
        main(["--model", neo.source, "--input", src])


def test_cli_progress_bar_is_drawn_on_a_terminal_only_and_never_changes_stdout(
        neo, tmp_path, terminal_stderr, monkeypatch):
    src = write_jsonl(tmp_path / "pairs.jsonl",
                      [{"context": c, "continuation": k} for c, k in PAIRS[:4]])
    runs = {}
    for run in ("terminal", "--no-progress", "pipe"):
        if run == "pipe":
            monkeypatch.undo()  # stderr is capsys's again, no terminal
        main(["--model", neo.source, "--input", src, "--batch-size", "2"]
             + (["--no-progress"] if run == "--no-progress" else []))
        runs[run] = terminal_stderr.readouterr()
    assert runs["terminal"].out == runs["--no-progress"].out == runs["pipe"].out != ""
    assert "scoring:   0%" in runs["terminal"].err and "0/4 [00:00<?, ? pair/s]" in runs[
        "terminal"].err
    for run in ("--no-progress", "pipe"):
        assert runs[run].err.startswith("scored 4 pairs") and "\r" not in runs[run].err


def test_cli_error_while_scoring_clears_the_bar_before_its_line(neo, tmp_path, terminal_stderr):
    src = write_jsonl(tmp_path / "pairs.jsonl", [{"context": "a", "continuation": " b"},
                                                 {"context": "a", "continuation": " roof" * 80}])
    with pytest.raises(SystemExit):
        run_cli(main, ["--model", neo.source, "--input", src])
    *drawn, cleared, error = terminal_stderr.readouterr().err.split("\r")
    assert "scoring" in drawn[-1] and not cleared.strip()
    assert error.startswith(f"error: {src}, line 2: the continuation alone") and error.count(
        "\n") == 1


def test_cli_text_that_is_not_valid_unicode_is_one_line(neo, tmp_path, capsys):
    src = tmp_path / "pairs.jsonl"
    src.write_text('{"context": "\\ud800", "continuation": " b"}\n')
    with pytest.raises(SystemExit) as e:
        run_cli(main, ["--model", neo.source, "--input", str(src)])
    assert e.value.code == 2 and capsys.readouterr().err == (
        f"error: {src}, line 1: 'context' holds a lone surrogate (U+D800) at character 0, which "
        "is not valid Unicode text (a JSON escape without its pair?)\n")


def test_cli_process_exits_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "reward.py", "--model", str(tmp_path), "--input",
                             str(tmp_path / "none.jsonl")], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'none.jsonl'}: no such file"]
