"""
Faults of a training run, one test per kind (the loaders' and CLIs' faults are in test_faults.py): a
used or unwritable out_dir, a damaged run to resume, paths that must work from another directory, a
multi-node run, a rank that dies. Tiny models on the synthetic task, CPU, gloo.
"""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import types

import pytest
import torch

import run_management
import train_ppo
from common import UserError
from reward import NothingToSave
from test_train_ppo import REPO, read_metrics, tiny_run


def label_run(out_dir, synthetic_dir, **overrides):
    settings = dict(reward_kind="label", eval_limit=8, checkpoint_interval=1, max_steps=2)
    return tiny_run(out_dir, synthetic_dir, **{**settings, **overrides})


def test_a_fresh_run_refuses_an_out_dir_holding_another_run(tmp_path, synthetic_dir, monkeypatch):
    train_ppo.train(label_run(tmp_path, synthetic_dir, max_steps=3, keep_last=1))
    before = {name: (tmp_path / name).read_bytes()
              for name in ("ckpt_000003.pt", "best.pt", "metrics.jsonl", "train_config.json")}
    loads = []
    monkeypatch.setattr(train_ppo, "load_data", lambda *a: loads.append(1))
    with pytest.raises(UserError,
                       match=r"holds another run .*--init_from=resume.*--start_over=True"):
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
    with pytest.raises(UserError, match=("an existing file, not a directory"
                                         "|is a file, so nothing can be written")):
        train_ppo.train(label_run(out_dir, synthetic_dir))


def test_resume_falls_back_from_a_damaged_checkpoint_and_torn_logs(tmp_path, synthetic_dir, capsys):
    straight = train_ppo.train(label_run(tmp_path / "straight", synthetic_dir,
                                         max_steps=4))["model"]
    run = tmp_path / "run"
    train_ppo.train(label_run(run, synthetic_dir, max_steps=3, keep_last=2))
    # killed while writing: the newest checkpoint cut short, a torn last log line,
    # a leftover temporary file
    newest = run / "ckpt_000003.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "rew')
    (run / ".ckpt_000004.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (run / ".hf.k2j4x9").mkdir()  # an export killed half-way: as large as the model
    (run / ".hf.k2j4x9" / "model.safetensors").write_bytes(b"half an export")
    capsys.readouterr()
    resumed = train_ppo.train(label_run(run, synthetic_dir, max_steps=4,
                                        init_from="resume"))["model"]
    out, err = capsys.readouterr()
    # warnings on stderr, where a user piping the console's lines does not expect them mixed in
    assert f"warning: {newest}: cannot resume from it" in err and "warning" not in out
    assert "resumed from" in out and "ckpt_000002.pt" in out
    assert "line 5: not a JSON line" in err
    # only the length changed
    assert "resuming with max_steps 3 -> 4" in out and "warning: resuming" not in err
    assert not (run / ".ckpt_000004.pt.abc123.tmp").exists() and not (run / ".hf.k2j4x9").exists()
    assert [m["step"] for m in read_metrics(run)] == [0, 1, 2, 3, 4]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_rotation_keeps_the_checkpoint_it_wrote_when_a_damaged_later_one_is_left(
        tmp_path, synthetic_dir, capsys):
    """A resume passed over a damaged later checkpoint (here step 4, say a stop-signal save cut
    short); counting that file in the rotation would remove the checkpoint just written and leave
    nothing to resume from."""
    straight = train_ppo.train(label_run(tmp_path / "straight", synthetic_dir,
                                         max_steps=4))["model"]
    run = tmp_path / "run"
    train_ppo.train(label_run(run, synthetic_dir, max_steps=2, keep_last=1))
    (run / "ckpt_000004.pt").write_bytes(b"")
    train_ppo.train(label_run(run, synthetic_dir, max_steps=3, keep_last=1, init_from="resume"))
    assert sorted(p.name for p in run.glob("ckpt_*.pt")) == ["ckpt_000003.pt", "ckpt_000004.pt"]
    capsys.readouterr()
    resumed = train_ppo.train(label_run(run, synthetic_dir, max_steps=4, keep_last=1,
                                        init_from="resume"))["model"]
    assert "ckpt_000003.pt at step 3" in capsys.readouterr().out
    assert [p.name for p in run.glob("ckpt_*.pt")] == ["ckpt_000004.pt"]  # written over
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_synthetic_task_cli_refuses_before_any_training(tmp_path, monkeypatch, capsys):
    """`python synthetic.py --help` once made a folder named --help and trained into it."""
    import synthetic

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(synthetic, "prepare", lambda *a, **k: pytest.fail("work began"))
    with pytest.raises(SystemExit) as exit_:
        synthetic.main(["--help"])
    assert exit_.value.code == 0 and "usage: " in capsys.readouterr().out
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="an existing file, not a directory"):
        synthetic.main(["a_file"])
    assert os.listdir(tmp_path) == ["a_file"]


