"""
train_top_blocks: only the top N transformer blocks (and the final norm and value head) train, for
GPT and a transformers policy alike; their gradients are those of a full backward, everything
below stays as it was, DDP and resume agree. And the autocast dtype on a CPU: bf16 when asked.
"""

import os
import subprocess
import sys

import pytest
import torch

import hellaswag
import train_ppo
import train_sft
from common import UserError, read_jsonl
from hf_policy import HFPolicy
from model import GPT, GPTConfig
from test_hf_policy import bad_input, examples, llama_dir, llama_run  # noqa: F401 (fixtures)
from test_train_faults import REPO, RUN_SCRIPT, launcher_args
from test_train_ppo import read_metrics, tiny_run


def choice_loss(policy, examples):
    sums, values = policy(**policy.choice_inputs(policy.encode_choices(examples, "completion")))
    return sums.sum() + values.sum()


def gradients(policy, examples):
    policy.zero_grad(set_to_none=True)
    choice_loss(policy, examples).backward()
    return {name: p.grad for name, p in policy.named_parameters()}


def top_and_below(policy, blocks, n):
    """-> (names under the top n blocks, names under the blocks below them)."""
    names = [[name for name, _ in block.named_parameters()] for block in blocks]
    prefix = next(name for name, module in policy.named_modules() if module is blocks)
    under = [{f"{prefix}.{i}.{name}" for name in block_names}
             for i, block_names in enumerate(names)]
    return set().union(*under[len(blocks) - n:]), set().union(*under[:len(blocks) - n])


def gpt_policy():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=128))


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_the_top_blocks_get_a_full_backwards_gradients_and_nothing_below_does(kind, llama_dir,
                                                                              examples):
    make = gpt_policy if kind == "gpt" else lambda: HFPolicy.load(llama_dir).requires_grad_(True)
    full, policy = make(), make()
    with torch.no_grad():  # a value head that is not zero, so that its gradient reaches the blocks
        for p in (full.value_head.weight, policy.value_head.weight):
            p.copy_(torch.linspace(-1, 1, p.numel()).view_as(p))
    policy.train_top_blocks(1)
    blocks = policy.transformer.h if kind == "gpt" else policy.model.model.layers
    top, below = top_and_below(policy, blocks, 1)
    expected, got = gradients(full, examples[:2]), gradients(policy, examples[:2])
    for name in top | {"value_head.weight", "value_head.bias"}:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5)
    assert all(got[name] is None for name in below)
    embeddings = [name for name, p in policy.named_parameters()
                  if name.endswith(("wte.weight", "wpe.weight", "embed_tokens.weight"))]
    assert embeddings and all(got[name] is None for name in embeddings)
    # the optimizer holds the trainable ones only
    optimizer = policy.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in policy.parameters() if p.requires_grad}
    assert held == trainable and trainable < {id(p) for p in policy.parameters()}


@pytest.mark.parametrize("n", [0, 4])
def test_a_count_of_blocks_the_policy_lacks_is_refused(n):
    with pytest.raises(UserError, match=f"train_top_blocks={n}: the policy has 3 transformer "
                                        "blocks; give 1 to 3"):
        gpt_policy().train_top_blocks(n)


def frozen_and_moved(before, after, policy, n):
    blocks = policy.transformer.h if isinstance(policy, GPT) else policy.model.model.layers
    top, below = top_and_below(policy, blocks, n)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    return changed, top, below


