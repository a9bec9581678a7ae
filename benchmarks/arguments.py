"""
The benchmark scripts' arguments, checked before any work: bad input is one line, `error: ...`, and
exit status 2 (a UserError, through common.run_cli), as everywhere else in the project. And the work
they do: the project's scripts in a subprocess, each stage (a training run, a model, predictions)
kept while its arguments and input files are those it was made from, a run's metrics read.
A script puts the repository on sys.path before importing this.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

from common import (UserError, atomic_write_text, check_output_path, read_json, read_jsonl,
                    shorten)

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


def run_script(*args, log, append=False):
    """Run one of the project's scripts (args: the script and its arguments) in the repository, its
    stderr kept whole in the file log (after what it holds, if append); a failure is a UserError
    in one line naming the command, with the script's last `error:` line (or its last line: a
    traceback's exception) and the log."""
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "a" if append else "w", encoding="utf-8") as stderr:
        start = stderr.tell()
        proc = subprocess.run([sys.executable, *args], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=stderr)
    if proc.returncode != 0:
        with open(log, encoding="utf-8", errors="replace") as f:
            f.seek(start)  # what this run said
            said = [line.strip() for line in f if line.strip()]
        last = next((line for line in reversed(said) if line.startswith("error: ")),
                    said[-1] if said else how_it_ended(proc.returncode))
        raise UserError(f"{' '.join(args)} failed: {shorten(last, 300)} (all it said: {log})")


def how_it_ended(returncode):
    """A process's exit status in words: a signal (a kill, or a script that stopped on one and
    exited with 128 + its number, as the training scripts do) is one that starting the benchmark
    again goes on from."""
    number = -returncode if returncode < 0 else returncode - 128
    try:
        name = signal.Signals(number).name
    except ValueError:
        return f"exit status {returncode}"
    how = f"killed by {name}" if returncode < 0 else f"stopped by {name} (exit status {returncode})"
    return f"{how}; start the benchmark again to go on from its last checkpoint"


def fingerprint(path):
    """sha256 of a file, or of a directory's files (each one's name and bytes): a model retrained
    or a data file rewritten at the same path is told apart. None for a path that is not there (a
    hub name, or a file the script reading it will name)."""
    from weights import file_sha256  # weights imports transformers: only when a file is read
    if not os.path.exists(path):
        return None
    if not os.path.isdir(path):
        return file_sha256(path)
    files = sorted(os.path.relpath(os.path.join(root, name), path)
                   for root, _, names in os.walk(path) for name in names)
    return hashlib.sha256(json.dumps(
        [(name, file_sha256(os.path.join(path, name))) for name in files]).encode()).hexdigest()


def stage_key(args, inputs=()):
    """What a benchmark's stage comes from: its arguments, and the fingerprint of each file or
    directory it reads (inputs)."""
    key = {"args": [str(a) for a in args]}
    if inputs:  # a record without inputs (a run of the demo task, which it builds) stays valid
        key["inputs"] = {os.path.abspath(p): fingerprint(p) for p in inputs}
    return key


def read_record(record):
    """A stage's record (a JSON object), or None where it is missing, torn or not an object."""
    try:
        saved = read_json(record) if os.path.isfile(record) else None
    except UserError:  # torn
        return None
    return saved if isinstance(saved, dict) else None


def made_from(record, key):
    """Whether the stage whose record this is finished from key: same arguments, inputs
    unchanged."""
    return same_key(read_record(record), key)


def same_key(saved, key):
    """Whether a stage's record (or None) holds key: the same arguments and input fingerprints."""
    return saved is not None and all(saved.get(k) == v for k, v in key.items())