def test_a_kill_between_the_exports_two_renames_gives_the_previous_export_back(tmp_path):
    """atomic_directory moves hf/ aside, then the new export in: between the two, hf/ is missing and
    the previous export sits in .hf.old.XXXX/x, which a resume must not delete. (A fresh run in
    that folder removes it as before: it is the previous run's.)"""
    (tmp_path / ".hf.old.k2j4x9" / "x").mkdir(parents=True)
    (tmp_path / ".hf.old.k2j4x9" / "x" / "config.json").write_text("the previous export")
    (tmp_path / ".hf.a8d0q1").mkdir()  # the new one, complete or not: redone at the run's end
    run_management.remove_torn_writes(str(tmp_path), restore_export=True)  # a resume
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    assert (tmp_path / "hf" / "config.json").read_text() == "the previous export"
    (tmp_path / ".hf.old.b7c3z0" / "x").mkdir(parents=True)  # killed after the second rename
    run_management.remove_torn_writes(str(tmp_path), restore_export=True)
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    assert (tmp_path / "hf" / "config.json").read_text() == "the previous export"


def test_a_logs_rewrite_keeps_its_lines_and_names_a_torn_one(tmp_path):
    """The two rewrites of a run's log (a resume drops the steps it redoes; a skipped evaluation
    done on resume joins its step's line) keep every other line as it was, and a torn line is
    dropped with a warning that names it, not silently."""
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "reward": 0.5}, {"step": 2, "reward": 0.25}, {"step": 3, "reward": 1.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "rew')
    warnings = []
    run_management.add_to_logged_step(str(path), 2, {"eval/acc_norm": 0.75}, warnings.append)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        lines[0], {**lines[1], "eval/acc_norm": 0.75}, lines[2]]
    assert warnings == [f"{path}, line 4: not a JSON line (torn by a kill?), dropped"]
    run_management.drop_lines_after(str(path), 2, warnings.append)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        lines[0], {**lines[1], "eval/acc_norm": 0.75}]
    assert len(warnings) == 1
    run_management.drop_lines_after(str(tmp_path / "samples.jsonl"), 2)  # none yet: nothing to do
    assert not (tmp_path / "samples.jsonl").exists()


def test_resume_without_a_checkpoint_fails_before_any_work(tmp_path, synthetic_dir, monkeypatch):
    (tmp_path / "train_config.json").write_text("the previous run's config\n")
    monkeypatch.setattr(train_ppo, "load_data",
                        lambda *a: pytest.fail("data loaded before the check"))
    with pytest.raises(UserError, match="no checkpoint"):
        train_ppo.train(label_run(tmp_path, synthetic_dir, init_from="resume"))
    (tmp_path / "ckpt_000001.pt").write_bytes(b"")  # empty: a kill before the first byte
    with pytest.raises(UserError, match="none of the 1 checkpoint"):
        train_ppo.train(label_run(tmp_path, synthetic_dir, init_from="resume"))
    assert (tmp_path / "train_config.json").read_text() == "the previous run's config\n"


