import hashlib

import pytest

from tokenizer import (ENCODER_JSON_SHA256, EOT_TOKEN, VOCAB_BPE_SHA256, bpe_files, gpt2_encoding,
                       gpt2_hf_tokenizer)

STRINGS = [
    "Hello world",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nand  double  spaces",
    "unicode: naïve café — 東京 🙂 ẞ",
    "numbers 1234567 3.14159 and punctuation!?;:'\"()[]{}",
    "contractions: don't, we'll, they're, I'd, it's",
    "A man is sitting on a roof. he starts pulling up roofing on a roof.",
    "   ",
    "",
]


def test_bpe_files_have_tiktokens_hashes():
    encoder_json, vocab_bpe = bpe_files()
    assert hashlib.sha256(open(encoder_json, "rb").read()).hexdigest() == ENCODER_JSON_SHA256
    assert hashlib.sha256(open(vocab_bpe, "rb").read()).hexdigest() == VOCAB_BPE_SHA256


@pytest.mark.parametrize("text", STRINGS)
def test_encoding_matches_transformers_gpt2_tokenizer(text):
    enc, hf = gpt2_encoding(), gpt2_hf_tokenizer()
    ids = enc.encode_ordinary(text)
    assert ids == hf(text)["input_ids"]
    assert enc.decode(ids) == text


def test_endoftext_is_one_special_token():
    enc, hf = gpt2_encoding(), gpt2_hf_tokenizer()
    text = "first document<|endoftext|>second"
    ids = enc.encode(text, allowed_special="all")
    assert ids.count(EOT_TOKEN) == 1
    assert ids == hf(text)["input_ids"]
    assert enc.n_vocab == 50257 and len(hf) == 50257
    # as ordinary text it is not the special token
    assert EOT_TOKEN not in enc.encode_ordinary(text)
