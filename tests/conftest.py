import os

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
