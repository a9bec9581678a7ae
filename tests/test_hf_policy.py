"""
A transformers causal LM as the policy (hf_policy.HFPolicy): tiny random Llama and Gemma 3
(sliding-window) models built here, saved and loaded by path. Its choice rows score as
hellaswag.evaluate scores the same model, its samples' log-probs are those of a forward over them,
padding changes nothing, and it trains through train_ppo's real loop.
"""

import math
import os

import pytest
import torch

import hellaswag
import run_management
import synthetic
import train_ppo
from causal_lm import CausalLM, padded
from common import run_cli
from hellaswag import evaluate, load_examples
from hf_policy import HFPolicy
from test_causal_lm import build_gemma3, build_llama, build_pythia
from test_train_ppo import read_metrics, tiny_run
from tokenizer import SENTENCE_ENDS


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_llama(tmp_path_factory.mktemp("llama"), window=96)


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory):
    # a sliding window shorter than the rows, so that the window is exercised
    return build_gemma3(tmp_path_factory.mktemp("gemma3"), window=96, sliding_window=8)


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "val.jsonl"
    synthetic.write_jsonl(path, synthetic.make_examples(6, seed=3, split="val"))
    return load_examples(data_file=str(path))


@pytest.fixture(params=["llama", "gemma3"])
def source(request):
    return request.getfixturevalue(f"{request.param}_dir")


@pytest.mark.parametrize("style", ["completion", "lm-eval"])
def test_choice_sums_are_the_evaluators(source, examples, style):
    policy = HFPolicy.load(source)
    encoded = policy.encode_choices(examples, style)
    with torch.no_grad():
        sums, values = policy(**policy.choice_inputs(encoded))
    result = evaluate(CausalLM.load(source), examples, style=style, return_predictions=True)
    expected = torch.tensor([p["sum_logprobs"] for p in result["predictions"]])
    torch.testing.assert_close(sums, expected, atol=2e-5, rtol=0)
    assert sums.dtype == torch.float32 and values.shape == (len(examples),)
    # and the policy itself is evaluated as its causal LM is
    assert evaluate(policy, examples, style=style)["acc_norm"] == result["acc_norm"]
    # the choice policy: the softmax of the evaluator's acc_norm scores (per token in the
    # completion style, per character in lm-eval's), or of the per-token means if asked
    norm = torch.tensor([p["norm_scores"] for p in result["predictions"]])
    per_token = expected / torch.tensor([[n for _, n in entry] for entry in encoded])
    assert (style == "completion") == torch.allclose(norm, per_token)
    for choice_norm, scores in (("style", norm), ("token", per_token)):
        cfg = train_ppo.Config(style=style, choice_norm=choice_norm)
        normalisers = train_ppo.choice_normalisers(examples, cfg)
        if normalisers is None:  # the endings' tokens
            normalisers = policy.choice_lengths(encoded)[0]
        with torch.no_grad():
            logprobs, _ = train_ppo.choice_forward(policy, encoded, normalisers, 0.5, "cpu",
                                                   policy)
        torch.testing.assert_close(logprobs, torch.log_softmax(scores / 0.5, -1), atol=1e-4,
                                   rtol=0)


@pytest.mark.parametrize("choice_norm", ["style", "token"])
def test_choice_rollouts_sample_from_the_policy_the_settings_name(llama_dir, examples,
                                                                  choice_norm):
    """build_rollouts hands the choice rollouts the lm-eval style's acc_norm normaliser (the
    endings' characters), or the endings' tokens with choice_norm "token"."""
    policy = HFPolicy.load(llama_dir)
    cfg = train_ppo.Config(style="lm-eval", choice_norm=choice_norm, choice_temperature=0.5)
    kind = train_ppo.build_rollouts(cfg, policy, examples, lambda i, c: torch.zeros(len(i)),
                                    "cpu")
    with torch.no_grad():
        rollouts = kind.collect(policy, policy, examples, list(range(len(examples))),
                                torch.Generator().manual_seed(0), run_management.PhaseTimer("cpu"))
    predictions = evaluate(policy, examples, style="lm-eval", return_predictions=True)[
        "predictions"]
    sums = torch.tensor([p["sum_logprobs"] for p in predictions])
    scores = (torch.tensor([p["norm_scores"] for p in predictions]) if choice_norm == "style"
              else sums / policy.choice_lengths(kind.encoded)[0])
    torch.testing.assert_close(rollouts.choice_logprobs, torch.log_softmax(scores / 0.5, -1),
                               atol=1e-4, rtol=0)