def test_a_run_whose_setup_failed_leaves_nothing_to_refuse(tmp_path, synthetic_dir):
    """train_config.json is written once the setup succeeded: the corrected command then just runs,
    without --start_over or --init_from=resume."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx": "x", "endings": ["a"], "label": 0}\n')
    with pytest.raises(UserError, match="field 'endings'"):
        train_ppo.train(label_run(tmp_path / "run", synthetic_dir, synthetic=False,
                                  init_from="scratch", train_data=str(bad), val_data=str(bad)))
    assert not (tmp_path / "run" / "train_config.json").exists()
    assert train_ppo.train(label_run(tmp_path / "run", synthetic_dir, max_steps=1))["step"] == 1


def test_a_setup_that_failed_after_writing_its_config_leaves_nothing_to_refuse(
        tmp_path, synthetic_dir, monkeypatch):
    """wandb's login failing in a batch job, or an out-of-memory first evaluation, after
    train_config.json (and an empty metrics.jsonl) were written: the corrected command just runs."""
    import types

    def no_login(**kwargs):
        raise RuntimeError("api_key not configured (no-tty)")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=no_login))
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"wandb_log=True, but wandb could not start a run "
                                        r"\(api_key not configured"):
        train_ppo.train(label_run(run, synthetic_dir, wandb_log=True))
    run.mkdir(exist_ok=True)
    (run / "train_config.json").write_text("{}")  # as a failed first evaluation leaves them
    (run / "metrics.jsonl").write_text("")
    assert train_ppo.train(label_run(run, synthetic_dir, max_steps=1))["step"] == 1
    with pytest.raises(UserError, match="holds another run"):  # that one has done work
        train_ppo.train(label_run(run, synthetic_dir, max_steps=1))


def test_unlabelled_validation_data_is_refused_before_the_models_load(tmp_path, synthetic_dir,
                                                                      monkeypatch):
    monkeypatch.setattr(train_ppo, "load_models",
                        lambda *a: pytest.fail("models loaded before the check"))
    val = tmp_path / "test.jsonl"
    examples = [json.loads(line) for line in open(os.path.join(synthetic_dir, "val.jsonl"))]
    val.write_text("".join(json.dumps(dict(ex, label=None)) + "\n" for ex in examples[:8]))
    with pytest.raises(UserError, match=r"val_data=.*test.jsonl': 8 of its examples have no "
                                        r"label"):
        train_ppo.train(label_run(tmp_path / "run", synthetic_dir, synthetic=False,
                                  init_from="scratch", val_data=str(val),
                                  train_data=os.path.join(synthetic_dir, "train.jsonl")))


def test_resuming_a_finished_run_or_with_another_evaluation_set(tmp_path, synthetic_dir, capsys,
                                                                monkeypatch):
    """max_steps at or below the checkpoint's step asks for nothing: said before any work. An
    evaluation set changed on a resume makes its scores no bar for best.pt."""
    real = run_management.run_eval

    def low_on_the_new_set(model, examples, *args):
        result = real(model, examples, *args)
        return {**result, "eval/acc_norm": 0.01} if len(examples) == 4 else result

    monkeypatch.setattr(run_management, "run_eval", low_on_the_new_set)
    train_ppo.train(label_run(tmp_path, synthetic_dir, max_steps=2, eval_interval=1))
    with pytest.raises(UserError, match=r"ckpt_000002.pt is at step 2, and max_steps=2 asks for "
                                        r"nothing more"):
        train_ppo.train(label_run(tmp_path, synthetic_dir, max_steps=2, init_from="resume"))
    best = torch.load(tmp_path / "best.pt", weights_only=True)["step"]
    capsys.readouterr()
    train_ppo.train(label_run(tmp_path, synthetic_dir, max_steps=3, eval_interval=1,
                              init_from="resume", eval_limit=4))
    assert "the evaluation set changed" in capsys.readouterr().out
    assert torch.load(tmp_path / "best.pt", weights_only=True)["step"] == 3 != best


@pytest.mark.parametrize("key, value", [("init_from", "./policy_typo"),
                                        ("init_from", "runs/x/ckpt_000100.pt"),
                                        ("reward_model", "/models/judge_typo"),
                                        ("val_data", "val_typo.jsonl")])
def test_a_source_path_that_is_not_there_is_one_line_before_any_work(tmp_path, synthetic_dir,
                                                                     monkeypatch, key, value):
    monkeypatch.setattr(train_ppo, "load_data",
                        lambda *a: pytest.fail("data loaded before the check"))
    monkeypatch.setattr(train_ppo, "setup_distributed",
                        lambda *a: pytest.fail("set up before the check"))
    settings = {"synthetic": False, "init_from": str(tmp_path),
                "train_data": str(tmp_path / "t.jsonl"), "val_data": str(tmp_path / "t.jsonl"),
                "reward_kind": "teacher", "reward_model": str(tmp_path)}
    (tmp_path / "t.jsonl").write_text("")
    with pytest.raises(UserError, match=f"config: {key}='{value}': no such file or directory"):
        train_ppo.train(label_run(tmp_path / "run", synthetic_dir, **{**settings, key: value}))


@pytest.mark.parametrize("key", ["synthetic_dir", "data_cache"])
def test_a_folder_under_a_file_is_one_line_before_any_work(tmp_path, synthetic_dir, monkeypatch,
                                                           key):
    monkeypatch.setattr(train_ppo, "load_data",
                        lambda *a: pytest.fail("data loaded before the check"))
    (tmp_path / "f").write_text("x")
    if key == "synthetic_dir":
        cfg = label_run(tmp_path / "run", str(tmp_path / "f" / "task"))
    else:
        cfg = label_run(tmp_path / "run", synthetic_dir, synthetic=False, init_from="scratch",
                        train_data="hellaswag:train", data_cache=str(tmp_path / "f" / "cache"))
    with pytest.raises(UserError, match=f"{tmp_path / 'f'} is a file, so nothing can be written"):
        train_ppo.train(cfg)


@pytest.mark.parametrize("key", ["synthetic_dir", "data_cache"])
def test_a_folder_that_holds_all_it_needs_is_only_read(tmp_path, synthetic_dir, monkeypatch, key):
    """A finished demo task or a cache holding the splits may sit on a read-only mount: nothing asks
    to write there (and a folder that lacks something is checked)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    for split in ("train", "val"):
        (cache / f"hellaswag_{split}.jsonl").write_text("")
    cfg = (label_run(tmp_path / "run", synthetic_dir) if key == "synthetic_dir" else
           label_run(tmp_path / "run", synthetic_dir, synthetic=False, init_from="scratch",
                     train_data="hellaswag:train", val_data="hellaswag:val",
                     data_cache=str(cache)))
    checked = []
    real = run_management.check_output_path
    monkeypatch.setattr(run_management, "check_output_path",
                        lambda path, **kw: checked.append(str(path)) or real(path, **kw))
    run = run_management.Distributed(ddp=False, rank=0, local_rank=0, world_size=1, device="cpu")
    run_management.prepare_out_dir(cfg, run, print)
    folder = getattr(cfg, key)
    assert folder not in checked
    (cache / "hellaswag_val.jsonl").unlink()
    (tmp_path / "partial").mkdir()
    cfg = (cfg if key == "data_cache" else label_run(tmp_path / "run", str(tmp_path / "partial")))
    run_management.prepare_out_dir(cfg, run, print)
    assert getattr(cfg, key) in checked


