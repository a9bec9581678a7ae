"""
The benchmark scripts' arguments, checked before any work: bad input is one line, `error: ...`, and
exit status 2 (a UserError, through common.run_cli), as everywhere else in the project. A script
puts the repository on sys.path before importing this.
"""

import os

from common import UserError, check_output_path, read_jsonl


def at_least(args, low, *flags):
    """Each of the flags of args (argparse names) that is set must be at least low; for a list
    (nargs="+"), each of its values."""
    for flag in flags:
        value = getattr(args, flag)
        for v in value if isinstance(value, list) else [value]:
            if v is not None and v < low:
                raise UserError(f"--{flag} must be at least {low}, not {v}")


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