def test_the_choice_forward_has_gradients_and_a_zero_value_head(llama_dir, examples):
    policy = HFPolicy.load(llama_dir).requires_grad_(True)
    assert not policy.value_head.weight.any() and not policy.value_head.bias.any()
    encoded = policy.encode_choices(examples[:2], "completion")
    sums, values = policy(**policy.choice_inputs(encoded))
    assert not values.any()
    (sums.sum() + values.sum()).backward()
    assert policy.value_head.weight.grad.abs().sum() > 0
    assert policy.value_head.bias.grad.item() == 2  # one value per example
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.model.parameters())
    groups = policy.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu").param_groups
    heads = [g for g in groups if g["value_head"]]
    assert sum(len(g["params"]) for g in heads) == 2
    assert all(p is policy.value_head.weight or p is policy.value_head.bias
               for g in heads for p in g["params"])


def prompts_of(policy, texts):
    head = [policy.tokens.bos_id] if policy.tokens.bos_id is not None else []
    return padded([head + policy.tokens.encode(t) for t in texts], policy.tokens.pad_id, left=True)


def test_generates_log_probs_and_values_are_a_forward_over_the_sampled_tokens(source):
    policy = HFPolicy.load(source)
    torch.nn.init.normal_(policy.value_head.weight)  # values that differ by position
    prompts, mask = prompts_of(policy, ["A man is sitting on a roof. He starts",
                                        "The cats", "Line one\nLine two and a much longer line"])
    for top_k, temperature in ((None, 1.0), (5, 0.7)):
        tokens, tokens_mask, logprobs, values = policy.generate(
            prompts, mask, max_new_tokens=12, temperature=temperature, top_k=top_k,
            stop_tokens=policy.tokens.stop_tokens(True), generator=torch.Generator().manual_seed(1),
            with_values=True)
        again = policy.generate(prompts, mask, max_new_tokens=12, temperature=temperature,
                                top_k=top_k, stop_tokens=policy.tokens.stop_tokens(True),
                                generator=torch.Generator().manual_seed(1))
        # only the generator draws; reading the values changes nothing
        assert torch.equal(tokens, again[0]) and torch.equal(logprobs, again[2])
        with torch.no_grad():
            forward, forward_values, _ = train_ppo.sequence_forward(policy, prompts, mask, tokens,
                                                                    tokens_mask, temperature)
        torch.testing.assert_close(logprobs, forward, atol=1e-4, rtol=0)
        # each token's value in the state it was drawn in, as the update reads it
        assert values[tokens_mask == 1].abs().min() > 0
        torch.testing.assert_close(values, forward_values, atol=1e-4, rtol=0)
        stops = torch.isin(tokens, torch.tensor(policy.tokens.stop_tokens(True)))
        for row, row_mask, row_stops in zip(tokens, tokens_mask, stops):
            n = int(row_mask.sum())  # up to and including the first stop token
            assert not row_stops[:n - 1].any() and (n == tokens.size(1) or row_stops[n - 1])