def test_the_run_s_own_demo_task_is_built_with_the_run_s_seed(tmp_path, synthetic_dir, monkeypatch):
    """The demo task in out_dir/synthetic belongs to the run that built it: a run with another
    seed refuses it (each seed has its own task, teacher and policy) unless --start_over moves
    it aside with the rest."""
    import shutil

    import synthetic

    # prepare() records the seed it built the task with
    assert synthetic.task_seed(synthetic_dir) == 0
    task = tmp_path / "run" / "synthetic"
    shutil.copytree(synthetic_dir, task)
    class Checked(Exception):
        """load_data reached: the checks before it passed"""

    def stop(*args):
        raise Checked

    monkeypatch.setattr(train_ppo, "load_data", stop)
    with pytest.raises(UserError, match=(f"{task} holds the demo task built with seed 0, "
                                         "and this run asks for seed 5")):
        train_ppo.train(label_run(tmp_path / "run", "", seed=5))
    assert synthetic.task_seed(str(task)) == 0
    with pytest.raises(Checked):
        train_ppo.train(label_run(tmp_path / "run", "", seed=5, start_over=True))
    (previous,) = (tmp_path / "run" / "previous").iterdir()
    assert synthetic.task_seed(str(previous / "synthetic")) == 0 and not task.exists()


def test_start_over_moves_each_node_s_own_stale_demo_task(tmp_path, synthetic_dir):
    """Nodes that share no filesystem each have their own out_dir/synthetic: the local rank 0 of
    every node moves its stale task (only global rank 0 moves the run's files)."""
    import shutil

    import synthetic

    nodes = {}
    for node, rank in (("node0", 0), ("node1", 8)):
        task = tmp_path / node / "synthetic"
        shutil.copytree(synthetic_dir, task)
        (task / "task.json").write_text(json.dumps({"seed": 0}))
        (tmp_path / node / "metrics.jsonl").write_text('{"step": 1}\n')
        run = run_management.Distributed(ddp=False, rank=rank, local_rank=0, world_size=16,
                                         device="cpu")
        run_management.prepare_out_dir(label_run(tmp_path / node, "", seed=5, start_over=True), run,
                                  print)
        nodes[node] = task
    for node, task in nodes.items():
        assert not task.exists()
        (previous,) = (tmp_path / node / "previous").iterdir()
        assert synthetic.task_seed(str(previous / "synthetic")) == 0
    # the run's own files: global rank 0's alone
    assert (not (tmp_path / "node0" / "metrics.jsonl").exists()
            and (tmp_path / "node1" / "metrics.jsonl").exists())


