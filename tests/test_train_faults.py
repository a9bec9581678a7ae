"""
Faults of a training run, one test per kind (the loaders' and CLIs' faults are in test_faults.py): a used or
unwritable out_dir, a damaged run to resume, paths that must work from another directory, a multi-node run, a rank
that dies. Tiny models on the synthetic task, CPU, gloo.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

import train_ppo
from common import UserError
from test_train_ppo import REPO, read_metrics, tiny_run


def label_run(out_dir, synthetic_dir, **overrides):
    settings = dict(reward_kind="label", eval_limit=8, checkpoint_interval=1, max_steps=2)
    return tiny_run(out_dir, synthetic_dir, **{**settings, **overrides})


def test_a_fresh_run_refuses_an_out_dir_holding_another_run(tmp_path, synthetic_dir, monkeypatch):
    train_ppo.train(label_run(tmp_path, synthetic_dir, max_steps=3, keep_last=1))
    before = {name: (tmp_path / name).read_bytes() for name in ("ckpt_000003.pt", "best.pt", "metrics.jsonl",
                                                                 "train_config.json")}
    loads = []
    monkeypatch.setattr(train_ppo, "load_data", lambda *a: loads.append(1))
    with pytest.raises(UserError, match=r"holds another run .*--init_from=resume.*--start_over=True"):
        train_ppo.train(label_run(tmp_path, synthetic_dir, seed=5))
    assert not loads  # refused before any data or model work
    assert {name: (tmp_path / name).read_bytes() for name in before} == before  # nothing touched
    monkeypatch.undo()
    # start_over moves the old run aside; the new run's rotation then sees only its own checkpoints
    train_ppo.train(label_run(tmp_path, synthetic_dir, seed=5, start_over=True, keep_last=1))
    (previous,) = (tmp_path / "previous").iterdir()
    assert {name: (previous / name).read_bytes() for name in before} == before
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("ckpt_")) == ["ckpt_000002.pt"]
    assert [m["step"] for m in read_metrics(tmp_path)] == [0, 1, 2]
    assert json.loads((tmp_path / "train_config.json").read_text())["seed"] == 5


@pytest.mark.parametrize("kind", ["a file", "under a file"])
def test_an_unusable_out_dir_is_one_line_before_any_work(tmp_path, synthetic_dir, kind):
    (tmp_path / "f").write_text("x")
    out_dir = tmp_path / "f" if kind == "a file" else tmp_path / "f" / "run"
    with pytest.raises(UserError, match="an existing file, not a directory|is a file, so nothing can be written"):
        train_ppo.train(label_run(out_dir, synthetic_dir))


def test_resume_falls_back_from_a_damaged_checkpoint_and_torn_logs(tmp_path, synthetic_dir, capsys):
    straight = train_ppo.train(label_run(tmp_path / "straight", synthetic_dir, max_steps=4))["model"]
    run = tmp_path / "run"
    train_ppo.train(label_run(run, synthetic_dir, max_steps=3, keep_last=2))
    # killed while writing: the newest checkpoint cut short, a torn last log line, a leftover temporary file
    newest = run / "ckpt_000003.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "rew')
    (run / ".ckpt_000004.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    capsys.readouterr()
    resumed = train_ppo.train(label_run(run, synthetic_dir, max_steps=4, init_from="resume"))["model"]
    out = capsys.readouterr().out
    assert f"warning: {newest}: cannot resume from it" in out and "resumed from" in out and "ckpt_000002.pt" in out
    assert "line 5: not a JSON line" in out
    assert not (run / ".ckpt_000004.pt.abc123.tmp").exists()
    assert [m["step"] for m in read_metrics(run)] == [0, 1, 2, 3, 4]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_without_a_checkpoint_fails_before_any_work(tmp_path, synthetic_dir, monkeypatch):
    (tmp_path / "train_config.json").write_text("the previous run's config\n")
    monkeypatch.setattr(train_ppo, "load_data", lambda *a: pytest.fail("data loaded before the check"))
    with pytest.raises(UserError, match="no checkpoint"):
        train_ppo.train(label_run(tmp_path, synthetic_dir, init_from="resume"))
    (tmp_path / "ckpt_000001.pt").write_bytes(b"")  # empty: a kill before the first byte
    with pytest.raises(UserError, match="none of the 1 checkpoint"):
        train_ppo.train(label_run(tmp_path, synthetic_dir, init_from="resume"))
    assert (tmp_path / "train_config.json").read_text() == "the previous run's config\n"


def test_a_run_resumes_from_another_working_directory(tmp_path, synthetic_dir, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    os.symlink(synthetic_dir, first / "task")
    monkeypatch.chdir(first)  # every path relative to a/
    train_ppo.train(label_run("run", "task", max_steps=1))
    ckpt = torch.load(first / "run" / "ckpt_000001.pt", weights_only=True)
    assert os.path.isabs(ckpt["reference_from"]) and os.path.isabs(ckpt["config"]["synthetic_dir"])
    monkeypatch.chdir(second)  # a/ is not there any more as "."; the checkpoint's paths still work
    result = train_ppo.train(label_run(first / "run", ckpt["config"]["synthetic_dir"], max_steps=2,
                                       init_from="resume"))
    assert result["step"] == 2


def test_weights_that_turn_non_finite_stop_the_run_before_the_next_checkpoint(tmp_path, synthetic_dir, monkeypatch):
    real = train_ppo.ppo_update
    calls = []

    def diverging(model, raw_model, *args, **kwargs):  # finite gradients, then a weight blows up at step 2
        out = real(model, raw_model, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                raw_model.transformer.wte.weight[0, 0] = float("inf")
        return out

    monkeypatch.setattr(train_ppo, "ppo_update", diverging)
    with pytest.raises(UserError, match=r"step 2: the policy .*non-finite weights \(NaN or inf\) in transformer.wte.weight"):
        train_ppo.train(label_run(tmp_path, synthetic_dir, max_steps=4))
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("ckpt_")) == ["ckpt_000001.pt"]


# ----------------------------------------------------------------------------------------------------------------
# beyond one process


RUN_SCRIPT = (
    "import json, os, sys, torch\n"
    f"sys.path.insert(0, {REPO!r})\n"
    "import train_ppo\n"
    "cfg = train_ppo.load_config(sys.argv[1:])\n"
    "rank = int(os.environ['RANK'])\n"
    "if os.environ.get('DIE_AT_STEP') and rank == 1:  # a rank that dies mid-run\n"
    "    real, calls = train_ppo.ppo_update, []\n"
    "    def dying(*args, **kwargs):\n"
    "        calls.append(1)\n"
    "        if len(calls) == int(os.environ['DIE_AT_STEP']):\n"
    "            os._exit(17)\n"
    "        return real(*args, **kwargs)\n"
    "    train_ppo.ppo_update = dying\n"
    "summary = train_ppo.train(cfg)\n"
    "torch.save(summary['model'].state_dict(), os.path.join(os.environ['WEIGHTS_DIR'], f'rank{rank}.pt'))\n")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_args(cfg, out_dir):
    return [f"--{k}={v}" for k, v in vars(cfg).items() if k != "out_dir"] + [f"--out_dir={out_dir}"]


@pytest.mark.slow
def test_two_nodes_simulated_on_one_machine_train_the_same_weights(tmp_path, synthetic_dir):
    """Two torchrun launchers (--nnodes=2, c10d rendezvous, gloo), one process each, each node with its own
    out_dir as if they shared no filesystem: both ranks end with the same weights; only global rank 0 writes
    checkpoints, metrics and the export; each node keeps its own teacher cache."""
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)
    cfg = tiny_run(tmp_path, synthetic_dir, reward_kind="teacher", max_steps=2, eval_limit=8, batch_size=8,
                   minibatch_size=4, micro_batch_size=2, export_hf=True)
    port = free_port()
    procs = []
    for node in (0, 1):
        out_dir = tmp_path / f"node{node}"
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
                   "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                   "--rdzv-id=two-nodes", str(script), *launcher_args(cfg, out_dir)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WEIGHTS_DIR": str(tmp_path)}
        procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    node0, node1 = set(os.listdir(tmp_path / "node0")), set(os.listdir(tmp_path / "node1"))
    assert {"ckpt_000002.pt", "metrics.jsonl", "hf", "eval"} <= node0
    assert not node1 & {"ckpt_000002.pt", "best.pt", "metrics.jsonl", "samples.jsonl", "hf", "eval"}
    assert os.listdir(tmp_path / "node1" / "teacher_cache")  # the second node scored its own examples


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_run_in_bounded_time(tmp_path, synthetic_dir):
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)
    cfg = tiny_run(tmp_path, synthetic_dir, reward_kind="label", max_steps=50, eval_limit=8, batch_size=8,
                   minibatch_size=4, micro_batch_size=2, ddp_timeout_s=30.0)
    t0 = time.time()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), *launcher_args(cfg, tmp_path / "run")], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "DIE_AT_STEP": "2",
                                                         "WEIGHTS_DIR": str(tmp_path)})
    assert result.returncode != 0 and time.time() - t0 < 240
    assert "exitcode  : 17" in result.stdout + result.stderr  # torchrun names the rank that died
    assert not (tmp_path / "rank0.pt").exists()  # the surviving rank did not carry on to the end