def test_the_lm_head_runs_only_where_logits_are_asked_for_as_the_model_runs_it(source):
    policy = HFPolicy.load(source)
    torch.nn.init.normal_(policy.value_head.weight)
    prompts, mask = prompts_of(policy, ["A man is sitting on a roof. He starts",
                                        "The cats", "Line one\nLine two and a much longer line"])
    at = mask.bool() & (torch.rand(mask.shape, generator=torch.Generator().manual_seed(0)) < 0.5)
    if policy.model.config.model_type == "gemma3_text":
        # a head that does more than a matmul: Gemma's soft-capping, whose cap these logits pass
        with torch.no_grad():
            assert policy(prompts, mask)[0].abs().max() > 2.0
        policy.model.config.final_logit_softcapping = 2.0
    head_rows = []
    policy.model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: head_rows.append(args[0].shape[:-1].numel()))
    with torch.no_grad():
        full, values = policy(prompts, mask)
        picked, picked_values = policy(prompts, mask, logits_at=at)
    assert head_rows == [mask.numel(), int(at.sum())]
    assert picked.shape == (int(at.sum()), full.size(-1))
    torch.testing.assert_close(picked, full[at], atol=1e-5, rtol=0)
    assert torch.equal(picked_values, values)
    if policy.model.config.model_type == "gemma3_text":
        assert full.abs().max() <= 2.0


