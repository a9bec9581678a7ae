import copy
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.nn import functional as F

from common import UserError
from benchmarks.whole_rows import choice_logprobs, pad_choices
from model import (GPT, GPTConfig, KVCache, filter_logits, logprobs_from_logits, pack_choices,
                   sample_from_probs, sample_next_token)
from weights import CHECKPOINT_FORMAT

TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=64)


def tiny_gpt(seed=0, **overrides):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():  # a non-zero value head, so that loading it is checked too
        model.value_head.weight.normal_()
        model.value_head.bias.fill_(0.5)
    return model


@pytest.fixture(scope="module")
def hf_gpt2_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=64, n_embd=64, n_layer=2, n_head=2)
    hf = GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("hf_gpt2")
    hf.save_pretrained(path)
    return path, hf


def test_logits_equal_transformers_gpt2(hf_gpt2_dir):
    path, hf = hf_gpt2_dir
    model = GPT.from_pretrained(str(path)).eval()
    idx = torch.randint(0, 50257, (3, 17), generator=torch.Generator().manual_seed(1))
    logits, values = model(idx)
    with torch.no_grad():
        ref = hf(idx).logits
    assert logits.shape == ref.shape
    assert (logits - ref).abs().max().item() <= 1e-4
    assert values.shape == (3, 17) and values.dtype == torch.float32
    assert values.abs().max().item() == 0.0  # fresh value head is zero-initialised


def test_gradients_equal_transformers_gpt2(hf_gpt2_dir):
    """On a CPU the token embedding's gradient is computed sparse and folded into the tied
    lm_head's dense one: the weight's gradient must still be dense and equal transformers' (tokens
    repeat, so rows add up)."""
    path, hf = hf_gpt2_dir
    model = GPT.from_pretrained(str(path))
    idx = torch.randint(0, 50, (3, 17), generator=torch.Generator().manual_seed(2))
    targets = torch.randint(0, 50257, (3, 17), generator=torch.Generator().manual_seed(3))
    hf_model = copy.deepcopy(hf)
    for logits in (lambda: model(idx)[0], lambda: hf_model(idx).logits):
        F.cross_entropy(logits().flatten(0, 1), targets.flatten()).backward()
    grad, ref = model.lm_head.weight.grad, hf_model.transformer.wte.weight.grad
    assert grad.layout == torch.strided and ref[:50].abs().sum(1).min() > 0
    torch.testing.assert_close(grad, ref, atol=1e-6, rtol=1e-4)
    mlp, hf_mlp = model.transformer.h[0].mlp, hf_model.transformer.h[0].mlp
    torch.testing.assert_close(mlp.c_fc.weight.grad, hf_mlp.c_fc.weight.grad.T, atol=1e-6,
                               rtol=1e-4)
    before = model.lm_head.weight.detach().clone()
    # the fused AdamW takes the dense gradient
    model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu").step()
    assert (model.lm_head.weight != before).any()


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_row_equals_row_alone(side):
    model = tiny_gpt()
    g = torch.Generator().manual_seed(2)
    short, long = (torch.randint(0, 50257, (1, 7), generator=g),
                   torch.randint(0, 50257, (1, 12), generator=g))
    pad = torch.zeros(1, 5, dtype=torch.long)
    row = torch.cat([pad, short], 1) if side == "left" else torch.cat([short, pad], 1)
    idx = torch.cat([row, long])
    mask = torch.ones_like(idx)
    if side == "left":
        mask[0, :5] = 0
    else:
        mask[0, 7:] = 0
    logits, values = model(idx, mask)
    alone_logits, alone_values = model(short)
    real = mask[0].bool()
    assert (logits[0, real] - alone_logits[0]).abs().max().item() <= 1e-5
    assert (values[0, real] - alone_values[0]).abs().max().item() <= 1e-5
    assert (logits[1] - model(long)[0][0]).abs().max().item() <= 1e-5
    selected, _ = model(idx, mask, logits_at=mask.bool())  # LM head only at the real tokens
    assert (selected - logits[mask.bool()]).abs().max().item() <= 1e-5
    assert torch.isfinite(logits).all()  # padding queries must not produce NaN


