"""hellaswag.py: records and validation, the two rendering styles, tokens, and the batched
scorer against a straightforward per-example implementation. The fixtures are synthetic,
written for these tests."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import hellaswag
from common import UserError
from causal_lm import split_encode
from benchmarks.whole_rows import choice_logprobs, pad_choices
from hellaswag import encode_example, evaluate, example_texts, load_examples, score_choices
from model import GPT, GPTConfig
from tokenizer import EOT_TOKEN, gpt2_encoding

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hellaswag_synthetic.jsonl")
TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=256)


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**TINY)).eval()


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def record(**overrides):
    base = {"ind": 1, "activity_label": "Cooking", "ctx_a": "A cook cuts an onion.", "ctx_b": "she",
            "ctx": "A cook cuts an onion. she", "split": "val", "split_type": "indomain",
            "label": 1,
            "endings": ["eats the knife.", "puts the onion in a pan.", "flies away.", "reads."],
            "source_id": "activitynet~v_x"}
    return {k: v for k, v in {**base, **overrides}.items() if v is not ...}


def varied_examples(n, seed=0):
    """Synthetic examples of many lengths, single-token endings included (they
    skip the ending pass)."""
    g = torch.Generator().manual_seed(seed)
    words = ("the a dog cat runs jumps over under quickly slowly red blue house tree river and "
             "then").split()
    def text(k):
        return " ".join(words[i] for i in torch.randint(0, len(words), (k,), generator=g).tolist())
    examples = []
    for i in range(n):
        ctx_len = int(torch.randint(1, 30, (1,), generator=g))
        lengths = [int(x) for x in torch.randint(1, 12, (4,), generator=g)]
        if i % 5 == 0:
            lengths = [1, 1, 1, 1]
        examples.append({"index": i, "ctx": text(ctx_len).capitalize(),
                         "endings": [text(k) + "." if k > 1 else text(1) for k in lengths],
                         "label": i % 4})
    return examples


# --------------------------------------------------------------------------------------------------
# records and validation

def test_load_examples_reads_every_field_and_position():
    examples = load_examples(data_file=FIXTURE)
    assert [ex["index"] for ex in examples] == list(range(6))
    first = examples[0]
    assert (first["ctx"] == "A woman pours flour into a bowl. she" and first["label"] == 2
            and first["ind"] == 3)
    assert first["endings"][2] == "cracks two eggs into the flour and stirs."
    assert (first["split_type"], first["source_id"], first["activity_label"]) == (
        "indomain", "activitynet~v_synthetic001", "Baking cookies")
    assert len(load_examples(data_file=FIXTURE, limit=2)) == 2


def test_optional_fields_may_be_missing_and_hub_labels_are_digit_strings(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        # hub copy: label "3"
        {"ctx": "A man sits.", "endings": ["a.", "b.", "c.", "d."], "label": "3"},
        {"ctx_a": "A man stands.", "ctx_b": "he", "endings": ["a.", "b.", "c.", "d."], "label": 0},
        {"ctx": "Unlabeled.", "endings": ["a.", "b.", "c.", "d."]},  # the test split
    ])
    a, b, c = load_examples(data_file=path)
    assert a == {"index": 0, "ctx": "A man sits.", "endings": ["a.", "b.", "c.", "d."], "label": 3}
    assert b["ctx"] == "A man stands. he" and b["label"] == 0
    assert c["label"] is None


@pytest.mark.parametrize("line, field", [
    (json.dumps(record(endings=["a.", "b.", "c."])), "'endings'"),
    (json.dumps(record(endings=["a.", "", "c.", "d."])), "'endings'"),
    (json.dumps(record(endings="a. b. c. d.")), "'endings'"),
    (json.dumps(record(label=4)), "'label'"),
    (json.dumps(record(label="two")), "'label'"),
    (json.dumps(record(label=True)), "'label'"),
    (json.dumps(record(label="²")), "'label'"),  # a digit to str.isdigit, not to int()
    (json.dumps(record(ctx=..., ctx_a=..., ctx_b=...)), "'ctx'"),
    (json.dumps(record(ctx="  ")), "'ctx'"),
    (json.dumps(record(ind="seven")), "'ind'"),
    ('{"ctx": "A man', "not valid JSON"),
    ("[1, 2, 3]", "expected a JSON object"),
])
def test_bad_record_names_file_line_and_field(tmp_path, line, field):
    path = write_jsonl(tmp_path / "bad.jsonl", [record(), line])
    with pytest.raises(UserError) as e:
        load_examples(data_file=path)
    message = str(e.value)
    assert message.startswith(f"{path}, line 2") and field in message and "\n" not in message


def test_missing_data_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_examples(data_file=str(tmp_path / "nope.jsonl"))


def test_hub_copy_through_datasets(monkeypatch):
    import datasets

    rows = [dict(record(label="2"), ind=7), dict(record(label="0"), ind=9)]
    calls = []
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name, split: calls.append((name, split)) or rows)
    examples = load_examples("val", hub=True)
    assert calls == [("Rowan/hellaswag", "validation")]
    assert [(ex["label"], ex["ind"], ex["index"]) for ex in examples] == [(2, 7, 0), (0, 9, 1)]


def test_evaluate_refuses_unlabeled_examples(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", [record(label=...), record(label=...)])
    with pytest.raises(UserError, match="no label"):
        evaluate(tiny_gpt(), load_examples(data_file=path))


# --------------------------------------------------------------------------------------------------
# rendering

def test_completion_style_is_raw_ctx_and_space_ending():
    example = load_examples(data_file=FIXTURE)[2]  # a WikiHow record: tags stay in completion style
    context, continuations = example_texts(example, "completion")
    assert context == example["ctx"]
    assert continuations == [" " + e for e in example["endings"]]


def test_lm_eval_style_prefix_capitalisation_and_cleaning():
    examples = load_examples(data_file=FIXTURE)
    context, continuations = example_texts(examples[1], "lm-eval")
    assert context == "Walking the dog: A man clips a leash onto a small dog. The dog"
    assert continuations[0] == " wags its tail and runs to the door."
    context, continuations = example_texts(examples[2], "lm-eval")
    assert context == ("Home and Garden: How to water a cactus. Check the soil. Push a finger into "
                       "the soil.")
    # the harness's quirks, kept
    assert continuations == ["  Pour a litre of milk on it.",
                             " If the soil is dry, water it slowly. Let it drain.",
                             " Bury the cactus in sand.", "  Paint the pot."]
    with pytest.raises(UserError, match="unknown style"):
        example_texts(examples[0], "fewshot")


def _harness_utils():
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("lm-eval is not installed")
    path = os.path.join(spec.submodule_search_locations[0], "tasks", "hellaswag", "utils.py")
    # load the file alone: importing lm_eval.tasks pulls in every task's dependencies
    module_spec = importlib.util.spec_from_file_location("lm_eval_hellaswag_utils", path)
    utils = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(utils)
    return utils


def test_lm_eval_style_equals_the_harness_process_docs():
    utils = _harness_utils()
    import datasets

    with open(FIXTURE) as f:
        raw = [json.loads(line) for line in f]
    docs = utils.process_docs(datasets.Dataset.from_list(raw))
    for doc, example in zip(docs, load_examples(data_file=FIXTURE)):
        context, continuations = example_texts(example, "lm-eval")
        assert context == doc["query"]
        # the harness's target delimiter " "
        assert continuations == [" " + choice for choice in doc["choices"]]
        assert example["label"] == doc["gold"]


# --------------------------------------------------------------------------------------------------
# tokens and the straightforward scorer

def test_encode_example_completion_encodes_parts_separately():
    enc = gpt2_encoding()
    example = load_examples(data_file=FIXTURE)[0]
    context_tokens, ending_tokens = encode_example(example, enc.encode_ordinary)
    assert context_tokens == enc.encode_ordinary(example["ctx"])
    assert ending_tokens == [enc.encode_ordinary(" " + e) for e in example["endings"]]


def test_split_encode_moves_trailing_space_and_keeps_a_spanning_token_whole():
    enc = gpt2_encoding()
    context_tokens, ending_tokens = split_encode(enc.encode_ordinary, "The end is near ", "now.")
    assert context_tokens == enc.encode_ordinary("The end is near")
    # the space goes after
    assert context_tokens + ending_tokens == enc.encode_ordinary("The end is near now.")
    # "Wait." + ".." encodes whole as "Wait" "...": the token spanning the
    # boundary is the continuation's
    context_tokens, ending_tokens = split_encode(enc.encode_ordinary, "Wait.", "..")
    assert (context_tokens == enc.encode_ordinary("Wait")
            and ending_tokens == enc.encode_ordinary("..."))


def test_lm_eval_style_gives_a_spanning_token_to_the_ending():
    def encode(text):  # characters, except that ". ." is one token: it spans "Wait." + " .."
        return [999 if part == ". ." else ord(part) for part in re.findall(r"\. \.|.", text)]

    example = {"index": 0, "ctx": "Wait.", "endings": ["..", "now.", "later.", "soon."], "label": 0}
    context_tokens, ending_tokens = encode_example(example, encode, style="lm-eval")
    context, continuations = example_texts(example, "lm-eval")
    assert context_tokens == encode("Wait") and ending_tokens[0] == [999, ord(".")]
    # each row is the whole text's encoding
    for continuation, tokens in zip(continuations, ending_tokens):
        assert context_tokens + tokens == encode(context + continuation)


def test_a_context_that_cleaning_empties_is_an_error():
    enc = gpt2_encoding()
    example = {"index": 7, "ctx": "[header]", "endings": ["a.", "b.", "c.", "d."], "label": 0}
    with pytest.raises(UserError,
                       match="example 7: the context is empty once lm-eval-style cleaning is done"):
        encode_example(example, enc.encode_ordinary, style="lm-eval")


def test_pad_choices_layout():
    encoded = [([1, 2, 3], [[4], [5, 6], [7], [8, 9, 10]]), ([11], [[12], [13], [14, 15], [16]])]
    idx, attention_mask, target_mask = pad_choices(encoded, pad_token=0)
    assert idx.shape == (8, 6)
    assert idx[3].tolist() == [1, 2, 3, 8, 9, 10] and idx[6].tolist() == [11, 14, 15, 0, 0, 0]
    assert attention_mask[6].tolist() == [1, 1, 1, 0, 0, 0]
    assert target_mask[1].tolist() == [0, 0, 1, 1, 0, 0]  # positions 2, 3 predict tokens 5, 6
    assert target_mask[6].tolist() == [1, 1, 0, 0, 0, 0]
    assert target_mask[:, -1].sum() == 0


def test_choice_logprobs_sums_ending_tokens_and_is_differentiable():
    encoded = [([1, 2, 3], [[4], [5, 6], [7], [8, 9, 10]])]
    idx, _, target_mask = pad_choices(encoded, pad_token=0)
    logits = torch.randn(4, idx.size(1), 20, generator=torch.Generator().manual_seed(0),
                         requires_grad=True)
    sums, n_tokens = choice_logprobs(logits, idx, target_mask)
    logp = torch.log_softmax(logits.detach(), -1)
    # ending 3: tokens 8, 9, 10 after context 1, 2, 3
    expected = logp[3, 2, 8] + logp[3, 3, 9] + logp[3, 4, 10]
    assert torch.allclose(sums[0, 3], expected) and n_tokens.tolist() == [[1.0, 2.0, 1.0, 3.0]]
    assert sums.dtype == n_tokens.dtype == torch.float32
    sums.sum().backward()
    # past the ending: no gradient
    assert logits.grad[3, 2].abs().sum() > 0 and logits.grad[3, 5].abs().sum() == 0


# --------------------------------------------------------------------------------------------------
# the batched scorer against one full forward per example

def reference_scores(model, encoded):
    rows = []
    with torch.no_grad():
        for example in encoded:
            idx, attention_mask, target_mask = pad_choices([example])
            logits, _ = model(idx, attention_mask)
            rows.append(choice_logprobs(logits, idx, target_mask)[0][0])
    return torch.stack(rows)


@pytest.fixture(scope="module")
def model_and_reference():
    model = tiny_gpt()
    enc = gpt2_encoding()
    encoded = [encode_example(ex, enc.encode_ordinary) for ex in varied_examples(23)]
    return model, encoded, reference_scores(model, encoded)


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_fast_scorer_equals_per_example_reference(model_and_reference, batch_size):
    model, encoded, ref = model_and_reference
    fast = score_choices(model, encoded, batch_size=batch_size)
    assert fast.shape == (23, 4) and fast.dtype == torch.float32
    assert (fast - ref).abs().max().item() < 1e-4
    assert torch.equal(fast.argmax(1), ref.argmax(1))


def test_evaluate_predictions_and_accuracy_from_the_reference():
    model = tiny_gpt(seed=1)
    examples = varied_examples(17, seed=3)
    enc = gpt2_encoding()
    encoded = [encode_example(ex, enc.encode_ordinary) for ex in examples]
    ref = reference_scores(model, encoded)
    n_tokens = torch.tensor([[len(e) for e in endings] for _, endings in encoded],
                            dtype=torch.float32)
    labels = torch.tensor([ex["label"] for ex in examples])
    result = evaluate(model, examples, batch_size=4, return_predictions=True)
    assert result["n"] == 17
    assert result["acc"] == pytest.approx((ref.argmax(1) == labels).float().mean().item())
    assert result["acc_norm"] == pytest.approx(
        ((ref / n_tokens).argmax(1) == labels).float().mean().item())
    predictions = result["predictions"]
    assert [p["index"] for p in predictions] == list(range(17))
    assert [p["pred"] for p in predictions] == ref.argmax(1).tolist()
    assert torch.allclose(torch.tensor([p["norm_scores"] for p in predictions]), ref / n_tokens,
                          atol=1e-4)


def test_lm_eval_style_normalises_by_characters():
    model = tiny_gpt()
    examples = load_examples(data_file=FIXTURE)
    result = evaluate(model, examples, style="lm-eval", return_predictions=True)
    for example, p in zip(examples, result["predictions"]):
        chars = [len(c) - 1 for c in example_texts(example, "lm-eval")[1]]
        expected = [s / n for s, n in zip(p["sum_logprobs"], chars)]
        assert p["norm_scores"] == pytest.approx(expected, abs=1e-5)
        assert p["pred_norm"] == max(range(4), key=lambda j: expected[j])


def test_bfloat16_autocast_scores_close_to_float32():
    model = tiny_gpt()
    examples = varied_examples(8)
    fp32 = evaluate(model, examples, return_predictions=True)["predictions"]
    bf16 = evaluate(model, examples, dtype="bfloat16", return_predictions=True)["predictions"]
    diff = (torch.tensor([p["sum_logprobs"] for p in fp32])
            - torch.tensor([p["sum_logprobs"] for p in bf16]))
    assert 0 < diff.abs().max() < 1.0  # bf16 really ran, and stayed close


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_restores_train_mode(training):
    model = tiny_gpt().train(training)
    evaluate(model, varied_examples(3))
    assert model.training == training and all(m.training == training for m in model.modules())


def test_long_contexts_are_cut_from_the_left():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY, "block_size": 16})).eval()
    example = {"index": 0, "ctx": "word " * 40 + "end",
               "endings": ["one.", "two.", "three.", "four."], "label": 0}
    context, endings = encode_example(example, gpt2_encoding().encode_ordinary)
    kept = context[-(16 - max(map(len, endings))):]
    result = evaluate(model, [example], return_predictions=True)
    expected = reference_scores(model, [(kept, endings)])[0]
    assert result["predictions"][0]["sum_logprobs"] == pytest.approx(expected.tolist(), abs=1e-4)


# --------------------------------------------------------------------------------------------------
# any transformers causal LM

@pytest.fixture(scope="module")
def tiny_hf_gpt2(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=256, n_embd=64, n_layer=2, n_head=2)
    path = tmp_path_factory.mktemp("hf_gpt2")
    GPT2LMHeadModel(config).save_pretrained(path)
    return str(path)


class AllLogits(torch.nn.Module):
    """A causal LM whose forward has no logits_to_keep: the LM head runs at every position."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, input_ids, attention_mask, use_cache):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


