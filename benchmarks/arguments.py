"""
The benchmark scripts' arguments, checked before any work: bad input is one line, `error: ...`, and
exit status 2 (a UserError, through common.run_cli), as everywhere else in the project. And the runs
they start: the project's scripts in a subprocess, a finished training run kept, its metrics read.
A script puts the repository on sys.path before importing this.
"""

import json
import os
import subprocess
import sys
import time

from common import UserError, atomic_write_text, check_output_path, read_json, read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def at_least(args, low, *flags):
    """Each of the flags (as written on the command line: "--rounds", "--batch-size") that is set
    in args must be at least low; for a list (nargs="+"), each of its values."""
    for flag in flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        for v in value if isinstance(value, list) else [value]:
            if v is not None and v < low:
                raise UserError(f"{flag} must be at least {low}, not {v}")


def checkout(path, flag="--before"):
    """-> the absolute path of another checkout of this project, which a script runs or imports."""
    full = os.path.abspath(path)
    if not all(os.path.isfile(os.path.join(full, name)) for name in ("train_ppo.py", "model.py")):
        raise UserError(f"{flag} {path} is not a checkout of this project (no train_ppo.py and "
                        "model.py there); make one with: git worktree add ../before <commit>")
    return full


def work_folder(path):
    """-> the absolute path of a folder the script can write its runs into (--work)."""
    try:
        check_output_path(path, directory=True)
    except UserError as e:
        raise UserError(f"--work {e}") from None
    return os.path.abspath(path)


def run_metrics(out_dir):
    """The lines of a run's metrics.jsonl, each an object with an integer step, in the file's order.
    A file that is missing, a directory, empty or torn (a run that was killed) is one line naming
    it."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if os.path.isdir(path):
        raise UserError(f"{path}: a directory, not a run's metrics")
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist")
    lines = []
    for where, line in read_jsonl(path):
        if not (isinstance(line, dict) and type(line.get("step")) is int):
            raise UserError(f"{where}: not a line of train_ppo.py's metrics (no integer step)")
        lines.append(line)
    if not lines:
        raise UserError(f"{path}: empty, no step logged")
    return lines


def run_script(*args):
    """Run one of the project's scripts (args: the script and its arguments) in the repository; a
    failure is a UserError naming the command, with the end of what it said."""
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"{' '.join(args)} failed: {proc.stderr.strip()[-1000:]}")


def train_once(out_dir, *args):
    """Run train_ppo.py with args (a config and overrides, --start_over=True among them) in out_dir
    unless a run with the same args finished there. A finished run's args and wall-clock seconds go
    to OUT_DIR/bench.json last, so a stopped benchmark goes on where it stopped, a run without that
    file starts over, and so does one whose settings changed since."""
    done = os.path.join(out_dir, "bench.json")
    args = ["train_ppo.py", *args, f"--out_dir={out_dir}"]
    try:
        saved = read_json(done) if os.path.isfile(done) else None
    except UserError:  # torn: train it again
        saved = None
    if isinstance(saved, dict) and saved.get("args") == args:
        return
    t0 = time.time()
    run_script(*args)
    atomic_write_text(done, json.dumps({"args": args, "seconds": time.time() - t0}) + "\n")
