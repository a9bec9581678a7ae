"""benchmarks/trl_speed.py: what can be checked without TRL (CI does not install it), and, where TRL
is installed, both sides end to end on a tiny Llama."""

import contextlib
import json
import os
import subprocess
import sys
import types

import pytest
import torch

import train_ppo
from hellaswag import load_examples
from hf_policy import HFTokens
from test_causal_lm import build_llama, train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "hellaswag_synthetic.jsonl")
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import trl_speed  # noqa: E402


def test_without_trl_the_comparison_is_one_line_naming_the_install(tmp_path):
    # trl hidden as if it were not installed (CI has none; a developer's python may)
    script = ("import runpy, sys; sys.modules['trl'] = None; sys.path.insert(0, 'benchmarks'); "
              "sys.argv = ['trl_speed.py', '--work', sys.argv[1]]; "
              "runpy.run_path('benchmarks/trl_speed.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "work")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr == ("error: TRL is not installed in this python: "
                           "pip install trl==0.29.1\n")
    assert not (tmp_path / "work").exists()  # stopped before any work


def result(step_s, response_length, batch=16):
    return {"steps": 3, "step_s": step_s, "episodes_per_s": batch / step_s,
            "response_length": response_length}


def test_compare_gives_the_speed_up_of_each_of_ours_over_trl_in_a_table():
    lines, ratios, warning = trl_speed.compare({"ours": result(2.0, 23.0),
                                                "ours_sampled": result(1.6, 24.0),
                                                "trl": result(5.0, 22.0)})
    assert ratios == {"ours": pytest.approx(2.5), "ours_sampled": pytest.approx(3.125)}
    assert lines[2] == "| ours | 3 | 2.00 | 8.00 | 23.0 |"
    assert lines[4] == "| trl | 3 | 5.00 | 3.20 | 22.0 |"
    assert lines[-2].startswith("ours / TRL: 2.50x episodes/s")
    assert lines[-1].startswith("ours_sampled / TRL: 3.12x episodes/s")
    assert warning is None


@pytest.mark.parametrize("ours_length, trl_length", [(24.0, 12.0), (10.0, 24.0)])
def test_compare_warns_when_the_sides_sampled_responses_of_different_lengths(ours_length,
                                                                               trl_length):
    _, ratios, warning = trl_speed.compare({"ours": result(4.0, ours_length),
                                            "ours_sampled": result(4.0, 20.0),
                                            "trl": result(4.0, trl_length)})
    assert ratios["ours"] == pytest.approx(1.0)
    assert warning.startswith(f"mean response lengths differ (ours {ours_length:.1f}, "
                              f"ours_sampled 20.0, trl {trl_length:.1f} tokens)")


def test_response_lengths_count_up_to_the_first_stop_or_all():
    eos = 2
    responses = torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8], [2, 9, 2, 9], [5, 6, 7, 2]])
    assert trl_speed.response_lengths(responses, eos).tolist() == [2, 4, 1, 4]


class Recorded(Exception):
    pass


class PromptsSeen:
    """A policy that records the prompts a generate rollout samples from, then stops it."""

    def generate(self, prompts, prompt_mask, **kwargs):
        self.prompts = [row[mask.bool()].tolist() for row, mask in zip(prompts, prompt_mask)]
        raise Recorded


def test_trl_gets_the_prompts_train_ppo_samples_from_cut_to_prompt_tokens():
    tokenizer = train_tokenizer("llama")  # it puts a BOS before a text: the head is kept
    tokens = HFTokens(tokenizer)
    examples = load_examples(data_file=FIXTURE)
    budget = 6
    ours = PromptsSeen()
    cfg = types.SimpleNamespace(max_new_tokens=4, temperature=1.0, top_k=0, top_p=1.0,
                                rollout_forward=True)
    rollouts = train_ppo.GenerateRollouts(None, cfg, budget, [tokens.eos_id], "cpu", tokens)
    with pytest.raises(Recorded):
        rollouts.collect(ours, None, examples, list(range(len(examples))), None,
                         lambda phase: contextlib.nullcontext())
    theirs = trl_speed.prompts(tokenizer, examples, budget)
    assert theirs == ours.prompts
    for ids, ex in zip(theirs, examples):
        context = tokens.encode(ex["ctx"])
        assert len(context) > budget  # every context was cut
        assert ids == [tokens.bos_id] + context[-(budget - 1):]


@pytest.mark.slow
def test_both_sides_run_on_a_tiny_llama(tmp_path):
    pytest.importorskip("trl")
    model = build_llama(tmp_path / "llama", window=64)
    output = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/trl_speed.py", "--model", model, "--data", FIXTURE,
         "--batch", "2", "--minibatches", "1", "--response_length", "4", "--prompt_tokens", "16",
         "--steps", "1", "--threads", "1", "--work", str(tmp_path / "work"),
         "--output", str(output)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.loads(output.read_text())
    for side in ("ours", "ours_sampled", "trl"):
        assert saved[side]["steps"] == 1
        assert saved[side]["episodes_per_s"] == pytest.approx(2 / saved[side]["step_s"])
        assert 1 <= saved[side]["response_length"] <= 4
    for side in ("ours", "ours_sampled"):
        assert saved["ratios"][side] == pytest.approx(saved[side]["episodes_per_s"]
                                                      / saved["trl"]["episodes_per_s"])
    assert "| trl | 1 |" in proc.stdout and "ours_sampled / TRL:" in proc.stdout
