"""A run's files are never mixed or lost, and stops say what happened (run_management.py)."""

import errno
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

import run_management
import train_ppo
from common import UserError
from test_train_faults import label_run
from test_train_ppo import REPO, read_metrics


def cli_args(cfg):
    return [f"--{k}={v}" for k, v in vars(cfg).items()]


def cli_script(tmp_path, body):
    """A script that runs train_ppo.py's command line after `body` (which breaks something)."""
    script = tmp_path / "run.py"
    script.write_text(f"import os, signal, sys\nsys.path.insert(0, {REPO!r})\n"
                      "import common, run_management, train_ppo\n"
                      f"{body}\ncommon.run_cli(train_ppo.main)\n")
    return script


def test_a_second_run_into_a_busy_out_dir_is_refused_before_it_touches_anything(
        tmp_path, synthetic_dir, monkeypatch):
    first = run_management.Distributed(ddp=False, rank=0, local_rank=0, world_size=1, device="cpu")
    loads = []
    monkeypatch.setattr(train_ppo, "load_data", lambda *a: loads.append(1))
    with run_management.out_dir_lock(str(tmp_path), first):  # a run going on in another process
        (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
        with pytest.raises(UserError, match=rf"out_dir {tmp_path} is in use by another run "
                                            rf"\(process {os.getpid()}\)"):
            train_ppo.train(label_run(tmp_path, synthetic_dir, start_over=True))
    assert not loads and (tmp_path / "metrics.jsonl").read_text() == '{"step": 0}\n'
    assert not (tmp_path / "previous").exists()  # start_over moved nothing


def test_a_lock_left_by_a_killed_run_is_no_dead_end(tmp_path, synthetic_dir):
    proc = subprocess.Popen([sys.executable, "train_ppo.py",
                             *cli_args(label_run(tmp_path, synthetic_dir, max_steps=10000))],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (tmp_path / "ckpt_000001.pt").exists():
        time.sleep(0.2)
    # the first run holds out_dir: a second process is refused, in one line
    busy = subprocess.run([sys.executable, "train_ppo.py",
                           *cli_args(label_run(tmp_path, synthetic_dir, init_from="resume"))],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    proc.kill()
    proc.communicate()
    assert busy.returncode == 2
    assert busy.stderr.strip() == (f"error: out_dir {tmp_path} is in use by another run (process "
                                   f"{proc.pid}); wait for it to end, or choose another out_dir")
    assert (tmp_path / ".lock").exists()  # left by the killed run, and no longer held
    resumed = train_ppo.train(label_run(tmp_path, synthetic_dir, init_from="resume",
                                        max_steps=read_metrics(tmp_path)[-1]["step"] + 1))
    assert resumed["step"] > 1


@pytest.mark.parametrize("kind, message", [
    ("a symbolic link", "a symbolic link"), ("a dangling symbolic link", "a symbolic link"),
    ("a hard link", "a hard link"), ("a directory", "a directory"),
    ("a FIFO", "not a regular file")])
def test_a_lock_file_that_is_not_a_regular_file_is_refused_and_never_written_through(
        tmp_path, synthetic_dir, monkeypatch, kind, message):
    """A link planted as out_dir/.lock in a shared folder would make the run truncate the file it
    points to and write its process id there, even a run that is then refused."""
    victim = tmp_path / "someone_s_file"
    victim.write_text("precious\n")
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    lock = out_dir / ".lock"
    if kind == "a symbolic link":
        lock.symlink_to(victim)
    elif kind == "a dangling symbolic link":
        lock.symlink_to(tmp_path / "created_through_the_link")
    elif kind == "a hard link":
        os.link(victim, lock)
    elif kind == "a directory":
        lock.mkdir()
    else:
        os.mkfifo(lock)
    loads = []
    monkeypatch.setattr(train_ppo, "load_data", lambda *a: loads.append(1))
    with pytest.raises(UserError, match=rf"^{lock}: {message}, where the run keeps its lock file; "
                                        "remove it, or choose another out_dir$"):
        train_ppo.train(label_run(out_dir, synthetic_dir))
    assert not loads and victim.read_text() == "precious\n"
    assert not (tmp_path / "created_through_the_link").exists()


def test_a_lock_file_that_cannot_be_opened_is_named(tmp_path, monkeypatch):
    lock = str(tmp_path / ".lock")

    def refused(path, *args):  # what a .lock of another user, mode 600, gives (root opens it)
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    monkeypatch.setattr(run_management.os, "open", refused)
    with pytest.raises(UserError, match=rf"^{lock}: cannot open the run's lock file \(Permission "
                                        r"denied\); make out_dir writable, or choose another"):
        run_management.open_lock_file(lock)


def test_an_eval_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, synthetic_dir,
                                                                         monkeypatch):
    (tmp_path / "eval").write_text("not a folder")
    loads = []
    monkeypatch.setattr(train_ppo, "load_data", lambda *a: loads.append(1))
    with pytest.raises(UserError, match="eval: an existing file, not a directory"):
        train_ppo.train(label_run(tmp_path, synthetic_dir))
    assert not loads


def test_an_output_that_fails_mid_run_does_not_cost_the_step_s_weights(tmp_path, synthetic_dir,
                                                                      monkeypatch):
    real = run_management.write_predictions

    def fails_at_step_2(path, predictions):
        if path.endswith("step_000002.jsonl"):
            raise UserError(f"cannot write {path} (Read-only file system)")
        real(path, predictions)

    monkeypatch.setattr(run_management, "write_predictions", fails_at_step_2)
    with pytest.raises(UserError, match=r"step_000002.jsonl \(Read-only file system\)"):
        train_ppo.train(label_run(tmp_path, synthetic_dir, max_steps=4, eval_interval=2,
                                  checkpoint_interval=100))
    # the step's weights were saved before the error; a resume redoes the evaluation
    assert read_metrics(tmp_path)[-1]["step"] == 2
    assert torch.load(tmp_path / "ckpt_000002.pt", weights_only=True)["step"] == 2
    monkeypatch.undo()
    resumed = train_ppo.train(label_run(tmp_path, synthetic_dir, max_steps=4, eval_interval=2,
                                        checkpoint_interval=100, init_from="resume"))
    assert resumed["step"] == 4 and (tmp_path / "eval" / "step_000002.jsonl").exists()


def test_a_folder_in_the_way_of_an_evaluation_stops_the_run_after_the_step_s_checkpoint(
        tmp_path, synthetic_dir, monkeypatch):
    """A folder appears where step 2's predictions go while the run is at step 1: the write fails
    in one line, after the step's checkpoint; a resume names the folder before any work, whether
    the resume would write that file again or remove it."""
    real_update = train_ppo.ppo_update
    in_the_way = tmp_path / "eval" / "step_000002.jsonl"

    def makes_a_folder(*args, **kwargs):
        in_the_way.mkdir(exist_ok=True)
        return real_update(*args, **kwargs)

    monkeypatch.setattr(train_ppo, "ppo_update", makes_a_folder)
    common = dict(max_steps=4, eval_interval=2, checkpoint_interval=100)
    with pytest.raises(UserError, match=rf"^cannot write {in_the_way} \(Is a directory\)$"):
        train_ppo.train(label_run(tmp_path, synthetic_dir, **common))
    assert torch.load(tmp_path / "ckpt_000002.pt", weights_only=True)["step"] == 2
    monkeypatch.undo()
    loads = []
    monkeypatch.setattr(train_ppo, "load_data", lambda *a: loads.append(1))
    for step in (2, 4):  # redone by the resume; dropped by it
        folder = tmp_path / "eval" / f"step_00000{step}.jsonl"
        os.replace(in_the_way, folder)
        in_the_way = folder
        with pytest.raises(UserError, match=rf"^{folder}: a directory, where the run keeps the "
                                            rf"predictions of step {step}; move it out of "):
            train_ppo.train(label_run(tmp_path, synthetic_dir, init_from="resume", **common))
    assert not loads
    monkeypatch.undo()
    folder.rmdir()
    resumed = train_ppo.train(label_run(tmp_path, synthetic_dir, init_from="resume", **common))
    assert resumed["step"] == 4 and (tmp_path / "eval" / "step_000002.jsonl").is_file()


def test_a_file_size_limit_is_one_line_and_the_write_stays_atomic(tmp_path, synthetic_dir):
    """A checkpoint of the tiny policy with its optimizer is over 20 MB; every other file the run
    writes is far smaller."""
    limit = 20 * 2**20
    proc = subprocess.run(
        [sys.executable, "train_ppo.py", *cli_args(label_run(tmp_path, synthetic_dir))],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip() == (f"error: cannot write {tmp_path / 'ckpt_000001.pt'} "
                                   "(File too large)")
    assert not [name for name in os.listdir(tmp_path) if name.endswith((".pt", ".tmp"))]


def test_a_checkpoint_whose_name_disagrees_with_its_step_is_named(tmp_path, synthetic_dir):
    train_ppo.train(label_run(tmp_path / "other", synthetic_dir, max_steps=1))
    train_ppo.train(label_run(tmp_path / "run", synthetic_dir, max_steps=2))
    # another run's step-1 checkpoint copied in as step 3
    os.replace(tmp_path / "other" / "ckpt_000001.pt", tmp_path / "run" / "ckpt_000003.pt")
    with pytest.raises(UserError, match=r"ckpt_000003.pt: holds step 1, not the step its name "
                                        r"says, so it is not this run's checkpoint"):
        train_ppo.train(label_run(tmp_path / "run", synthetic_dir, max_steps=5,
                                  init_from="resume"))


def wait_for_step(out_dir, step, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (out_dir / "metrics.jsonl").exists() and len(read_metrics(out_dir)) > step:
            return
        time.sleep(0.2)


def test_a_stop_by_signal_exits_with_128_plus_the_signal(tmp_path, synthetic_dir):
    cfg = label_run(tmp_path, synthetic_dir, max_steps=10000, checkpoint_interval=1000)
    proc = subprocess.Popen([sys.executable, "train_ppo.py", *cli_args(cfg)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path, 2, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "received signal 2: checkpoint written" in out and err == ""


def test_a_second_signal_during_the_save_is_one_line_and_the_save_stays_atomic(tmp_path,
                                                                              synthetic_dir):
    # both signals arrive while the checkpoint of step 2 is being written
    body = ("real = run_management.atomic_torch_save\n"
            "def interrupted(obj, path):\n"
            "    if path.endswith('ckpt_000002.pt'):\n"
            "        with common.atomic_path(path) as tmp:\n"
            "            open(tmp, 'wb').write(b'half of a checkpoint')\n"
            "            os.kill(os.getpid(), signal.SIGTERM)\n"
            "            os.kill(os.getpid(), signal.SIGTERM)\n"
            "    real(obj, path)\n"
            "run_management.atomic_torch_save = interrupted\n")
    script = cli_script(tmp_path, body)
    proc = subprocess.run([sys.executable, str(script),
                           *cli_args(label_run(tmp_path / "run", synthetic_dir, max_steps=5))],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert proc.stderr.strip() == ("error: stopped at once by a second signal (15); the last "
                                   "complete checkpoint is kept: resume with --init_from=resume")
    files = os.listdir(tmp_path / "run")
    assert "ckpt_000001.pt" in files and "ckpt_000002.pt" not in files
    assert not [name for name in files if name.endswith(".tmp")]


def run_patched(tmp_path, synthetic_dir, body):
    """A label run into tmp_path/run from the command line, with body (Python) run first."""
    return subprocess.run([sys.executable, str(cli_script(tmp_path, body)),
                           *cli_args(label_run(tmp_path / "run", synthetic_dir))],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def test_a_second_signal_before_the_first_checkpoint_says_there_is_nothing_to_resume(
        tmp_path, synthetic_dir):
    # both signals arrive while step 0's evaluation is being written
    body = ("real = run_management.write_predictions\n"
            "def interrupted(path, predictions):\n"
            "    if path.endswith('step_000000.jsonl'):\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "    real(path, predictions)\n"
            "run_management.write_predictions = interrupted\n")
    proc = run_patched(tmp_path, synthetic_dir, body)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert proc.stderr.strip() == ("error: stopped at once by a second signal (15) before the "
                                   "run's first checkpoint, so there is nothing to resume: start "
                                   "it again with --start_over=True")
    assert not [name for name in os.listdir(tmp_path / "run") if name.endswith(".pt")]
    # what it says to do works
    assert train_ppo.train(label_run(tmp_path / "run", synthetic_dir, start_over=True,
                                     max_steps=1))["step"] == 1


def test_ctrl_c_during_the_setup_is_one_line_and_exit_130(tmp_path, synthetic_dir):
    body = ("real = train_ppo.load_data\n"
            "def interrupted(*args):\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    return real(*args)\n"
            "train_ppo.load_data = interrupted\n")
    proc = run_patched(tmp_path, synthetic_dir, body)
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr[-3000:]
    assert proc.stderr == ("error: interrupted by signal 2 during the setup, before the first "
                           "step; nothing was trained: run the command again\n")


def test_an_evaluation_skipped_by_a_stop_is_done_on_resume(tmp_path, synthetic_dir, monkeypatch):
    real_update = train_ppo.ppo_update
    calls = []

    def signalled_in_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_update(*args, **kwargs)

    monkeypatch.setattr(train_ppo, "ppo_update", signalled_in_step_2)
    common = dict(eval_interval=2, checkpoint_interval=100, max_steps=4)
    stopped = train_ppo.train(label_run(tmp_path, synthetic_dir, **common))
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    assert stopped["step"] == 2 and stopped["stopped_by"] == signal.SIGTERM
    assert not (tmp_path / "eval" / "step_000002.jsonl").exists()
    monkeypatch.undo()
    train_ppo.train(label_run(tmp_path, synthetic_dir, init_from="resume", **common))
    assert (tmp_path / "eval" / "step_000002.jsonl").exists()
    logged = {m["step"]: m for m in read_metrics(tmp_path)}
    assert sorted(logged) == [0, 1, 2, 3, 4]  # the evaluation joined step 2's line
    assert "eval/acc_norm" in logged[2] and "reward" in logged[2]
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["best_acc_norm"] == max(logged[s]["eval/acc_norm"] for s in (2, 4))


def test_a_rank_that_dies_is_named_in_one_line_by_the_survivor(tmp_path, synthetic_dir):
    body = ("if os.environ['RANK'] == '1':\n"
            "    real, calls = train_ppo.ppo_update, []\n"
            "    def dying(*args, **kwargs):\n"
            "        calls.append(1)\n"
            "        if len(calls) == 2:\n"
            "            os._exit(17)\n"
            "        return real(*args, **kwargs)\n"
            "    train_ppo.ppo_update = dying\n")
    script = cli_script(tmp_path, body)
    cfg = label_run(tmp_path / "run", synthetic_dir, max_steps=50, batch_size=8, minibatch_size=4,
                    micro_batch_size=2, ddp_timeout_s=30.0)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script), *cli_args(cfg)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: rank 0: rank 1 stopped (its process is gone), so the run cannot go on"), \
        proc.stderr[-3000:]
    # no traceback from the ranks (torchrun's own report of the failed rank follows)
    ours = [str(script)] + [os.path.join(REPO, name) for name in ("train_ppo.py",
                                                                 "run_management.py")]
    assert not any(f'{path}", line' in proc.stderr for path in ours)


@pytest.mark.parametrize("value", ["-" * 100_000 + "1", "[" * 5000 + "]" * 5000])
def test_pathological_config_values_are_one_short_line(tmp_path, value):
    config = tmp_path / "deep.py"
    config.write_text(f"learning_rate = {value}\n")
    for args in ([str(config)], [f"--learning_rate={value}"]):
        proc = subprocess.run([sys.executable, "train_ppo.py", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ")
        assert proc.stderr.count("\n") == 1 and len(proc.stderr) < 300, proc.stderr[-500:]


def test_start_over_moves_the_old_run_s_report_with_the_rest(tmp_path, synthetic_dir):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.md").write_text("the old run's report")
    run = run_management.Distributed(ddp=False, rank=0, local_rank=0, world_size=1, device="cpu")
    cfg = run_management.absolute_paths(label_run(tmp_path, synthetic_dir, start_over=True))
    run_management.prepare_out_dir(cfg, run, print)
    (previous,) = (tmp_path / "previous").iterdir()
    assert (previous / "report" / "report.md").read_text() == "the old run's report"
    assert not (tmp_path / "report").exists() and (previous / "metrics.jsonl").exists()