def test_resuming_with_other_settings_says_so_and_recomputes_what_depends_on_them(
        tmp_path, synthetic_dir, capsys):
    train_ppo.train(label_run(tmp_path, synthetic_dir, max_steps=1))
    capsys.readouterr()
    train_ppo.train(label_run(tmp_path, synthetic_dir, max_steps=2, init_from="resume",
                              choice_temperature=2.0))
    out, err = capsys.readouterr()
    assert ("warning: resuming with settings that differ from the checkpoint's, so another "
            "experiment from here on: choice_temperature 1.0 -> 2.0") in err
    assert "resuming with max_steps 1 -> 2" in out  # a continuation, not a warning
    assert ("cached reference scores are for other training examples or another "
            "choice_temperature") in out


def test_a_scratch_reference_is_rebuilt_as_the_run_began_whatever_the_config_says_now(
        tmp_path, synthetic_dir):
    train_ppo.train(label_run(tmp_path, synthetic_dir, init_from="scratch", max_steps=1))
    # resumed once with another seed: its checkpoint must still describe the first run's reference
    train_ppo.train(label_run(tmp_path, synthetic_dir, init_from="resume", max_steps=2, seed=3))
    ckpt = run_management.read_checkpoint(torch.load(tmp_path / "ckpt_000002.pt",
                                                     weights_only=True))
    changed = label_run(tmp_path, synthetic_dir, init_from="resume", seed=7, n_layer=3)
    _, reference, _ = train_ppo.load_models(changed, "resume", ckpt,
                                            str(tmp_path / "ckpt_000002.pt"), "cpu")
    original = train_ppo.build_policy("scratch", label_run(tmp_path, synthetic_dir))
    assert reference.state_dict().keys() == original.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(),
                                                 original.state_dict().values()))


def test_a_reference_from_a_run_directory_stays_the_checkpoint_it_started_from(
        tmp_path, synthetic_dir):
    """The source run may go on saving: a resume must not take its KL penalty against that run's
    newer checkpoint, and a reference file rewritten since is refused."""
    source = tmp_path / "source"
    train_ppo.train(label_run(source, synthetic_dir, max_steps=1))
    start = source / "ckpt_000001.pt"
    straight = train_ppo.train(label_run(tmp_path / "straight", synthetic_dir,
                                         init_from=str(start), max_steps=2))["model"]
    run = tmp_path / "run"
    train_ppo.train(label_run(run, synthetic_dir, init_from=str(source), max_steps=1))
    assert torch.load(run / "ckpt_000001.pt", weights_only=True)["reference_from"] == str(start)
    train_ppo.train(label_run(source, synthetic_dir, init_from="resume", max_steps=2))
    resumed = train_ppo.train(label_run(run, synthetic_dir, init_from="resume",
                                        max_steps=2))["model"]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    shutil.copy(source / "ckpt_000002.pt", start)
    with pytest.raises(UserError, match=f"{start}: not the weights this run started from"):
        train_ppo.train(label_run(run, synthetic_dir, init_from="resume", max_steps=3))


def test_cached_reference_scores_are_kept_only_for_the_same_examples_and_scores():
    encoded = [([1, 2], [[3], [4], [5], [6]]), ([7], [[8], [9], [10], [11]])]
    rows = types.SimpleNamespace(choice_lengths=lambda enc: (torch.ones(len(enc), 4), None))

    def rollouts(encoded=encoded, temperature=1.0, normalisers=None):
        return train_ppo.ChoiceRollouts(encoded, None, temperature, 2, "cpu", rows=rows,
                                        normalisers=normalisers)
    saved = rollouts()
    saved.reference_logprobs = torch.randn(2, 4)
    state = saved.state_dict()
    # a checkpoint of scores divided by the endings' tokens, written before the key knew of other
    # normalisers: its key is the examples' and the temperature's alone
    digest = hashlib.sha256(json.dumps(encoded).encode()).hexdigest()
    assert state["key"] == f"{digest}/1.0"
    same = rollouts()
    assert (same.load_state_dict(state)
            and torch.equal(same.reference_logprobs, saved.reference_logprobs))
    chars = torch.tensor([[5.0, 6.0, 7.0, 8.0]] * 2)
    by_chars = rollouts(normalisers=chars)
    by_chars.reference_logprobs = torch.randn(2, 4)
    by_chars_state = by_chars.state_dict()
    for other, checkpoint in ((rollouts(temperature=2.0), state),
                              (rollouts(normalisers=chars), state),
                              (rollouts(encoded[::-1]), state), (rollouts(encoded[:1]), state),
                              (rollouts(), by_chars_state),
                              (rollouts(normalisers=chars + 1), by_chars_state)):
        assert not other.load_state_dict(checkpoint)
        assert torch.isnan(other.reference_logprobs).all()
    again = rollouts(normalisers=chars.clone())
    assert again.load_state_dict(by_chars_state)
    assert torch.equal(again.reference_logprobs, by_chars.reference_logprobs)