def test_left_padding_does_not_change_a_rows_log_probs(source):
    policy = HFPolicy.load(source)
    alone, alone_mask = prompts_of(policy, ["The cats are here."])
    batch, batch_mask = prompts_of(policy, ["The cats are here.",
                                            "A much longer row of text that pads the other one."])
    with torch.no_grad():
        logits_alone, values_alone = policy(alone, alone_mask)
        logits, values = policy(batch, batch_mask)
    n = alone.size(1)
    torch.testing.assert_close(logits[0, -n:], logits_alone[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(values[0, -n:], values_alone[0])


@pytest.mark.parametrize("kind", ["llama", "gemma3", "pythia"])  # pythia's: byte-level BPE
def test_the_tokens_are_the_tokenizers(kind, request, tmp_path):
    source = (build_pythia(tmp_path) if kind == "pythia"
              else request.getfixturevalue(f"{kind}_dir"))
    tokens = HFPolicy.load(source).tokens
    text = "The quick brown fox jumps over the lazy dog, doesn't it? Yes!"
    ids = tokens.encode(text)
    assert tokens.decode(ids) == text and tokens.bos_id not in ids
    # the bytes of the tokens of a text inside a sentence are its bytes
    middle = tokens.encode("Wait. " + text)
    assert b"".join(tokens.token_bytes(t) for t in middle).endswith(text.encode())
    stops = tokens.stop_tokens(True)
    assert tokens.eos_id in stops and tokens.stop_tokens(False) == [tokens.eos_id]
    assert all(t == tokens.eos_id or tokens.token_bytes(t).decode() in SENTENCE_ENDS
               for t in stops)
    assert tokens.encode("Yes.")[-1] in stops


# --------------------------------------------------------------------------------------------------
# through train_ppo's loop: init_from a transformers directory


def llama_run(out_dir, synthetic_dir, llama_dir, **overrides):
    settings = dict(init_from=llama_dir, reward_kind="label", batch_size=8, minibatch_size=4,
                    micro_batch_size=4, ppo_epochs=1, eval_limit=8)
    return tiny_run(out_dir, synthetic_dir, **{**settings, **overrides})


ROLLOUT_ESTIMATORS = [(kind, name) for name, estimator in train_ppo.ADV_ESTIMATORS.items()
                      for kind in estimator.rollouts]


@pytest.mark.parametrize("rollout, adv_estimator", ROLLOUT_ESTIMATORS)
def test_a_transformers_policy_trains_through_the_loop(tmp_path, synthetic_dir, llama_dir,
                                                       rollout, adv_estimator):
    # generate: judged by the demo's teacher, of GPT-2's vocabulary (another tokenizer)
    generate = dict(reward_kind="likelihood", max_new_tokens=6,
                    group_size=2 if train_ppo.ADV_ESTIMATORS[adv_estimator].grouped else 1)
    cfg = llama_run(tmp_path, synthetic_dir, llama_dir, rollout=rollout,
                    adv_estimator=adv_estimator, **(generate if rollout == "generate" else {}))
    summary = train_ppo.train(cfg)
    policy = summary["model"]
    assert isinstance(policy, HFPolicy) and summary["step"] == 2
    start = HFPolicy.load(llama_dir)
    assert any(not torch.equal(a, b) for a, b in zip(policy.model.parameters(),
                                                     start.model.parameters()))
    metrics = read_metrics(tmp_path)
    assert all(math.isfinite(m["pg_loss"]) for m in metrics if "pg_loss" in m)
    val = load_examples(data_file=os.path.join(synthetic_dir, "val.jsonl"))[:8]
    assert metrics[-1]["eval/acc_norm"] == evaluate(policy, val)["acc_norm"]


@pytest.mark.parametrize("rollout, kl_estimator", [
    (kind, name) for name, estimator in train_ppo.KL_ESTIMATORS.items()
    for kind in estimator.rollouts if name != "sampled"])  # sampled: the test above
def test_every_kl_estimator_trains_a_transformers_policy(tmp_path, synthetic_dir, llama_dir,
                                                         rollout, kl_estimator):
    generate = dict(reward_kind="likelihood", max_new_tokens=6)
    cfg = llama_run(tmp_path, synthetic_dir, llama_dir, rollout=rollout,
                    kl_estimator=kl_estimator, kl_coef=0.5,
                    **(generate if rollout == "generate" else {}))
    train_ppo.train(cfg)
    first, second = [m for m in read_metrics(tmp_path) if "pg_loss" in m]
    # the first step's rollouts come from the reference itself; the second's from the policy its
    # update moved: both estimators are >= 0, and 0 only where the two agree
    assert abs(first["kl"]) < 1e-6 < second["kl"] and math.isfinite(second["pg_loss"])


def test_a_transformers_policy_trains_on_its_sampling_loops_log_probs(tmp_path, synthetic_dir,
                                                                     llama_dir):
    cfg = llama_run(tmp_path, synthetic_dir, llama_dir, rollout="generate",
                    reward_kind="likelihood", max_new_tokens=6, rollout_forward=False)
    train_ppo.train(cfg)
    first, second = [m for m in read_metrics(tmp_path) if "pg_loss" in m]
    # the first rollouts are the reference's own: its forward and the sampling loop agree
    assert abs(first["kl"]) < 1e-5 and abs(second["kl"]) > 1e-4
    assert math.isfinite(second["pg_loss"])


def test_a_transformers_policy_resumes_exactly_and_its_run_is_a_source(tmp_path, synthetic_dir,
                                                                       llama_dir, capsys):
    common = dict(eval_interval=2, checkpoint_interval=2)
    straight = train_ppo.train(llama_run(tmp_path / "straight", synthetic_dir, llama_dir,
                                         max_steps=3, **common))["model"]
    train_ppo.train(llama_run(tmp_path / "split", synthetic_dir, llama_dir, max_steps=2, **common))
    resumed = train_ppo.train(llama_run(tmp_path / "split", synthetic_dir, llama_dir, max_steps=3,
                                        init_from="resume", **common))["model"]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # the checkpoint rebuilds it: its source's tokenizer, its config, its weights
    ckpt = torch.load(tmp_path / "split" / "ckpt_000003.pt", weights_only=True)
    assert ckpt["model_config"]["source"] == llama_dir
    rebuilt = train_ppo.policy_from_checkpoint(ckpt["model_config"], ckpt["model"], "ckpt")
    for (name, a), b in zip(resumed.state_dict().items(), rebuilt.state_dict().values()):
        assert torch.equal(a, b), name
    # hellaswag.py --model RUN_DIR scores as the run's last evaluation did
    capsys.readouterr()
    hellaswag.main(["--model", str(tmp_path / "split"), "--data",
                    os.path.join(synthetic_dir, "val.jsonl"), "--limit", "8", "--no-progress"])
    acc_norm = float(capsys.readouterr().out.split("acc_norm")[1].split()[0])
    assert acc_norm == pytest.approx(read_metrics(tmp_path / "split")[-1]["eval/acc_norm"])
    # and the run is a source to start from: the policy with its value head, the reference too
    policy, reference, _ = train_ppo.load_models(
        llama_run(tmp_path / "next", synthetic_dir, llama_dir), str(tmp_path / "split"), None,
        None, "cpu")
    for (name, a), b in zip(resumed.state_dict().items(), policy.state_dict().values()):
        assert torch.equal(a, b), name
    assert isinstance(reference, HFPolicy) and not reference.value_head.weight.requires_grad


def test_the_export_reloads_in_transformers_with_the_same_logits(tmp_path, synthetic_dir,
                                                                  llama_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy = train_ppo.train(llama_run(tmp_path, synthetic_dir, llama_dir, max_steps=1,
                                       export_hf=True))["model"]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([policy.tokens.encode("A man is sitting on a roof. He starts")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, policy.model(ids).logits, atol=1e-5, rtol=0)
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").get_vocab() == policy.tokens.vocab()
    head = load_file(tmp_path / "hf" / "value_head.safetensors")
    assert torch.equal(head["weight"], policy.value_head.weight)
    # and an export is a source as any transformers directory is, its value head kept
    with torch.no_grad():
        policy.value_head.weight.normal_()
    policy.save_pretrained(tmp_path / "again")
    again = train_ppo.build_policy(str(tmp_path / "again"), None)
    assert isinstance(again, HFPolicy)
    for (name, a), b in zip(policy.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def bad_input(argv, main, capsys):
    with pytest.raises(SystemExit) as stopped:
        run_cli(main, argv)
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


def test_bad_sources_are_one_line_errors_before_any_work(tmp_path, synthetic_dir, llama_dir,
                                                         capsys):
    def run(out, **overrides):
        settings = dict(out_dir=str(tmp_path / out), synthetic=True,
                        synthetic_dir=synthetic_dir, device="cpu", reward_kind="label",
                        batch_size=8, minibatch_size=4, micro_batch_size=4, max_steps=1,
                        eval_interval=0, checkpoint_interval=1, export_hf=False)
        return [f"--{k}={v}" for k, v in {**settings, **overrides}.items()]

    # not a causal LM
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    err = bad_input(run("a", init_from=str(tmp_path / "bert")), train_ppo.main, capsys)
    assert str(tmp_path / "bert") in err
    assert not os.path.exists(tmp_path / "a" / "metrics.jsonl")
    # no tokenizer
    import shutil
    shutil.copytree(llama_dir, tmp_path / "bare")
    for name in os.listdir(tmp_path / "bare"):
        if "token" in name:
            os.remove(tmp_path / "bare" / name)
    assert "tokenizer" in bad_input(run("b", init_from=str(tmp_path / "bare")), train_ppo.main,
                                    capsys)
    # a checkpoint whose source cannot be rebuilt
    train_ppo.main(run("c", init_from=llama_dir))
    ckpt = torch.load(tmp_path / "c" / "ckpt_000001.pt", weights_only=True)
    ckpt["model_config"]["source"] = str(tmp_path / "gone")
    torch.save(ckpt, tmp_path / "moved.pt")
    err = bad_input(["--model", str(tmp_path / "moved.pt"), "--data",
                     os.path.join(synthetic_dir, "val.jsonl")], hellaswag.main, capsys)
    assert "moved.pt" in err and "gone" in err
    # a policy and a reference that disagree: a resumed transformers policy, a GPT reference
    ckpt = torch.load(tmp_path / "c" / "ckpt_000001.pt", weights_only=True)
    ckpt["reference_from"] = os.path.join(synthetic_dir, "policy")
    ckpt["reference_fingerprint"] = None
    torch.save(ckpt, tmp_path / "c" / "ckpt_000001.pt")
    err = bad_input(run("c", init_from="resume", max_steps=2), train_ppo.main, capsys)
    assert "reference" in err


@pytest.mark.slow
def test_one_step_of_the_smollm2_config_with_the_real_gguf(tmp_path):
    from test_gguf import smollm2_path

    path = smollm2_path()
    if not os.path.isfile(path):
        pytest.skip(f"{path} is not there")
    data = os.path.join(os.path.dirname(__file__), "fixtures", "hellaswag_synthetic.jsonl")
    cfg = train_ppo.load_config([os.path.join(os.path.dirname(__file__), "..", "configs",
                                              "smollm2_label.py"),
                                 f"--init_from={path}", f"--out_dir={tmp_path}",
                                 f"--train_data={data}", f"--val_data={data}", "--batch_size=4",
                                 "--minibatch_size=4", "--ppo_epochs=1", "--max_steps=1",
                                 "--eval_limit=4", "--eval_interval=1", "--checkpoint_interval=1"])
    summary = train_ppo.train(cfg)
    assert isinstance(summary["model"], HFPolicy) and summary["step"] == 1
    step = read_metrics(tmp_path)[-1]
    assert math.isfinite(step["pg_loss"]) and 0 <= step["eval/acc_norm"] <= 1
    ckpt = torch.load(tmp_path / "ckpt_000001.pt", weights_only=True, mmap=True)
    assert ckpt["model_config"]["source"] == path


@pytest.mark.slow
@pytest.mark.parametrize("rollout", ["choice", "generate"])
def test_two_gloo_ranks_train_a_transformers_policy_to_the_same_weights(tmp_path, synthetic_dir,
                                                                        llama_dir, rollout):
    import subprocess
    import sys

    from test_train_faults import REPO, RUN_SCRIPT, launcher_args

    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)
    generate = dict(reward_kind="likelihood", max_new_tokens=6)
    cfg = llama_run(tmp_path, synthetic_dir, llama_dir, rollout=rollout,
                    **(generate if rollout == "generate" else {}))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script),
                           *launcher_args(cfg, tmp_path / "run")],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "WEIGHTS_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    start = HFPolicy.load(llama_dir).state_dict()
    assert any(not torch.equal(rank0[name], start[name]) for name in start)
    assert [m["step"] for m in read_metrics(tmp_path / "run")][-1] == 2


@pytest.mark.parametrize("judge", ["another tokenizer", "the same tokenizer"])
def test_judges_of_another_and_of_the_same_tokenizer_reward_a_transformers_policy(
        tmp_path, synthetic_dir, llama_dir, judge):
    if judge == "another tokenizer":  # the demo's teacher, of GPT-2's vocabulary, picks endings
        cfg = llama_run(tmp_path, synthetic_dir, llama_dir, reward_kind="teacher", max_steps=1)
    else:  # the policy's own model judges its samples, per token
        data = {k: os.path.join(synthetic_dir, f"{split}.jsonl")
                for k, split in (("train_data", "train"), ("val_data", "val"))}
        cfg = llama_run(tmp_path, synthetic_dir, llama_dir, synthetic=False, **data,
                        rollout="generate", reward_kind="likelihood", likelihood_dense=True,
                        reward_model=llama_dir, max_new_tokens=6, max_steps=1)
    summary = train_ppo.train(cfg)
    step = read_metrics(tmp_path)[-1]
    assert summary["step"] == 1 and math.isfinite(step["reward"])
    judge_lm = CausalLM.load(cfg.reward_model if judge != "another tokenizer"
                             else os.path.join(synthetic_dir, "teacher"))
    assert judge_lm.shares_vocab(summary["model"].tokens) == (judge == "the same tokenizer")