def test_padding_does_not_count_against_the_window():
    model = tiny_gpt()  # block_size 64
    idx = torch.randint(0, 50257, (2, 70))
    mask = torch.ones_like(idx)
    mask[0, :10] = 0  # 60 real tokens: fits although the padded batch is 70 wide
    mask[1, :5] = 0  # 65 real tokens: too long
    with pytest.raises(ValueError, match="row of 65 tokens is longer than block_size 64"):
        model(idx, mask)
    mask[1, :10] = 0
    logits, _ = model(idx, mask)
    assert (logits[0, 10:] - model(idx[:1, 10:])[0][0]).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="longer than block_size"):
        model(idx)


def left_padded_prompts():
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 50257, (3, 9), generator=g)
    mask = torch.ones_like(idx)
    mask[0, :4] = 0
    mask[2, :1] = 0
    return idx, mask


def test_greedy_generate_equals_no_cache_loop():
    model = tiny_gpt(seed=4)
    idx, mask = left_padded_prompts()
    tokens, out_mask, _ = model.generate(idx, mask, max_new_tokens=8, temperature=0, stop_tokens=())
    seq, seq_mask, ref = idx, mask, []
    for _ in range(8):  # reference: a full forward over the whole sequence for every new token
        logits, _ = model(seq, seq_mask)
        next_token = logits[:, -1].argmax(-1)
        ref.append(next_token)
        seq = torch.cat([seq, next_token[:, None]], 1)
        seq_mask = torch.cat([seq_mask, torch.ones_like(seq_mask[:, :1])], 1)
    assert torch.equal(tokens, torch.stack(ref, 1))
    assert out_mask.all()


def test_sampled_logprobs_match_full_forward():
    model = tiny_gpt(seed=5)
    idx, mask = left_padded_prompts()
    temperature = 0.7
    tokens, out_mask, logprobs = model.generate(idx, mask, max_new_tokens=10,
                                                temperature=temperature, top_k=50, stop_tokens=(),
                                                generator=torch.Generator().manual_seed(0))
    full = torch.cat([idx, tokens], 1)
    full_mask = torch.cat([mask, out_mask], 1)
    logits, _ = model(full, full_mask)
    T = idx.size(1)
    ref = logprobs_from_logits(logits[:, T - 1:-1] / temperature, tokens)
    assert (ref - logprobs).abs().max().item() <= 1e-4
    # top-k 50: every sampled token is in the top 50 of its position's logits
    top50 = logits[:, T - 1:-1].topk(50, dim=-1).indices
    assert (top50 == tokens[..., None]).any(-1).all()


def test_generate_is_reproducible_with_a_generator():
    model = tiny_gpt(seed=6)
    idx, mask = left_padded_prompts()
    a = model.generate(idx, mask, max_new_tokens=6, generator=torch.Generator().manual_seed(7))[0]
    b = model.generate(idx, mask, max_new_tokens=6, generator=torch.Generator().manual_seed(7))[0]
    c = model.generate(idx, mask, max_new_tokens=6, generator=torch.Generator().manual_seed(8))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_stop_token_mask_includes_the_stop_and_nothing_after():
    model = tiny_gpt(seed=4)
    idx, mask = left_padded_prompts()
    free, _, _ = model.generate(idx, mask, max_new_tokens=6, temperature=0, stop_tokens=())
    stop = int(free[0, 2])  # row 0 stops at its third token
    tokens, out_mask, logprobs = model.generate(idx, mask, max_new_tokens=6, temperature=0,
                                                stop_tokens=(stop,))
    first_stop = (free[0] == stop).nonzero()[0].item()
    assert out_mask[0].tolist() == [1] * (first_stop + 1) + [0] * (tokens.size(1) - first_stop - 1)
    assert (logprobs[0, first_stop + 1:] == 0).all() and (logprobs[0, :first_stop + 1] < 0).all()
    assert torch.equal(tokens[:, :first_stop + 1], free[:, :first_stop + 1])


def test_generate_stops_early_when_every_row_stopped():
    model = tiny_gpt(seed=4)
    idx, mask = left_padded_prompts()
    free, _, _ = model.generate(idx, mask, max_new_tokens=4, temperature=0, stop_tokens=())
    tokens, out_mask, _ = model.generate(idx, mask, max_new_tokens=20, temperature=0,
                                         stop_tokens=free[:, 0].tolist())
    assert tokens.shape == (3, 1) and out_mask.all()


def chi_square(counts, probs):
    """Pearson's statistic of observed counts against probs (categories with probability
    0 must have no count)."""
    expected = probs / probs.sum() * counts.sum()
    assert (counts[expected == 0] == 0).all(), "a token of probability 0 was drawn"
    kept = expected > 0
    return (((counts[kept] - expected[kept]) ** 2) / expected[kept]).sum().item()