def test_a_float16_run_resumes_a_checkpoint_saved_without_a_scaler(tmp_path):
    """A bf16 (or CPU) checkpoint has an empty GradScaler state; continuing it in float16 (a GPU
    without bf16) starts a fresh scaler instead of failing."""
    model = train_ppo.GPT(train_ppo.GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8))
    optimizer = model.configure_optimizers(0.0, 1e-3, (0.9, 0.95), "cpu")
    cfg = train_ppo.Config()
    run = run_management.Distributed(ddp=False, rank=0, local_rank=0, world_size=1, device="cpu")
    generators = (torch.Generator(), torch.Generator())
    kl = train_ppo.FixedKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    saved = run_management.TrainingState(
        optimizer=optimizer, scaler=torch.amp.GradScaler("cpu", enabled=False), kl_controller=kl,
        reward_fn=NothingToSave(), rollout_kind=NothingToSave(), sample_generator=generators[0],
        shuffle_generator=generators[1], batches=None,
        reference=run_management.Reference("scratch", None, None), step=7, data_position=3,
        best_acc_norm=0.5)
    ckpt = run_management.checkpoint_dict(model, cfg, saved, run)
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)
    state = run_management.TrainingState(
        optimizer=optimizer, scaler=scaler, kl_controller=kl, reward_fn=None, rollout_kind=None,
        sample_generator=generators[0], shuffle_generator=generators[1], batches=None,
        reference=None)
    state.load_state_dict(run_management.read_checkpoint(ckpt), cfg, run)
    assert (state.step, state.data_position, state.best_acc_norm) == (7, 3, 0.5)
    assert scaler.is_enabled() and scaler.get_scale() == 1024.0


