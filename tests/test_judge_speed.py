"""benchmarks/judge_speed.py end to end on a tiny Llama-style model and the test fixture (its
numbers are for docs/results.md, not for tests): the three paths must agree."""

import os
import re
import subprocess
import sys
import types

import pytest

from test_causal_lm import build_llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "hellaswag_synthetic.jsonl")


def test_judge_speed_compares_whole_rows_shared_contexts_and_the_harness(tmp_path):
    model = build_llama(tmp_path / "llama", window=256)
    proc = subprocess.run([sys.executable, "benchmarks/judge_speed.py", "--model", model,
                           "--data", FIXTURE, "--limit", "3", "--slice", "2", "--batch-size", "2"]
                          + ([] if _has_harness() else ["--methods", "rows,shared"]),
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if re.match(r"\| (whole|shared|lm-eval)",
                                                                   line)]
    assert len(lines) == (3 if _has_harness() else 2)
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[6] == "0, 0" and float(cells[7]) <= 1e-4, line  # same picks, same scores


@pytest.mark.parametrize("argument, message", [
    (["--limit", "0"], "error: --limit must be at least 1, not 0"),
    (["--threads", "0"], "error: --threads must be at least 1, not 0"),
    (["--methods", "rows,fast"], "error: --methods: unknown fast; choose from rows, shared, "
                                 "harness")])
def test_judge_speed_bad_arguments_are_one_line(tmp_path, argument, message):
    proc = subprocess.run([sys.executable, "benchmarks/judge_speed.py", "--model", "x",
                           *argument], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == message


def _has_harness():
    import importlib.util
    return importlib.util.find_spec("lm_eval") is not None


def test_the_harness_in_bfloat16_leaves_the_other_methods_model_in_float32(tmp_path,
                                                                          monkeypatch):
    """--dtype bfloat16: the harness gets a bf16 model, and the model the other methods run under
    autocast stays float32 (converting it in place made them measure bf16 weights)."""
    import torch

    monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
    import judge_speed
    from causal_lm import CausalLM

    given = []
    huggingface = types.ModuleType("lm_eval.models.huggingface")  # lm-eval's HFLM, recorded
    huggingface.HFLM = lambda pretrained, **kwargs: given.append(pretrained)
    instance = types.ModuleType("lm_eval.api.instance")
    instance.Instance = None
    for name, module in (("lm_eval", types.ModuleType("lm_eval")),
                         ("lm_eval.api", types.ModuleType("lm_eval.api")),
                         ("lm_eval.api.instance", instance),
                         ("lm_eval.models", types.ModuleType("lm_eval.models")),
                         ("lm_eval.models.huggingface", huggingface)):
        monkeypatch.setitem(sys.modules, name, module)
    lm = CausalLM.load(build_llama(tmp_path / "llama"))
    judge_speed.harness(lm, 2, "bfloat16")
    assert {p.dtype for p in given[0].parameters()} == {torch.bfloat16}
    assert {p.dtype for p in lm.model.parameters()} == {torch.float32}
