"""common.py: atomic writes and the device check that every command runs before loading a model."""

import os

import pytest
import torch

from common import (UserError, atomic_directory, atomic_path, atomic_write_text, autocast,
                    progress_bar, resolve_device, run_cli, same_error_on_every_rank)


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_text(path, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(path) as tmp:
            with open(tmp, "w") as f:
                f.write("half of the new")
            raise KeyboardInterrupt
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["results.json"]  # no temp file left behind
    atomic_write_text(path, "new")
    assert path.read_text() == "new"


def test_atomic_writes_reach_the_disk_before_the_rename_publishes_them(tmp_path, monkeypatch):
    """Otherwise a power cut can leave the name holding an empty new file (data written after the
    rename), after the rotation removed the older checkpoints."""
    events, fsync, replace = [], os.fsync, os.replace

    def logged_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def logged_replace(src, dst):
        events.append(("replace", os.fspath(src)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(os, "replace", logged_replace)
    atomic_write_text(tmp_path / "ckpt.json", "new")
    (_, tmp), *rest = events
    assert rest == [("replace", tmp), ("fsync", str(tmp_path))]
    events.clear()
    with atomic_directory(tmp_path / "hf") as folder:
        os.mkdir(os.path.join(folder, "sub"))
        for name in ("config.json", "sub/model.safetensors"):
            with open(os.path.join(folder, name), "w") as f:
                f.write("x")
    synced = [path for kind, path in events[:-2] if kind == "fsync"]
    assert sorted(os.path.relpath(p, folder) for p in synced) == [
        ".", "config.json", "sub", "sub/model.safetensors"]
    assert events[-2:] == [("replace", folder), ("fsync", str(tmp_path))]
    assert (tmp_path / "hf" / "sub" / "model.safetensors").read_text() == "x"


def test_resolve_device_accepts_what_the_machine_has():
    assert resolve_device("cpu") == "cpu"
    expected = ("cuda" if torch.cuda.is_available()
                else "mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device("auto") == expected


@pytest.mark.parametrize("device, message", [
    ("cuda", "CUDA is not available"),
    ("cuda:0", "CUDA is not available"),
    ("mps", "MPS is not available"),
    ("gpu", "not a device name"),
    ("xla", "runs on cpu, cuda or mps"),
])
def test_resolve_device_refuses_what_the_machine_lacks(monkeypatch, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UserError, match=message):
        resolve_device(device)


def test_resolve_device_refuses_a_gpu_index_past_the_last(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(UserError, match="has 2 CUDA device"):
        resolve_device("cuda:2")


def test_autocast_float32_is_a_no_op_and_bfloat16_casts():
    a = torch.randn(4, 4)
    with autocast("cpu", "float32"):
        assert (a @ a).dtype == torch.float32
    with autocast("cpu", "bfloat16"):
        assert (a @ a).dtype == torch.bfloat16


def test_same_error_on_every_rank_without_torch_distributed_raises_the_error_itself():
    error = UserError("example 3: too long")
    with pytest.raises(UserError) as raised:
        with same_error_on_every_rank():
            raise error
    assert raised.value is error
    with same_error_on_every_rank():
        done = True
    assert done


# --------------------------------------------------------------------------------------------------
# third-party packages stay quiet and off the hub

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# in a fresh interpreter: import one of the project's modules, then use transformers as a run does
# (a GPT-Neo and a GPT-2 class imported, a GPT-2 directory loaded and saved); report every import
# of the `kernels` package (which asks the hub for kernels) and what transformers printed
HUB_KERNELS_PROBE = """
import os, sys, tempfile
imported = []
sys.addaudithook(lambda event, args: imported.append(args[0])
                 if event == "import" and args[0].split(".")[0] == "kernels" else None)
import {module}
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoForCausalLM
from weights import transformers_quietly
directory = tempfile.mkdtemp()
config = GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64)
GPT2LMHeadModel(config).save_pretrained(directory)
model = GPT2LMHeadModel.from_pretrained(directory)
print("quietly:", file=sys.stderr, flush=True)
with transformers_quietly():
    GPT2LMHeadModel.from_pretrained(directory).save_pretrained(directory + "/again")
print(sorted(set(imported)), getattr(model, "use_kernels", False))
"""


def run_probe(module, env):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-c", HUB_KERNELS_PROBE.format(module=module)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("module", ["train_ppo", "hellaswag", "reward", "analyze", "synthetic",
                                    "causal_lm", "model", "weights", "common"])
def test_no_entry_point_asks_the_hub_for_kernels(module):
    """Recent transformers releases fetch hub kernels when a model class is imported and when a
    model is loaded, and print three lines about it offline; whichever module a user starts from,
    the `kernels` package is never imported and transformers loads the model as it is."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("USE_HUB_KERNELS", "HF_HUB_DISABLE_PROGRESS_BARS")}
    proc = run_probe(module, env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[] False"
    # transformers prints nothing about kernels, and its progress bars only outside
    # transformers_quietly (which loads and saves the project's models)
    assert "kernels" not in proc.stderr.lower()
    unasked, quietly = proc.stderr.split("quietly:\n")
    assert "Loading weights" in unasked and "Writing model shards" in unasked
    assert quietly == ""


def test_hub_kernels_stay_available_to_a_user_who_asks_for_them():
    import importlib.metadata
    try:
        importlib.metadata.version("kernels")  # installed with recent transformers releases
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the kernels package is not installed")
    proc = run_probe("train_ppo", dict(os.environ, USE_HUB_KERNELS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("['kernels'")  # the probe above would see the import


# --------------------------------------------------------------------------------------------------
# progress bars


def count_to_three(**kwargs):
    with progress_bar(total=3, desc="counting", unit=" step", **kwargs) as bar:
        for _ in range(3):
            bar.update(1)


def test_a_progress_bar_is_drawn_on_a_terminal_with_its_rate_and_time_left(terminal_stderr):
    count_to_three()
    drawn = terminal_stderr.readouterr().err
    assert "counting:   0%" in drawn and "0/3 [00:00<?, ? step/s]" in drawn
    assert drawn.endswith("\r") and not drawn.split("\r")[-2].strip()  # cleared at the end


@pytest.mark.parametrize("off", ["flag", "NO_PROGRESS", "rank"])
def test_a_progress_bar_is_off_when_asked_and_on_ranks_but_0(terminal_stderr, monkeypatch, off):
    if off == "NO_PROGRESS":
        monkeypatch.setenv("NO_PROGRESS", "1")
    if off == "rank":  # as torchrun sets it, before the process group starts
        monkeypatch.setenv("RANK", "1")
    count_to_three(enabled=off != "flag")
    assert terminal_stderr.readouterr().err == ""
    monkeypatch.setenv("NO_PROGRESS", "0")
    monkeypatch.setenv("RANK", "0")
    count_to_three()
    assert "counting" in terminal_stderr.readouterr().err


def test_a_progress_bar_is_off_when_stderr_is_not_a_terminal(capsys):
    count_to_three()
    assert capsys.readouterr() == ("", "")


def test_an_error_line_never_follows_a_half_drawn_bar(terminal_stderr):
    def main(argv):
        with progress_bar(total=3, desc="counting") as bar:
            bar.update(1)
            raise UserError("the second step went wrong")

    with pytest.raises(SystemExit):
        run_cli(main)
    *drawn, cleared, error = terminal_stderr.readouterr().err.split("\r")
    assert "counting" in drawn[-1] and not cleared.strip()
    assert error == "error: the second step went wrong\n"
