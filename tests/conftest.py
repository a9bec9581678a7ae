import os
import sys

import pytest

# tests never touch the network: a hub lookup would take ~a minute to fail offline
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """The demo task, small: 1000 training and 100 validation examples, a tiny teacher and starting
    policy."""
    import synthetic  # after the environment above is set

    path = tmp_path_factory.mktemp("synthetic")
    synthetic.prepare(str(path), n_train=1000, n_val=100, seed=0, teacher_steps=200)
    return str(path)



@pytest.fixture
def terminal_stderr(capsys, monkeypatch):
    """capsys, with a stderr that says it is a terminal (where the progress bars are drawn) and
    nothing that turns the bars off (NO_PROGRESS, a torchrun RANK)."""
    monkeypatch.delenv("NO_PROGRESS", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    # capsys installs a new stream of this class for the test itself (its stdout, which no
    # progress check reads, says so too)
    monkeypatch.setattr(type(sys.stderr), "isatty", lambda self: True)
    return capsys