# 8 free categories: P(chi-square > 40) is about 3e-6, so the bound holds with margin
# for a correct sampler, while the test's 200,000 draws see a bias of a fraction of a
# percent in the small categories
CHI_SQUARE_BOUND = 40.0


@pytest.mark.parametrize("seed", range(4))
def test_exponential_race_draws_from_the_probabilities(seed):
    # unnormalized on purpose (the race needs no normalization), with a zero and a small category
    probs = torch.tensor([3.0, 0.0, 1.5, 0.6, 0.03, 0.9, 0.3, 1.2, 0.15, 2.4])
    draws = sample_from_probs(probs.expand(200_000, -1).contiguous(),
                              torch.Generator().manual_seed(seed))
    counts = torch.bincount(draws, minlength=probs.numel()).double()
    assert chi_square(counts, probs.double()) < CHI_SQUARE_BOUND


@pytest.mark.parametrize("top_k, top_p", [(None, None), (4, None), (None, 0.7), (5, 0.8)])
def test_sample_next_token_keeps_temperature_top_k_top_p(top_k, top_p):
    logits = torch.tensor([2.0, -1.0, 0.5, 1.5, -0.3, 0.9, -2.0, 1.1, 0.0, 0.4]).expand(100_000, -1)
    temperature = 0.8
    tokens, logp = sample_next_token(logits, temperature, top_k, top_p,
                                     torch.Generator().manual_seed(1))
    kept = F.softmax(filter_logits(logits[:1] / temperature, top_k, top_p), dim=-1)[0].double()
    assert chi_square(torch.bincount(tokens, minlength=10).double(), kept) < CHI_SQUARE_BOUND
    # log-probs under the temperature-scaled distribution before top-k / top-p, as the PPO ratio
    # needs
    assert (logp - F.log_softmax(logits / temperature, dim=-1).gather(
        1, tokens[:, None])[:, 0]).abs().max() <= 1e-6


def test_greedy_next_token_and_its_logprob_at_temperature_one():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(2))
    tokens, logp = sample_next_token(logits, temperature=0, top_k=3, top_p=0.5)
    assert torch.equal(tokens, logits.argmax(-1))
    assert (logp - F.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0]).abs().max() <= 1e-6