@pytest.mark.parametrize("logits_to_keep", [True, False])
def test_transformers_path_equals_fast_path_on_the_same_gpt2(tiny_hf_gpt2, logits_to_keep):
    from transformers import GPT2LMHeadModel

    from tokenizer import gpt2_hf_tokenizer

    examples = load_examples(data_file=FIXTURE)
    ours = evaluate(GPT.from_pretrained(tiny_hf_gpt2), examples, return_predictions=True)
    hf = GPT2LMHeadModel.from_pretrained(tiny_hf_gpt2).eval()
    hf = hf if logits_to_keep else AllLogits(hf)
    theirs = evaluate(hf, examples, tokenizer=gpt2_hf_tokenizer(), batch_size=2,
                      return_predictions=True)
    for a, b in zip(ours["predictions"], theirs["predictions"]):
        assert a["sum_logprobs"] == pytest.approx(b["sum_logprobs"], abs=1e-4)
        assert (a["pred"], a["pred_norm"]) == (b["pred"], b["pred_norm"])


def test_transformers_llama_with_bos_scores_like_a_hand_computation(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tokenizer import gpt2_hf_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50257, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=EOT_TOKEN,
                         eos_token_id=EOT_TOKEN)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    gpt2_hf_tokenizer().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    # a tokenizer that adds a BOS
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, add_bos_token=True)
    example = load_examples(data_file=FIXTURE)[1]
    result = evaluate(model, [example], tokenizer=tokenizer, style="lm-eval",
                      return_predictions=True)
    context, continuations = example_texts(example, "lm-eval")
    n_context = len(tokenizer(context)["input_ids"])
    assert tokenizer(context)["input_ids"][0] == EOT_TOKEN
    with torch.no_grad():
        for continuation, score in zip(continuations, result["predictions"][0]["sum_logprobs"]):
            ids = torch.tensor([tokenizer(context + continuation)["input_ids"]])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            expected = logp[torch.arange(n_context - 1, ids.size(1) - 1),
                            ids[0, n_context:]].sum().item()
            assert score == pytest.approx(expected, abs=1e-4)


