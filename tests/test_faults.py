"""
Faults a user meets, one test per kind: each ends in one line that names the file and what is wrong
(exit 2 from the CLIs), is refused before any work, or leaves what was there before intact. Tiny
models (2 layers, 64 dims) built here, saved in tmp dirs; no network.
"""

import dataclasses
import errno
import json
import os
import re
import shutil
import sys

import pytest
import torch

import common
import hellaswag
import reward
from common import UserError, atomic_torch_save, atomic_write_text, run_cli
from model import GPT, GPTConfig
from weights import CHECKPOINT_FORMAT

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hellaswag_synthetic.jsonl")
TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=256)


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**TINY)).eval()


def save_checkpoint(path, policy=None, **changes):
    """This project's checkpoint layout (as train_ppo.py writes it), with `changes`
    applied on top (None drops)."""
    policy = policy or tiny_gpt()
    ckpt = {"format": CHECKPOINT_FORMAT, "model_config": dataclasses.asdict(policy.config),
            "model": policy.state_dict()}
    ckpt.update(changes)
    torch.save({k: v for k, v in ckpt.items() if v is not None}, path)
    return str(path)


def cli_error(capsys, main, argv):
    """Run a CLI as its entry point does; -> the one line it printed, after
    checking exit status 2."""
    with pytest.raises(SystemExit) as e:
        run_cli(main, [str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()


def unwritable_dir(tmp_path):
    """A directory this process cannot create files in, even as root (whom
    permission bits do not stop)."""
    if os.geteuid() == 0:
        return "/sys"
    path = tmp_path / "read_only"
    path.mkdir()
    path.chmod(0o500)
    return str(path)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


# --------------------------------------------------------------------------------------------------
# every model source: load it or say why in one line

@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "hf"
    tiny_gpt().save_pretrained(path)
    return path


def damaged_export(export_dir, tmp_path, fault):
    path = tmp_path / "hf"
    shutil.copytree(export_dir, path)
    if fault.startswith("truncated "):
        target = path / fault.removeprefix("truncated ")
        target.write_bytes(target.read_bytes()[:200])
        return path, target
    # transformers would fill the hole with random weights
    if fault.startswith("model.safetensors "):
        from safetensors.torch import load_file, save_file
        weights = load_file(path / "model.safetensors")
        if fault.endswith("without a tensor"):
            del weights["transformer.h.1.mlp.c_fc.weight"]
        elif fault.endswith("than config.json says"):
            config = json.loads((path / "config.json").read_text())
            (path / "config.json").write_text(json.dumps(config | {"n_layer": 1}))
        elif fault.endswith("an int64 tensor"):
            weights["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(64, 256, dtype=torch.int64)
        else:
            weights["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(64, 100)
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
        named = path / "model.safetensors" if fault.endswith("an int64 tensor") else path
        return path, named
    config = json.loads((path / "config.json").read_text())
    config["n_head"] = {"n_head=3": 3, "n_head=0": 0}[fault]
    (path / "config.json").write_text(json.dumps(config))
    return path, path / "config.json"


def bad_torch_file(tmp_path, fault, monkeypatch):
    model, path = tiny_gpt(), tmp_path / "ckpt.pt"
    args = dataclasses.asdict(model.config)
    if fault == "nanoGPT args disagree with weights":
        torch.save({"model": model.state_dict(), "model_args": args | {"n_embd": 32, "n_head": 2}},
                   path)
    elif fault == "nanoGPT weights with an untied lm_head":
        weights = dict(model.state_dict())
        weights["lm_head.weight"] = weights["lm_head.weight"] + 1.0
        torch.save({"model": weights, "model_args": args}, path)
    elif fault == "nanoGPT weights with a bool tensor":
        weights = dict(model.state_dict())
        weights["transformer.h.1.mlp.c_fc.weight"] = weights["transformer.h.1.mlp.c_fc.weight"] > 0
        torch.save({"model": weights, "model_args": args}, path)
    elif fault == "nanoGPT field of the wrong type":
        torch.save({"model": model.state_dict(), "model_args": args | {"n_layer": "2"}}, path)
    elif fault == "build-nanogpt field of the wrong type":
        # build-nanogpt's train_gpt2.py pickles its GPTConfig dataclass from __main__
        fields = [(name, int, getattr(model.config, name))
                  for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")]
        config_class = dataclasses.make_dataclass("GPTConfig", fields,
                                                  namespace={"__module__": "__main__"})
        monkeypatch.setattr(sys.modules["__main__"], "GPTConfig", config_class, raising=False)
        torch.save({"model": model.state_dict(), "config": config_class(n_embd=64.0), "step": 5},
                   path)
    elif fault == "nanoGPT n_embd not a multiple of n_head":
        torch.save({"model": model.state_dict(), "model_args": args | {"n_head": 3}}, path)
    elif fault == "nanoGPT vocabulary smaller than GPT-2's":
        small = GPT(GPTConfig(**TINY, vocab_size=400))
        torch.save({"model": small.state_dict(), "model_args": args | {"vocab_size": 400}}, path)
    elif fault == "project checkpoint without its weights":
        save_checkpoint(path, policy=model, model=None)
    elif fault == "project checkpoint with an extra config key":
        save_checkpoint(path, policy=model, model_config=args | {"n_experts": 8})
    elif fault == "a pickle that would run code":
        torch.save({"model": Evil(), "model_args": args}, path)
    return path, path


@pytest.mark.parametrize("fault, message", [
    ("truncated model.safetensors", "truncated or corrupt"),
    ("truncated value_head.safetensors", "truncated or corrupt"),
    ("model.safetensors without a tensor", "the weights lack 1 tensor(s) of this config"),
    ("model.safetensors with more layers than config.json says",
     "the weights hold 11 tensor(s) that config.json "
     "does not describe (transformer.h.1.attn.c_attn.weight"),
    ("model.safetensors with a tensor of the wrong shape", "the weights and config.json disagree: "
     "transformer.h.1.mlp.c_fc.weight is (64, 100), but the config makes it (64, 256)"),
    ("model.safetensors with an int64 tensor",
     "non-float weights (int64) in transformer.h.1.mlp.c_fc.weight"),
    ("n_head=3", "n_embd=64 is not a multiple of n_head=3"),
    ("n_head=0", "n_head must be a positive integer, not 0"),
    ("nanoGPT args disagree with weights", "the weights and the model config disagree"),
    ("nanoGPT weights with an untied lm_head",
     "lm_head.weight differs from transformer.wte.weight, but this GPT ties them"),
    ("nanoGPT weights with a bool tensor",
     "non-float weights (bool) in transformer.h.1.mlp.c_fc.weight"),
    ("nanoGPT field of the wrong type", "n_layer must be a positive integer, not '2'"),
    ("build-nanogpt field of the wrong type", "n_embd must be a positive integer, not 64.0"),
    ("nanoGPT n_embd not a multiple of n_head", "n_embd=64 is not a multiple of n_head=3"),
    ("nanoGPT vocabulary smaller than GPT-2's", "vocab_size=400 is smaller than GPT-2's 50257"),
    ("project checkpoint without its weights", "the checkpoint's 'model' is missing"),
    ("project checkpoint with an extra config key", "unknown model config field(s) ['n_experts']"),
    ("a pickle that would run code", "refused: loading it would run Python code"),
])
def test_every_bad_model_source_is_one_line_naming_the_file(export_dir, tmp_path, capsys,
                                                            monkeypatch, fault, message):
    if fault.startswith(("truncated", "n_head=", "model.safetensors")):
        source, named = damaged_export(export_dir, tmp_path, fault)
    else:
        source, named = bad_torch_file(tmp_path, fault, monkeypatch)
    line = cli_error(capsys, hellaswag.main, ["--model", source, "--data", FIXTURE])
    assert f"error: {named}:" in line and message in line
    # never advise turning the safety off
    assert "weights_only=False" not in line and "`False`" not in line


def test_a_stray_non_float_copy_beside_good_weights_is_not_judged(export_dir, tmp_path):
    """transformers loads model.safetensors, or else the shards its index names, never an int8
    copy saved beside them: such a copy is no reason to refuse a good model. A shard it loads is
    judged as before."""
    from safetensors.torch import load_file, save_file

    from causal_lm import CausalLM

    path = tmp_path / "hf"
    shutil.copytree(export_dir, path)
    weights = load_file(path / "model.safetensors")
    int8 = {k: v.to(torch.int8) for k, v in weights.items()}
    save_file(int8, path / "model_int8.safetensors", metadata={"format": "pt"})
    GPT.from_pretrained(path)
    CausalLM.load(str(path))
    # the same weights in two shards that an index names
    os.remove(path / "model.safetensors")
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, path / shard, metadata={"format": "pt"})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    index = {"metadata": {}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    GPT.from_pretrained(path)
    CausalLM.load(str(path))
    key = "transformer.h.1.mlp.c_fc.weight"
    shard = weight_map[key]
    save_file({k: (int8 if k == key else weights)[k] for k in shards[shard]}, path / shard,
              metadata={"format": "pt"})
    message = re.escape(f"{path / shard}: non-float weights (int8) in {key};")
    with pytest.raises(UserError, match=message):
        GPT.from_pretrained(path)
    with pytest.raises(UserError, match=message):
        CausalLM.load(str(path))


@pytest.mark.parametrize("setting", [{"scale_attn_by_inverse_layer_idx": True},
                                     {"scale_attn_weights": False},
                                     {"tie_word_embeddings": False},
                                     {"activation_function": "relu"}])
def test_gpt2_settings_this_gpt_does_not_compute_are_refused(export_dir, tmp_path, setting):
    """Each would load and give other logits than transformers' GPT-2 (an untied head: whichever of
    the two matrices loaded last)."""
    path = tmp_path / "hf"
    shutil.copytree(export_dir, path)
    config = json.loads((path / "config.json").read_text()) | setting
    (path / "config.json").write_text(json.dumps(config))
    (name, value), = setting.items()
    with pytest.raises(UserError, match=(f"{path}: config.json sets {name}={value!r}, "
                                         "which GPT-2 does not have")):
        GPT.from_pretrained(str(path))


def test_non_finite_weights_are_refused_by_hellaswag(tmp_path, capsys):
    model = tiny_gpt()
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    path = save_checkpoint(tmp_path / "ckpt_000100.pt", policy=model)
    line = cli_error(capsys, hellaswag.main, ["--model", path, "--data", FIXTURE])
    assert f"{path}: non-finite weights" in line and "transformer.h.1.mlp.c_fc.weight" in line


def test_int64_weights_of_another_architecture_are_refused_by_hellaswag(tmp_path, capsys):
    """A GPT-Neo is scored through transformers, which would cast the tensor to float without a
    word."""
    from safetensors.torch import load_file, save_file
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from tokenizer import gpt2_hf_tokenizer

    config = GPTNeoConfig(vocab_size=50257, hidden_size=64, num_layers=2, num_heads=2,
                          attention_types=[[["global"], 2]], max_position_embeddings=256)
    GPTNeoForCausalLM(config).save_pretrained(tmp_path / "neo")
    gpt2_hf_tokenizer().save_pretrained(tmp_path / "neo")
    path = tmp_path / "neo" / "model.safetensors"
    weights = load_file(path)
    weights["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(256, 64, dtype=torch.int64)
    save_file(weights, path, metadata={"format": "pt"})
    line = cli_error(capsys, hellaswag.main, ["--model", tmp_path / "neo", "--data", FIXTURE])
    assert f"error: {path}: non-float weights (int64) in transformer.h.1.mlp.c_fc.weight" in line


# --------------------------------------------------------------------------------------------------
# outputs are checked before the work

def no_work(*args, **kwargs):
    raise AssertionError("the work started before the output path was checked")


@pytest.mark.parametrize("fault", ["unwritable", "under a file", "existing directory",
                                   "same as the input"])
@pytest.mark.parametrize("flag", ["hellaswag --output", "hellaswag --predictions",
                                  "reward --output"])
def test_bad_output_paths_are_refused_before_the_work(tmp_path, capsys, monkeypatch, fault, flag):
    data = tmp_path / "data.jsonl"
    (tmp_path / "file.txt").write_text("a file\n")
    if flag.startswith("reward"):
        data.write_text(json.dumps({"context": "The cat", "continuation": " sat."}) + "\n")
    else:
        shutil.copy(FIXTURE, data)
    path = {"unwritable": os.path.join(unwritable_dir(tmp_path), "out.json"),
            "under a file": tmp_path / "file.txt" / "out.json",
            "existing directory": tmp_path,
            "same as the input": data}[fault]
    monkeypatch.setattr(hellaswag, "load_examples", no_work)
    monkeypatch.setattr(reward, "read_pairs", no_work)
    monkeypatch.setattr(reward.CausalLM, "load", no_work)
    if flag.startswith("reward"):
        line = cli_error(capsys, reward.main, ["--model", "any", "--input", data, "--output", path])
    else:
        argv = ["--model", "any", "--data", data, "--" + flag.split("--")[1], path]
        line = cli_error(capsys, hellaswag.main, argv)
    assert line.startswith(f"error: {path}: ")
    expected = {"unwritable": "cannot write in",
                "under a file": "is a file, so nothing can be written under it",
                "existing directory": "an existing directory",
                "same as the input": f"the same file as {data}"}
    assert expected[fault] in line
    assert data.exists() and (tmp_path / "file.txt").read_text() == "a file\n"


def test_an_output_directory_is_checked_the_same_way(tmp_path):
    """directory=True, for a run's out_dir: an existing directory is fine, a file or an
    unwritable place is not."""
    (tmp_path / "file.txt").write_text("a file\n")
    common.check_output_path(tmp_path, directory=True)
    common.check_output_path(tmp_path / "new" / "run", directory=True)
    for path, message in ((tmp_path / "file.txt", "an existing file, not a directory"),
                          (tmp_path / "file.txt" / "run",
                           "is a file, so nothing can be written under it"),
                          (os.path.join(unwritable_dir(tmp_path), "run"), "cannot write in")):
        with pytest.raises(UserError, match=message):
            common.check_output_path(path, directory=True)
    assert sorted(os.listdir(tmp_path)) == ["file.txt"] + (["read_only"] if os.geteuid() else [])


@pytest.mark.parametrize("key, value", [("pred", 4), ("pred_norm", -1), ("label", 7)])
def test_compare_refuses_predictions_that_are_not_ending_numbers(tmp_path, capsys, key, value):
    good = [{"index": i, "label": i % 4, "pred": 0, "pred_norm": 1} for i in range(4)]
    bad = [dict(p) for p in good]
    bad[2][key] = value
    for name, records in (("a.jsonl", good), ("b.jsonl", bad)):
        (tmp_path / name).write_text("".join(json.dumps(p) + "\n" for p in records))
    line = cli_error(capsys, hellaswag.main,
                     ["--compare", tmp_path / "a.jsonl", tmp_path / "b.jsonl"])
    assert f"b.jsonl, line 3: '{key}' is {value}, but an ending number is 0-3" in line


def test_compare_refuses_a_prediction_file_holding_an_example_twice(tmp_path, capsys):
    """Two evaluations joined into one file: paired twice, every example would count double and
    the McNemar p-value shrink (here: the same 4 examples, n = 8)."""
    good = [{"index": i, "label": i % 4, "pred": 0, "pred_norm": 1} for i in range(4)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(p) + "\n" for p in good) * 2)
    line = cli_error(capsys, hellaswag.main,
                     ["--compare", tmp_path / "a.jsonl", tmp_path / "a.jsonl"])
    assert ("a.jsonl, line 5: example 0 again (first at line 1): a prediction file holds each "
            "example once; were two files joined?") in line


# --------------------------------------------------------------------------------------------------
# files the project writes: normal permissions, and a full disk keeps the previous file

@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_written_files_get_the_permissions_of_the_users_umask(tmp_path, umask_027):
    atomic_write_text(tmp_path / "config.json", "{}\n")
    atomic_torch_save({"x": torch.zeros(2)}, tmp_path / "ckpt_000001.pt")
    tiny_gpt().save_pretrained(tmp_path / "export")
    assert os.stat(tmp_path / "config.json").st_mode & 0o777 == 0o640
    assert os.stat(tmp_path / "ckpt_000001.pt").st_mode & 0o777 == 0o640
    assert os.stat(tmp_path / "export").st_mode & 0o777 == 0o750
    for name in os.listdir(tmp_path / "export"):
        assert os.stat(tmp_path / "export" / name).st_mode & 0o777 == 0o640, name


def raise_enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt_000001.pt"
    atomic_torch_save({"step": 1}, ckpt)
    export = tmp_path / "export"
    tiny_gpt(seed=1).save_pretrained(export)

    monkeypatch.setattr(torch, "save", raise_enospc)
    with pytest.raises(UserError) as e:
        atomic_torch_save({"step": 2}, ckpt)
    assert str(e.value) == f"no space left on device: {ckpt}"

    def zip_writer_fails(*args, **kwargs):  # what torch.save raises when the disk fills: no errno
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", zip_writer_fails)
    monkeypatch.setattr(common.os, "statvfs",
                        lambda path: os.statvfs_result((4096,) * 2 + (0,) * 8))
    with pytest.raises(UserError) as e:
        atomic_torch_save({"step": 2}, ckpt)
    assert str(e.value) == f"no space left on device: {ckpt}"
    monkeypatch.undo()
    assert torch.load(ckpt) == {"step": 1}

    from transformers import GPT2LMHeadModel
    monkeypatch.setattr(GPT2LMHeadModel, "save_pretrained", raise_enospc)
    with pytest.raises(UserError) as e:
        tiny_gpt(seed=2).save_pretrained(export)
    assert str(e.value) == f"no space left on device: {export}"
    monkeypatch.undo()
    idx = torch.randint(0, 50257, (1, 8))
    # the old export
    assert torch.equal(GPT.from_pretrained(export).eval()(idx)[0], tiny_gpt(seed=1)(idx)[0])
    assert sorted(os.listdir(tmp_path)) == ["ckpt_000001.pt", "export"]  # no temporary files left


# --------------------------------------------------------------------------------------------------
# data and config files

def test_deeply_nested_json_is_one_line(export_dir, tmp_path, capsys):
    nested = "[" * 100_000 + "]" * 100_000
    data = tmp_path / "data.jsonl"
    data.write_text(open(FIXTURE).readline() + nested + "\n")
    line = cli_error(capsys, hellaswag.main, ["--model", export_dir, "--data", data])
    assert f"{data}, line 2: JSON nested too deeply" in line

    model_dir = tmp_path / "hf"
    shutil.copytree(export_dir, model_dir)
    (model_dir / "config.json").write_text('{"model_type": "gpt2", "n_head": ' + nested + "}")
    line = cli_error(capsys, hellaswag.main, ["--model", model_dir, "--data", FIXTURE])
    assert f"{model_dir / 'config.json'}: JSON nested too deeply" in line
    with pytest.raises(UserError, match="config.json: JSON nested too deeply"):
        GPT.from_pretrained(model_dir)


def test_a_cached_split_with_the_wrong_line_count_is_refused(export_dir, tmp_path, capsys,
                                                             monkeypatch):
    # the official files
    assert hellaswag.SPLIT_LINES == {"train": 39905, "val": 10042, "test": 10003}
    monkeypatch.setenv("HELLASWAG_CACHE", str(tmp_path))
    # a truncated val split put there by hand
    shutil.copy(FIXTURE, tmp_path / "hellaswag_val.jsonl")
    line = cli_error(capsys, hellaswag.main, ["--model", export_dir])
    assert (f"{tmp_path / 'hellaswag_val.jsonl'}: 6 examples, but the official val split has 10042"
            in line)


def test_a_directory_where_the_cached_split_should_be_is_one_line(export_dir, tmp_path, capsys,
                                                                  monkeypatch):
    monkeypatch.setenv("HELLASWAG_CACHE", str(tmp_path))
    (tmp_path / "hellaswag_val.jsonl").mkdir()
    line = cli_error(capsys, hellaswag.main, ["--model", export_dir])
    assert (f"{tmp_path / 'hellaswag_val.jsonl'}: a directory where the cached val split should be"
            in line)


def test_results_and_predictions_in_one_file_are_refused_before_the_work(tmp_path, capsys,
                                                                         monkeypatch):
    monkeypatch.setattr(hellaswag, "load_examples", no_work)
    same = tmp_path / "out.json"
    line = cli_error(capsys, hellaswag.main, ["--model", "any", "--data", FIXTURE, "--output", same,
                                              "--predictions", tmp_path / "." / "out.json"])
    assert "--output and --predictions are the same file" in line