def test_a_uniform_draw_of_zero_never_picks_a_filtered_token():
    """The race's u = 0 makes E = -log u infinite: the only token top-k / top-p kept would have the
    ratio 0 of the filtered tokens, and the argmax would pick the row's first, a filtered one."""
    generator, drawn = torch.Generator().manual_seed(0), 0
    while True:  # the generator's first u == 0 (one float draw in 2**24)
        u = torch.empty(1_000_000).uniform_(generator=generator)
        zeros = (u == 0).nonzero()
        if len(zeros):
            break
        drawn += u.numel()
    skip = drawn + int(zeros[0]) - 3
    generator = torch.Generator().manual_seed(0)
    for n in [1_000_000] * (skip // 1_000_000) + [skip % 1_000_000]:
        torch.empty(n).uniform_(generator=generator)
    state = generator.get_state()
    assert torch.empty(1, 10).uniform_(generator=generator)[0, 3] == 0  # the draw to come
    generator.set_state(state)
    probs = torch.zeros(1, 10)
    probs[0, 3] = 1.0  # the one kept token, where u == 0 falls
    assert sample_from_probs(probs, generator).item() == 3


def test_top_p_keeps_the_smallest_set_that_reaches_it():
    """Four equal tokens (exact quarters): 0.5 is reached by two; a third, whose predecessors
    already hold 0.5, is dropped."""
    for top_p, kept in ((0.5, 2), (0.25, 1), (0.3, 2), (0.75, 3), (0.99, 4)):
        assert torch.isfinite(filter_logits(torch.zeros(1, 4), top_p=top_p)).sum() == kept


def test_sampler_draws_only_from_the_generator():
    probs = torch.rand(8, 1000, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    a = sample_from_probs(probs, torch.Generator().manual_seed(5))
    torch.manual_seed(1)  # the global generator's state does not matter
    b = sample_from_probs(probs, torch.Generator().manual_seed(5))
    c = sample_from_probs(probs, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_kv_cache_decoding_equals_full_forward():
    model = tiny_gpt(seed=11)
    idx, mask = left_padded_prompts()
    new = torch.randint(0, 50257, (3, 6), generator=torch.Generator().manual_seed(4))
    full_idx, full_mask = torch.cat([idx, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
    full, _ = model(full_idx, full_mask)  # (B, T, V) with no cache at all
    T = idx.size(1)
    cache = [KVCache(T + new.size(1)) for _ in model.transformer.h]
    with torch.no_grad():
        # the prompt, then one token at a time
        steps = [model.hidden_states(idx, mask, cache=cache)]
        for t in range(new.size(1)):
            steps.append(model.hidden_states(new[:, t:t + 1], full_mask[:, :T + t + 1],
                                             cache=cache))
        cached = model.lm_head(torch.cat(steps, 1))
    real = full_mask.bool()
    assert (cached[real] - full[real]).abs().max().item() <= 1e-5
    assert cache[0].length == T + new.size(1)
    with pytest.raises(ValueError, match="KV cache of 15 positions"):
        model.hidden_states(new[:, :1], torch.cat([full_mask, full_mask[:, :1]], 1), cache=cache)


@pytest.mark.parametrize("top_k, top_p", [(None, None), (20, None), (None, 0.9)])
def test_generate_logprobs_equal_full_forward_with_stops(top_k, top_p):
    model = tiny_gpt(seed=5)
    torch.nn.init.normal_(model.value_head.weight)  # values that differ by position
    idx, mask = left_padded_prompts()
    temperature = 0.7

    def sample(stop_tokens, with_values=False):
        return model.generate(idx, mask, max_new_tokens=10, temperature=temperature, top_k=top_k,
                              top_p=top_p, stop_tokens=stop_tokens,
                              generator=torch.Generator().manual_seed(0), with_values=with_values)

    free = sample(())[0]
    stop = int(free[0, 2])  # row 0 stops at its third token (or earlier), the others later or never
    # reading the values changes no draw
    tokens, out_mask, logprobs, values = sample((stop,), with_values=True)
    assert torch.equal(tokens, free[:, :tokens.size(1)])  # stopping changes the mask, not the draws
    first_stop = (free[0] == stop).nonzero()[0].item()
    assert out_mask[0].tolist() == [1] * (first_stop + 1) + [0] * (tokens.size(1) - first_stop - 1)
    assert not out_mask.all()
    # generate goes on feeding a stopped row its samples (masked out afterwards): the
    # full forward sees them too
    logits, forward_values = model(torch.cat([idx, tokens], 1),
                                   torch.cat([mask, torch.ones_like(tokens)], 1))
    T = idx.size(1)
    ref = logprobs_from_logits(logits[:, T - 1:-1] / temperature, tokens) * out_mask
    assert (ref - logprobs).abs().max().item() <= 1e-5
    # each token's value is read in the state it was drawn in: forward's at the position before it
    assert values[out_mask == 1].abs().min() > 0 and not values[out_mask == 0].any()
    assert (values - forward_values[:, T - 1:-1] * out_mask).abs().max().item() <= 1e-5
    # every sampled token survives top-k / top-p at its position
    allowed = torch.isfinite(filter_logits(logits[:, T - 1:-1].flatten(0, 1) / temperature, top_k,
                                           top_p))
    assert allowed.gather(1, tokens.flatten()[:, None]).all()


def four_row_choice_forward(model, encoded):
    """The computation choice_forward replaces: a full forward of the 4 rows context +
    ending of every example."""
    idx, attention_mask, target_mask = pad_choices(encoded)
    logits, values = model(idx, attention_mask, logits_at=target_mask.bool())
    sum_logprobs, _ = choice_logprobs(logits, idx, target_mask)
    last_context = torch.tensor([len(context) - 1 for context, _ in encoded])
    return sum_logprobs, values.view(-1, 4, values.size(1))[:, 0].gather(
        1, last_context[:, None]).squeeze(1)


def random_choices(seed):
    """Contexts of different lengths, and endings of different lengths within and across
    examples (one of 1 token)."""
    g = torch.Generator().manual_seed(seed)
    tokens = lambda n: torch.randint(0, 50257, (n,), generator=g).tolist()  # noqa: E731
    return [(tokens(5), [tokens(3), tokens(1), tokens(6), tokens(2)]),
            (tokens(11), [tokens(4), tokens(4), tokens(2), tokens(7)]),
            (tokens(2), [tokens(9), tokens(3), tokens(5), tokens(1)])]


def test_shared_context_choice_forward_equals_four_rows_with_gradients():
    model = tiny_gpt(seed=12)
    encoded = random_choices(seed=13)
    g = torch.Generator().manual_seed(14)
    weights, value_weights = torch.randn(3, 4, generator=g), torch.randn(3, generator=g)

    def loss_and_grads(forward):
        model.zero_grad()
        sum_logprobs, values = forward()
        # as a PPO loss averages
        ((sum_logprobs * weights).mean() + (values * value_weights).mean()).backward()
        return sum_logprobs.detach(), values.detach(), {k: p.grad.clone()
                                                        for k, p in model.named_parameters()}

    ref_logprobs, ref_values, ref_grads = loss_and_grads(
        lambda: four_row_choice_forward(model, encoded))
    idx, segments = pack_choices(encoded)
    assert idx.shape == (3, 28) and segments[2].tolist() == (
        [0] * 2 + [1] * 9 + [2] * 3 + [3] * 5 + [4] + [-1] * 8)
    # through forward, as a DDP-wrapped model is called
    logprobs, values, grads = loss_and_grads(lambda: model(idx, segments=segments))
    assert (logprobs.dtype == values.dtype == torch.float32 and logprobs.shape == (3, 4)
            and values.shape == (3,))
    assert (logprobs - ref_logprobs).abs().max().item() <= 1e-5
    assert (values - ref_values).abs().max().item() <= 1e-5
    assert ref_values.abs().min() > 0.1  # the value head is not zero, so the values test something
    for name, ref in ref_grads.items():
        assert ref.abs().max() > 0, name  # every parameter gets a gradient, through both paths
        assert (grads[name] - ref).abs().max().item() <= 1e-4, name


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [
        [False, False, True, True, True]]
    # nucleus 0.8: 0.5 + 0.2 = 0.7 < 0.8, so the 0.15 token is needed too
    assert torch.isinf(filter_logits(logits, top_p=0.8)).tolist() == [
        [False, False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.45)).tolist() == [
        [False, True, True, True, True]]
    shuffled = logits[:, [3, 0, 4, 2, 1]]
    assert torch.isinf(filter_logits(shuffled, top_p=0.8)).tolist() == [
        [True, False, True, False, False]]


def test_build_nanogpt_checkpoint_loads(tmp_path):
    """A checkpoint written the way build-nanogpt's train_gpt2.py writes it: a GPTConfig dataclass
    from __main__, a torch.compile'd state dict (_orig_mod. prefixes), step and val_loss."""
    model = tiny_gpt(seed=8)
    sd_path, ckpt_path = tmp_path / "sd.pt", tmp_path / "model_00050.pt"
    torch.save(model.state_dict(), sd_path)
    script = textwrap.dedent(f"""
        import torch
        from dataclasses import dataclass
        @dataclass
        class GPTConfig:
            block_size: int = 64
            vocab_size: int = 50257
            n_layer: int = 2
            n_head: int = 2
            n_embd: int = 64
        sd = torch.load({str(sd_path)!r})
        sd = {{"_orig_mod." + k: v for k, v in sd.items() if not k.startswith("value_head.")}}
        checkpoint = {{"model": sd, "config": GPTConfig(), "step": 50, "val_loss": 3.2}}
        torch.save(checkpoint, {str(ckpt_path)!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    loaded = GPT.from_pretrained(str(ckpt_path)).eval()
    assert loaded.config.n_layer == 2 and loaded.config.block_size == 64
    idx = torch.randint(0, 50257, (2, 11))
    assert (loaded(idx)[0] - model(idx)[0]).abs().max().item() == 0.0


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.",
                                    "_orig_mod.module."])
def test_a_state_dict_under_any_nesting_of_ddp_and_compile_wrappers_loads(tmp_path, prefix):
    import dataclasses

    model = tiny_gpt(seed=8)
    sd = {prefix + k: v for k, v in model.state_dict().items() if not k.startswith("value_head.")}
    torch.save({"model": sd, "model_args": dataclasses.asdict(model.config)}, tmp_path / "ckpt.pt")
    loaded = GPT.from_pretrained(str(tmp_path / "ckpt.pt"))
    for (name, a), b in zip(model.transformer.state_dict().items(),
                            loaded.transformer.state_dict().values()):
        assert torch.equal(a, b), name


def test_project_checkpoint_and_run_dir_load(tmp_path):
    import dataclasses

    model = tiny_gpt(seed=9)
    ckpt = {"format": CHECKPOINT_FORMAT, "model_config": dataclasses.asdict(model.config),
            "model": model.state_dict()}
    torch.save(ckpt, tmp_path / "ckpt_000007.pt")
    # older
    torch.save({**ckpt, "model": tiny_gpt(seed=1).state_dict()}, tmp_path / "ckpt_000003.pt")
    idx = torch.randint(0, 50257, (2, 11))
    for source in (tmp_path / "ckpt_000007.pt", tmp_path):
        loaded = GPT.from_pretrained(source).eval()
        logits, values = loaded(idx)
        ref_logits, ref_values = model(idx)
        assert torch.equal(logits, ref_logits) and torch.equal(values, ref_values)


def test_bad_checkpoints_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="corrupt.pt"):
        GPT.from_pretrained(corrupt)
    unknown = tmp_path / "unknown.pt"
    torch.save({"weights": torch.zeros(2)}, unknown)
    with pytest.raises(UserError, match="unknown.pt.*unknown checkpoint layout"):
        GPT.from_pretrained(unknown)
    with pytest.raises(UserError, match="no such file"):
        GPT.from_pretrained(tmp_path / "missing.pt")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(UserError, match="neither"):
        GPT.from_pretrained(empty_dir)


def test_mismatched_weights_are_a_clear_error(tmp_path):
    import dataclasses

    model = tiny_gpt()
    config = dataclasses.asdict(model.config) | {"n_layer": 3}
    torch.save({"format": CHECKPOINT_FORMAT, "model_config": config, "model": model.state_dict()},
               tmp_path / "x.pt")
    with pytest.raises(UserError, match="x.pt: weights do not fit"):
        GPT.from_pretrained(tmp_path / "x.pt")


def rewrite_tensor(path, name, dtype):
    """Store one tensor of a safetensors file as dtype, as a careless conversion would."""
    from safetensors.torch import load_file, save_file

    weights = load_file(path)
    weights[name] = weights[name].to(dtype)
    save_file(weights, path, metadata={"format": "pt"})


@pytest.mark.parametrize("file, tensor, dtype", [
    ("model.safetensors", "transformer.wte.weight", torch.int64),
    ("model.safetensors", "transformer.h.1.mlp.c_fc.weight", torch.bool),
    ("value_head.safetensors", "weight", torch.int8),
])
def test_a_transformers_dir_with_weights_of_a_non_float_dtype_is_refused(tmp_path, file, tensor,
                                                                         dtype):
    """transformers and load_state_dict would cast them to float without a word, and an int64 copy
    of a model would be scored."""
    tiny_gpt().save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / file
    rewrite_tensor(path, tensor, dtype)
    message = f"{path}: non-float weights ({str(dtype).removeprefix('torch.')}) in {tensor};"
    with pytest.raises(UserError, match=re.escape(message)):
        GPT.from_pretrained(tmp_path / "hf")


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.int8])
def test_a_checkpoint_with_weights_of_a_non_float_dtype_is_refused(tmp_path, dtype):
    import dataclasses

    model = tiny_gpt()
    sd = {k: v.to(dtype) if k == "transformer.h.0.attn.c_attn.weight" else v
          for k, v in model.state_dict().items()}
    path = tmp_path / "ckpt.pt"
    torch.save({"model": sd, "model_args": dataclasses.asdict(model.config)}, path)
    message = (f"{path}: non-float weights ({str(dtype).removeprefix('torch.')}) in "
               "transformer.h.0.attn.c_attn.weight;")
    with pytest.raises(UserError, match=re.escape(message)):
        GPT.from_pretrained(path)


def test_offline_hub_name_fails_with_one_clear_line():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(UserError) as e:
        GPT.from_pretrained("gpt2")
    message = str(e.value)
    assert "gpt2" in message and "hub" in message and "\n" not in message


def test_non_gpt2_transformers_dir_is_refused(tmp_path):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    neo = GPTNeoForCausalLM(GPTNeoConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=2,
                                         attention_types=[[["global"], 2]],
                                         max_position_embeddings=32))
    neo.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="gpt_neo"):
        GPT.from_pretrained(tmp_path)


def test_export_loads_in_transformers_offline(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenizer import gpt2_encoding

    model = tiny_gpt(seed=10)
    out = tmp_path / "export"
    model.save_pretrained(out)
    model.save_pretrained(out)  # overwriting an existing export works
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    text = "The policy was exported, and café ünïcode survives."
    ids = tok(text)["input_ids"]
    assert ids == gpt2_encoding().encode_ordinary(text)
    idx = torch.tensor([ids])
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)[0]).abs().max().item() <= 1e-4
    # and back: the value head travels with the export
    again = GPT.from_pretrained(out).eval()
    assert torch.allclose(again(idx)[1], model(idx)[1], atol=1e-5)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp dirs left behind


def test_a_nanogpt_model_without_biases_exports_as_gpt2_with_zero_biases(tmp_path):
    """nanoGPT trains with bias=False by default: its checkpoint loads, trains, and exports (GPT-2
    has biases, so they are zeros there)."""
    from transformers import AutoModelForCausalLM

    model = tiny_gpt(seed=11, bias=False)
    with torch.no_grad():
        # LayerNorm gains other than 1, so the export must carry them
        for block in model.transformer.h:
            block.ln_1.weight.uniform_(0.5, 1.5)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(),
                "model_args": {**TINY, "vocab_size": 50257, "bias": False}}, path)
    loaded = GPT.from_pretrained(str(path)).eval()
    assert not loaded.config.bias
    loaded.save_pretrained(tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 50257, (2, 9))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)[0]).abs().max().item() <= 1e-4
        assert all(p.abs().max() == 0 for name, p in hf.named_parameters()
                   if name.endswith(".bias"))
    assert (GPT.from_pretrained(str(tmp_path / "hf")).eval()(idx)[0]
            - model(idx)[0]).abs().max().item() <= 1e-4


def test_generate_wants_at_least_one_new_token():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1, not 0"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=0)


def test_generate_refuses_right_padded_prompts():
    """It would sample the next token from a padding position's state, silently."""
    model = tiny_gpt()
    idx = torch.tensor([[5, 6, 7], [8, 9, 0]])
    with pytest.raises(ValueError, match="left-padded prompts"):
        model.generate(idx, torch.tensor([[1, 1, 1], [1, 1, 0]]), max_new_tokens=2)
    tokens, _, _ = model.generate(idx, torch.tensor([[1, 1, 1], [0, 1, 1]]), max_new_tokens=2)
    assert tokens.shape == (2, 2)


def test_optimizer_groups_decay_matrices_only():
    model = tiny_gpt()
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-4, betas=(0.9, 0.95),
                                     device_type="cpu")
    value_head = set(model.value_head.parameters())
    for group in opt.param_groups:  # the policy's, then the value head's, for each weight decay
        decays = group["weight_decay"] > 0
        assert all((p.dim() >= 2) == decays for p in group["params"])
        assert all((p in value_head) == group["value_head"] for p in group["params"])
    assert [(g["weight_decay"], g["value_head"]) for g in opt.param_groups] == [
        (0.1, False), (0.1, True), (0.0, False), (0.0, True)]
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()


def test_optimizer_is_adamw_with_its_decay_groups_in_one_fused_kernel():
    """configure_optimizers' fused AdamW takes the steps of the per-tensor AdamW over the same
    groups: decoupled weight decay on the matrices only."""
    torch.manual_seed(0)
    model = tiny_gpt()
    twin = copy.deepcopy(model)
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-2, betas=(0.9, 0.95),
                                     device_type="cpu")
    assert opt.defaults["fused"]
    params = list(twin.parameters())
    plain = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                               {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                              lr=1e-2, betas=(0.9, 0.95), foreach=False)
    idx = torch.randint(0, model.config.vocab_size, (2, 8))
    for _ in range(3):
        for m, o in ((model, opt), (twin, plain)):
            logits, values = m(idx)
            (logits.logsumexp(-1).mean() + values.pow(2).mean()).backward()
            o.step()
            o.zero_grad(set_to_none=True)
    C = model.config.n_embd
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if name.endswith("c_attn.bias"):
            # the key bias has no gradient (softmax is blind to it) beyond rounding noise, which
            # Adam scales up to whole steps: compare the query and value parts only
            p, q = torch.cat([p[:C], p[2 * C:]]), torch.cat([q[:C], q[2 * C:]])
        assert torch.allclose(p, q, atol=2e-6), name
    # and the step did move them, the LayerNorm gains by Adam alone
    assert not torch.allclose(model.transformer.ln_f.weight,
                              torch.ones_like(model.transformer.ln_f.weight))
