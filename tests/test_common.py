"""common.py: atomic writes and the device check that every command runs before loading a model."""

import os

import pytest
import torch

from common import (UserError, atomic_path, atomic_write_text, autocast, resolve_device,
                    same_error_on_every_rank)


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