def test_a_transformers_model_needs_its_tokenizer(tiny_hf_gpt2):
    from transformers import GPT2LMHeadModel

    with pytest.raises(ValueError, match="tokenizer"):
        evaluate(GPT2LMHeadModel.from_pretrained(tiny_hf_gpt2), varied_examples(2))


def test_importing_the_project_has_no_side_effects(tmp_path):
    """Importing every module builds no tokenizer, starts no CUDA and writes nothing."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    modules = sorted(name[:-3] for name in os.listdir(root) if name.endswith(".py"))
    assert {"hellaswag", "model", "reward", "train_ppo"} <= set(modules)
    code = (f"import torch, tokenizer, {', '.join(modules)}\n"
            "assert tokenizer.gpt2_encoding.cache_info().currsize == 0\n"
            "assert not torch.cuda.is_initialized()\n")
    env = {**os.environ, "PYTHONPATH": root, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, timeout=120)
    assert os.listdir(tmp_path) == []


def test_fit_to_length_cuts_the_context_from_the_left():
    context, endings = [1, 2, 3, 4, 5, 6], [[7, 8], [9], [10, 11, 12], [13]]
    assert hellaswag.fit_to_length(context, endings, 7) == ([3, 4, 5, 6], endings)
    assert hellaswag.fit_to_length(context, endings, 100) == (context, endings)
    with pytest.raises(UserError, match="does not fit"):
        hellaswag.fit_to_length(context, endings, 3)


def test_no_examples_on_this_rank_gives_zero_counts():
    assert evaluate(tiny_gpt(), [])["n"] == 0


def test_lm_eval_style_equals_the_harness_loglikelihoods(tiny_hf_gpt2):
    """With lm-evaluation-harness installed: its HFLM scores the same continuations to
    the same log-likelihoods."""
    pytest.importorskip("lm_eval.models.huggingface", exc_type=ImportError)
    import numpy as np
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from tokenizer import gpt2_hf_tokenizer

    gpt2_hf_tokenizer().save_pretrained(tiny_hf_gpt2)
    utils = _harness_utils()
    import datasets

    with open(FIXTURE) as f:
        docs = list(utils.process_docs(
            datasets.Dataset.from_list([json.loads(line) for line in f])))
    requests = [Instance(request_type="loglikelihood", doc=doc,
                         arguments=(doc["query"], " " + choice), idx=j)
                for doc in docs for j, choice in enumerate(doc["choices"])]
    harness = HFLM(pretrained=tiny_hf_gpt2, batch_size=4, device="cpu", dtype="float32")
    lls = np.array([ll for ll, _ in harness.loglikelihood(requests)]).reshape(-1, 4)
    chars = np.array([[len(choice) for choice in doc["choices"]] for doc in docs], dtype=float)
    ours = evaluate(GPT.from_pretrained(tiny_hf_gpt2), load_examples(data_file=FIXTURE),
                    style="lm-eval", return_predictions=True)["predictions"]
    assert np.abs(np.array([p["sum_logprobs"] for p in ours]) - lls).max() < 1e-4
    assert [p["pred"] for p in ours] == lls.argmax(1).tolist()
    assert [p["pred_norm"] for p in ours] == (lls / chars).argmax(1).tolist()