def make_once(output, key, make, record=None, since=None):
    """make() (a stage of a benchmark: a run, a model, predictions) unless output is there and its
    record (by default OUTPUT.made.json) says it was made from key. The record goes before make()
    starts and comes back, with the seconds it took (since the time since, if given: a stage
    continued), when it finishes, so a stage that stopped, or whose arguments or input files
    changed since, is made again, and a stopped benchmark goes on where it stopped.
    -> whether it made output."""
    record = record or output.rstrip(os.sep) + ".made.json"
    if os.path.exists(output) and made_from(record, key):
        return False
    if os.path.lexists(record):
        os.remove(record)  # atomic: the old record or none, never one that vouches for half a stage
    t0 = time.time() if since is None else since
    make()
    atomic_write_text(record, json.dumps({**key, "seconds": time.time() - t0}) + "\n")
    return True


def train_once(out_dir, *args, inputs=(), script="train_ppo.py"):
    """Run script (train_ppo.py, or train_sft.py, which reads the same settings) with args (a config
    and overrides, --start_over=True among them) in out_dir unless a run with the same args, and the
    same files as inputs (its data, starting model and judge), finished there: a stage whose record
    is OUT_DIR/bench.json (with the run's wall-clock seconds), and whose stderr is kept in
    OUT_DIR.log. A run of the same args and inputs that stopped after a checkpoint goes on from it
    (--init_from=resume); its seconds are those up to that checkpoint and those after."""
    args = [script, *args, f"--out_dir={out_dir}"]
    key = stage_key(args, inputs)
    record = os.path.join(out_dir, "bench.json")
    if os.path.exists(out_dir) and made_from(record, key):
        return
    # OUT_DIR.started.json: the stage's key and when it started (less the time its earlier parts
    # spent up to the checkpoint it goes on from); beside out_dir, which start_over empties
    started = out_dir.rstrip(os.sep) + ".started.json"
    since = resume_point(out_dir, started, key)
    resume = since is not None
    if not resume:
        since = time.time()
        atomic_write_text(started, json.dumps({**key, "started": since}) + "\n")
    log = out_dir.rstrip(os.sep) + ".log"
    make_once(out_dir, key, lambda: run_script(*args, *(["--init_from=resume"] * resume), log=log,
                                               append=resume),
              record=record, since=since)


def resume_point(out_dir, started, key):
    """For a run of key that stopped in out_dir: the time it started, moved on by the time lost
    after its last checkpoint (so that the time from there to the end is the run's own), with
    OUT_DIR.started.json rewritten to it; None if there is no such run to go on with (another
    run's record, no checkpoint, or one at the run's last step)."""
    from weights import step_checkpoints  # weights imports transformers: only when a run is read
    saved = read_record(started)
    checkpoints = step_checkpoints(out_dir)
    if not checkpoints or not same_key(saved, key):
        return None
    step, checkpoint = checkpoints[-1]
    config = read_record(os.path.join(out_dir, "train_config.json")) or {}
    if not isinstance(saved.get("started"), (int, float)) or step >= config.get("max_steps", 0):
        return None
    since = time.time() - (os.path.getmtime(checkpoint) - saved["started"])
    atomic_write_text(started, json.dumps({**key, "started": since}) + "\n")
    return since


def finished(output, record=None):
    """For --reuse: the record of a stage that finished (as make_once keeps it) from the files its
    inputs still hold. A stage stopped, or made before one of its inputs changed (a rerun with other
    arguments that stopped midway), is one line naming it."""
    record = record or output.rstrip(os.sep) + ".made.json"
    saved = read_record(record) if os.path.exists(output) else None
    if saved is None:
        raise UserError(f"{output}: unfinished (no {os.path.basename(record)}, which a finished "
                        "stage leaves)")
    inputs = saved.get("inputs") if isinstance(saved.get("inputs"), dict) else {}
    changed = [path for path, made in inputs.items() if fingerprint(path) != made]
    if changed:
        raise UserError(f"{output}: made from another {changed[0]} than the one there now")
    return saved


def finished_seconds(out_dir):
    """The wall-clock seconds of a run train_once finished in out_dir from its inputs as they are
    (finished()); one line otherwise."""
    seconds = finished(out_dir, os.path.join(out_dir, "bench.json")).get("seconds")
    if not isinstance(seconds, (int, float)):
        raise UserError(f"{os.path.join(out_dir, 'bench.json')}: no seconds recorded")
    return seconds