@pytest.mark.parametrize("when", ["during the step before an evaluation", "during an evaluation"])
def test_a_signal_near_an_evaluation_checkpoints_without_another_step(tmp_path, synthetic_dir,
                                                                      monkeypatch, when):
    """A scheduler's grace period may be short: a signal in a step skips that step's
    interval evaluation, one during an evaluation checkpoints right after it; either
    way no further step runs."""
    import signal

    real_update, real_eval = train_ppo.ppo_update, run_management.run_eval
    updates, evaluations = [], []

    def update(*args, **kwargs):
        updates.append(1)
        if when.startswith("during the step") and len(updates) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_update(*args, **kwargs)

    def evaluate(*args, **kwargs):
        result = real_eval(*args, **kwargs)
        evaluations.append(1)
        if when == "during an evaluation" and len(evaluations) == 2:  # step 2's (step 0's first)
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(train_ppo, "ppo_update", update)
    monkeypatch.setattr(run_management, "run_eval", evaluate)
    result = train_ppo.train(label_run(tmp_path, synthetic_dir, max_steps=6, eval_interval=2,
                                       checkpoint_interval=5))
    assert result["step"] == 2 and len(updates) == 2
    assert os.path.exists(tmp_path / "ckpt_000002.pt")
    evaluated = os.path.exists(tmp_path / "eval" / "step_000002.jsonl")
    assert evaluated == (when == "during an evaluation")
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def test_a_run_resumes_from_another_working_directory(tmp_path, synthetic_dir, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    os.symlink(synthetic_dir, first / "task")
    monkeypatch.chdir(first)  # every path relative to a/
    train_ppo.train(label_run("run", "task", max_steps=1))
    ckpt = torch.load(first / "run" / "ckpt_000001.pt", weights_only=True)
    saved = json.loads((first / "run" / "train_config.json").read_text())
    # the folders too, which did not exist when the run began
    for config in (ckpt["config"], saved):
        assert all(os.path.isabs(config[key]) for key in ("out_dir", "synthetic_dir"))
    assert os.path.isabs(ckpt["reference_from"])
    monkeypatch.chdir(second)  # a/ is not there any more as "."; the checkpoint's paths still work
    result = train_ppo.train(label_run(first / "run", ckpt["config"]["synthetic_dir"], max_steps=2,
                                       init_from="resume"))
    assert result["step"] == 2


def test_a_non_finite_choice_rollout_is_a_skipped_step(tmp_path, synthetic_dir, monkeypatch,
                                                       capsys):
    """Scores that overflow in one step's rollout (a low-precision forward) skip that step, on
    every rank, as a generate rollout's do; the run goes on."""
    real_collect, real_forward = train_ppo.ChoiceRollouts.collect, train_ppo.choice_forward
    calls = []

    def first_row_nan(*args, **kwargs):
        logprobs, values = real_forward(*args, **kwargs)
        return logprobs.index_fill(0, torch.tensor([0]), float("nan")), values

    def collect(self, *args):
        calls.append(1)
        monkeypatch.setattr(train_ppo, "choice_forward",
                            first_row_nan if len(calls) == 2 else real_forward)
        return real_collect(self, *args)

    monkeypatch.setattr(train_ppo.ChoiceRollouts, "collect", collect)
    train_ppo.train(label_run(tmp_path, synthetic_dir, max_steps=3, keep_last=3))
    assert "warning: step 2: non-finite rollout (1 step(s) in a row)" in capsys.readouterr().err
    weights = [torch.load(tmp_path / f"ckpt_00000{step}.pt", weights_only=True)["model"]
               for step in (1, 2, 3)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # step 2 skipped
    assert not all(torch.equal(weights[1][k], weights[2][k]) for k in weights[0])


def test_weights_that_turn_non_finite_stop_the_run_before_the_next_checkpoint(
        tmp_path, synthetic_dir, monkeypatch):
    real = train_ppo.ppo_update
    calls = []

    # finite gradients, then a weight blows up at step 2
    def diverging(model, raw_model, *args, **kwargs):
        out = real(model, raw_model, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                raw_model.transformer.wte.weight[0, 0] = float("inf")
        return out

    monkeypatch.setattr(train_ppo, "ppo_update", diverging)
    with pytest.raises(UserError, match=(r"step 2: the policy .*non-finite weights \(NaN or inf\) "
                                         r"in transformer.wte.weight")):
        train_ppo.train(label_run(tmp_path, synthetic_dir, max_steps=4))
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("ckpt_")) == ["ckpt_000001.pt"]


# --------------------------------------------------------------------------------------------------
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
    "torch.save(summary['model'].state_dict(), "
    "os.path.join(os.environ['WEIGHTS_DIR'], f'rank{rank}.pt'))\n")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_args(cfg, out_dir):
    return [f"--{k}={v}" for k, v in vars(cfg).items() if k != "out_dir"] + [f"--out_dir={out_dir}"]


@pytest.mark.slow
def test_two_nodes_simulated_on_one_machine_train_the_same_weights(tmp_path, synthetic_dir):
    """Two torchrun launchers (--nnodes=2, c10d rendezvous, gloo), one process each, each node
    with its own out_dir as if they shared no filesystem: both ranks end with the same
    weights; only global rank 0 writes checkpoints, metrics and the export; each node keeps
    its own teacher cache."""
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)
    cfg = tiny_run(tmp_path, synthetic_dir, reward_kind="teacher", max_steps=2, eval_limit=8,
                   batch_size=8, minibatch_size=4, micro_batch_size=2, export_hf=True)
    port = free_port()
    procs = []
    for node in (0, 1):
        out_dir = tmp_path / f"node{node}"
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                   f"--node_rank={node}", "--nproc_per_node=1", "--rdzv-backend=c10d",
                   f"--rdzv-endpoint=127.0.0.1:{port}",
                   "--rdzv-id=two-nodes", str(script), *launcher_args(cfg, out_dir)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WEIGHTS_DIR": str(tmp_path)}
        procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    node0, node1 = set(os.listdir(tmp_path / "node0")), set(os.listdir(tmp_path / "node1"))
    assert {"ckpt_000002.pt", "metrics.jsonl", "hf", "eval"} <= node0
    assert not node1 & {"ckpt_000002.pt", "best.pt", "metrics.jsonl", "samples.jsonl", "hf", "eval"}
    # the second node scored its own examples
    assert os.listdir(tmp_path / "node1" / "teacher_cache")


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_run_in_bounded_time(tmp_path, synthetic_dir):
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)
    cfg = tiny_run(tmp_path, synthetic_dir, reward_kind="label", max_steps=50, eval_limit=8,
                   batch_size=8, minibatch_size=4, micro_batch_size=2, ddp_timeout_s=30.0)
    t0 = time.time()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", str(script),
                             *launcher_args(cfg, tmp_path / "run")],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "DIE_AT_STEP": "2",
                                 "WEIGHTS_DIR": str(tmp_path)})
    assert result.returncode != 0 and time.time() - t0 < 240
    assert "exitcode  : 17" in result.stdout + result.stderr  # torchrun names the rank that died
    assert not (tmp_path / "rank0.pt").exists()  # the surviving rank did not carry on to the end


