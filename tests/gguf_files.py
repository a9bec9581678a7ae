"""
Tiny GGUF files written in the tests, as llama.cpp's converter lays them out: its tensor names,
Llama's rotary permutation of the q and k rows, GPT-2's Conv1D weights transposed, the output head
left out when it is tied, and a byte-level BPE tokenizer in the metadata. A file written here and
read back by transformers must give the float model it came from.
"""

import gguf
import numpy as np
from transformers.convert_slow_tokenizer import bytes_to_unicode

from tokenizer import bpe_files

# GPT-2's Conv1D weights are (in, out); llama.cpp stores every matrix as (out, in)
GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def byte_level_tokenizer(specials):
    """(tokens, merges): the 256 byte-level BPE tokens (GPT-2's alphabet) and a few merges, then
    the special tokens."""
    alphabet = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "a n", "Ġ a", "i n", "e r", "Ġ s"]
    return alphabet + [a + b for a, b in (m.split() for m in merges)] + specials, merges


def gpt2_tokenizer():
    """(tokens, merges) of GPT-2's own vocabulary, from the BPE files the project ships."""
    import json

    vocab_path, merges_path = bpe_files()
    with open(vocab_path, encoding="utf-8") as f:
        vocab = json.load(f)
    with open(merges_path, encoding="utf-8") as f:
        merges = [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#")]
    return sorted(vocab, key=vocab.get), merges


def _llama_permute(weights, n_head):
    """llama.cpp's reordering of a q or k projection's rows (transformers undoes it on load)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_gguf(path, model, tokens, merges, *, bos_id=None, eos_id=None, add_bos=False,
               architecture=None, tensor_type=None):
    """Write a transformers Llama or GPT-2 model and a BPE tokenizer as a GGUF file (F32 tensors).
    architecture: the name written into the file (default: the model's); tensor_type: another
    GGMLQuantizationType for the 2-D weights, written as zero bytes (for files to be refused)."""
    c = model.config
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "gpt2": gguf.MODEL_ARCH.GPT2}[c.model_type]
    writer = gguf.GGUFWriter(path, architecture or gguf.MODEL_ARCH_NAMES[arch])
    if c.model_type == "llama":
        writer.add_context_length(c.max_position_embeddings)
        writer.add_embedding_length(c.hidden_size)
        writer.add_block_count(c.num_hidden_layers)
        writer.add_feed_forward_length(c.intermediate_size)
        writer.add_head_count(c.num_attention_heads)
        writer.add_head_count_kv(c.num_key_value_heads)
        writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
        writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
        writer.add_layer_norm_rms_eps(c.rms_norm_eps)
        writer.add_vocab_size(c.vocab_size)
        n_layer = c.num_hidden_layers
    else:
        writer.add_context_length(c.n_positions)
        writer.add_embedding_length(c.n_embd)
        writer.add_block_count(c.n_layer)
        writer.add_feed_forward_length(4 * c.n_embd)
        writer.add_head_count(c.n_head)
        writer.add_layer_norm_eps(c.layer_norm_epsilon)
        n_layer = c.n_layer
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    writer.add_token_merges(merges)
    if bos_id is not None:
        writer.add_bos_token_id(bos_id)
    if eos_id is not None:
        writer.add_eos_token_id(eos_id)
    writer.add_add_bos_token(add_bos)

    names = gguf.get_tensor_name_map(arch, n_layer)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings or name.endswith(".attn.bias"):
            continue
        base, suffix = name.rsplit(".", 1)
        data = tensor.float().numpy()
        if name.endswith("self_attn.q_proj.weight"):
            data = _llama_permute(data, c.num_attention_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            data = _llama_permute(data, c.num_key_value_heads)
        elif name.endswith(GPT2_CONV1D):
            data = data.T
        kwargs = {}
        if tensor_type is not None and data.ndim == 2:  # blocks of zero bytes of that type
            block, size = gguf.GGML_QUANT_SIZES[tensor_type]
            kwargs = {"raw_dtype": tensor_type}
            data = np.zeros((data.shape[0], data.shape[1] // block * size), dtype=np.uint8)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(data),
                          **kwargs)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)
