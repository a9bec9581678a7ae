"""
Small pieces shared by the top-level scripts that belong to none of them: user-facing errors, atomic file
writes, and picking a device / autocast dtype.
"""

import contextlib
import json
import os
import sys
import tempfile

import torch


class UserError(Exception):
    """A mistake the user can fix (bad path, bad config, bad file). Printed as one line, no stack trace."""


def run_cli(main, argv=None):
    """Run main(argv); a UserError becomes one line on stderr and exit status 2."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; it replaces `path` only if the block finishes without error,
    so an interrupted write never leaves a file that looks complete."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def same_error_on_every_rank():
    """Under torch.distributed, a UserError raised in the block on any rank is raised on every rank when the block
    ends, so that an error on one rank never leaves the others waiting in a collective. Every rank must enter the
    block. Under NCCL, torch.cuda.set_device must have been called (all_gather_object works on the current GPU)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    error = None
    try:
        yield
    except UserError as e:
        if not distributed:
            raise
        error = e
    if distributed:
        messages = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(messages, None if error is None else str(error))
        first = next((m for m in messages if m is not None), None)
        if first is not None:
            raise UserError(first)


def first_line(error):
    """The first line of an exception's message (its type's name if it has none): for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def looks_like_a_path(source):
    """Whether a model source that is not on disk was meant as a local path rather than a hub name ("org/name")."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or source.endswith((".pt", ".pth", ".bin"))


def atomic_torch_save(obj, path):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_text(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def resolve_device(device="auto"):
    """"auto" -> cuda, mps or cpu, whichever this machine has; anything else is checked, so that asking for a
    device the machine lacks is one clear error before any model loads."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        kind = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"device {device!r}: not a device name; use auto, cpu, cuda, cuda:N or mps") from None
    if kind.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r}: CUDA is not available on this machine; use cpu or auto")
        if kind.index is not None and kind.index >= torch.cuda.device_count():
            raise UserError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                            f"numbered from 0")
    elif kind.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {device!r}: MPS is not available on this machine; use cpu or auto")
    elif kind.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device {device!r}: this project runs on cpu, cuda or mps")
    return device


def autocast(device, dtype):
    """torch.autocast for dtype ("bfloat16"/"float16") on `device`, or a no-op for "float32"."""
    if dtype in (None, "float32", torch.float32):
        return contextlib.nullcontext()
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def read_jsonl(path):
    """Yield (where, object) for each non-blank line of a JSON-lines file, where = "PATH, line N". A missing,
    unreadable or malformed file is a UserError that names the file and line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
                yield f"{path}, line {n}", obj
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