def test_a_checkpoint_is_written_by_one_function_and_read_by_one(tmp_path, synthetic_dir):
    """checkpoint_dict names every key a checkpoint has, and read_checkpoint reads each of them
    back; a checkpoint from before a key existed reads with its default."""
    train_ppo.train(label_run(tmp_path, synthetic_dir, max_steps=1))
    saved = torch.load(tmp_path / "ckpt_000001.pt", weights_only=True)
    ckpt = run_management.read_checkpoint(saved)
    fields = {f.name for f in dataclasses.fields(ckpt)} - {"reference"}
    assert set(saved) == fields | {"reference_from", "reference_settings",
                                   "reference_fingerprint"}
    assert all(getattr(ckpt, key) is saved[key] for key in fields)
    assert ckpt.reference == (saved["reference_from"], saved["reference_settings"],
                              saved["reference_fingerprint"])
    defaults = {"config": lambda c: c.config == {}, "reward": lambda c: c.reward is None,
                "rollouts": lambda c: c.rollouts is None,
                "reference_settings": lambda c: c.reference.settings is None,
                "reference_fingerprint": lambda c: c.reference.fingerprint is None}
    for key, read_as_default in defaults.items():
        older = {k: v for k, v in saved.items() if k != key}
        assert read_as_default(run_management.read_checkpoint(older))
    with pytest.raises(KeyError):
        run_management.read_checkpoint({k: v for k, v in saved.items() if k != "optimizer"})


def test_the_checkpoint_file_has_one_home():
    """Its format mark and its name are spelled in weights.py alone, which its three readers go
    through (read_checkpoint, read_gpt2, benchmarks/same_training.py)."""
    sources = [os.path.join(REPO, name) for name in os.listdir(REPO) if name.endswith(".py")]
    sources += [os.path.join(REPO, "benchmarks", name)
                for name in os.listdir(os.path.join(REPO, "benchmarks")) if name.endswith(".py")]
    for path in sources:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if os.path.basename(path) != "weights.py":
            assert "gpt-ppo-checkpoint" not in text and not re.search(r"ckpt_[({]", text), path

def test_a_checkpoint_of_the_previous_release_resumes(tmp_path, synthetic_dir):
    """tests/fixtures/checkpoint_old_expected_exact.pt was written by the release before the value
    head had optimizer groups of its own (a scratch policy of 1 layer and 1 dim, adv_estimator
    expected, kl_estimator exact, 2 steps; Adam's moments left out to keep the file small). Its
    groups lack the value_head key, which set_learning_rate reads: resuming it ended in
    KeyError: 'value_head'."""
    shutil.copy(os.path.join(REPO, "tests", "fixtures", "checkpoint_old_expected_exact.pt"),
                tmp_path / "ckpt_000002.pt")
    cfg = tiny_run(tmp_path, synthetic_dir, init_from="resume", n_layer=1, n_head=1, n_embd=1,
                   block_size=64, reward_kind="label", adv_estimator="expected",
                   kl_estimator="exact", batch_size=4, minibatch_size=2, micro_batch_size=2,
                   ppo_epochs=1, learning_rate=1e-5, teacher_temperature=1.0, max_steps=3,
                   eval_limit=4, checkpoint_interval=1)
    train_ppo.train(cfg)
    assert [m["step"] for m in read_metrics(tmp_path)] == [3]
    resumed = run_management.read_checkpoint(torch.load(tmp_path / "ckpt_000003.pt",
                                                        weights_only=True))
    assert [g["value_head"] for g in resumed.optimizer["param_groups"]] == [False, False]