@pytest.mark.parametrize("script", [train_ppo, train_sft])
def test_a_run_trains_the_top_blocks_only_and_resumes_only_with_the_same_count(
        script, tmp_path, synthetic_dir, llama_dir, capsys):
    cfg = llama_run(tmp_path, synthetic_dir, llama_dir, train_top_blocks=1,
                    checkpoint_interval=2, learning_rate=1e-2)
    policy = script.train(cfg)["model"]
    start = HFPolicy.load(llama_dir).state_dict()
    changed, top, below = frozen_and_moved(start, policy.state_dict(), policy, 1)
    assert changed & top and not changed & below
    assert not any("embed_tokens" in name for name in changed)
    assert ("value_head.weight" in changed) == (script is train_ppo)  # sft leaves it frozen
    argv = [f"--{k}={v}" for k, v in vars(cfg).items()] + ["--init_from=resume", "--max_steps=3",
                                                            "--train_top_blocks=0"]
    err = bad_input(argv, script.main, capsys)
    assert "was trained with train_top_blocks=1 and this run asks for 0" in err
    assert "--train_top_blocks=1" in err


@pytest.mark.slow
def test_two_gloo_ranks_train_the_top_blocks_to_the_same_weights(tmp_path, synthetic_dir):
    # GPT's demo policy: its blocks below the top one stay frozen on both ranks, and DDP, built
    # after the freeze, waits for no gradient they would never get
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)
    cfg = tiny_run(tmp_path, synthetic_dir, reward_kind="label", train_top_blocks=1, eval_limit=8)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script),
                           *launcher_args(cfg, tmp_path / "run")],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "WEIGHTS_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    policy = GPT.from_pretrained(os.path.join(synthetic_dir, "policy"))
    changed, top, below = frozen_and_moved(policy.state_dict(), rank0, policy, 1)
    assert changed & top and not changed & below
    assert [m["step"] for m in read_metrics(tmp_path / "run")][-1] == 2


# --------------------------------------------------------------------------------------------------
# the autocast dtype


@pytest.mark.parametrize("dtype, device, expected", [("auto", "cpu", "float32"),
                                                      ("auto", "cuda:0", "bfloat16"),
                                                      ("bfloat16", "cpu", "bfloat16"),
                                                      ("float32", "cuda:0", "float32")])
def test_the_autocast_dtype(dtype, device, expected):
    from common import autocast_dtype

    assert autocast_dtype(dtype, device) == expected


def test_float16_on_a_cpu_is_one_line_before_any_work(tmp_path, synthetic_dir, capsys):
    cfg = tiny_run(tmp_path / "run", synthetic_dir, dtype="float16")
    err = bad_input([f"--{k}={v}" for k, v in vars(cfg).items()], train_ppo.main, capsys)
    assert "dtype float16 needs a CUDA device, not cpu" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_transformers_policy_trains_under_bf16_autocast_on_a_cpu(tmp_path, synthetic_dir,
                                                                   llama_dir, examples):
    cfg = llama_run(tmp_path, synthetic_dir, llama_dir, dtype="bfloat16", style="lm-eval",
                    eval_interval=1)
    summary = train_ppo.train(cfg)
    policy = summary["model"]
    assert all(p.dtype == torch.float32 for p in policy.parameters())  # autocast, not a cast
    metrics = [m for m in read_metrics(tmp_path) if "pg_loss" in m]
    assert len(metrics) == 2 and all(m["kl"] == m["kl"] for m in metrics)
    # the choice forward under autocast: float32 log-probs, near the float32 ones
    encoded = policy.encode_choices(examples, "completion")
    with torch.no_grad():
        exact, _ = policy(**policy.choice_inputs(encoded))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sums, values = policy(**policy.choice_inputs(encoded))
    assert sums.dtype == values.dtype == torch.float32
    assert not torch.equal(sums, exact)  # it did run in bf16
    torch.testing.assert_close(sums, exact, rtol=0.05, atol=0.5)
    # hellaswag.py --model RUN_DIR scores in the run's style and autocast, as its evaluations did
    hellaswag.main(["--model", str(tmp_path), "--data", os.path.join(synthetic_dir, "val.jsonl"),
                    "--limit", "8", "--predictions", str(tmp_path / "again.jsonl"),
                    "--no-progress"])
    [last] = sorted((tmp_path / "eval").iterdir())[-1:]
    assert ([line for _, line in read_jsonl(tmp_path / "again.jsonl")]
            == [line for _, line in read_jsonl(last)])
