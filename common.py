"""
Small pieces shared by the top-level scripts that belong to none of them: user-facing errors, atomic
file writes, checks of output paths, reading JSON, picking a device / autocast dtype, sums across
ranks, and progress bars.
"""

import contextlib
import errno
import json
import os
import resource
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist
from tqdm import tqdm

# Recent transformers releases use hub kernels by default: loading a model fetches and swaps in
# layers from the hub (through the `kernels` package), and importing some model classes (GPT-Neo's
# among them) asks the hub for flash-attention kernels, with three log lines when offline. The
# project never uses them: unless USE_HUB_KERNELS asks for them, it turns them off with
# transformers' own switch and hides the package, as if it were not installed. This must run before
# transformers imports a model class: every module of the project that imports one imports common
# first (tests/test_common.py checks each entry point).
if os.environ.get("USE_HUB_KERNELS", "").strip().upper() not in {"1", "ON", "YES", "TRUE"}:
    os.environ["USE_HUB_KERNELS"] = "0"
    sys.modules.setdefault("kernels", None)


class UserError(Exception):
    """A mistake the user can fix (bad path, bad config, bad file).
    Printed as one line, no stack trace."""


def run_cli(main, argv=None):
    """Run main(argv); a UserError becomes one line on stderr and exit status 2."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def warn(message):
    """A warning: on stderr, where a user piping a command's results does not expect it mixed in."""
    print(f"warning: {message}", file=sys.stderr)


# the --no-progress flag's help, the same in every CLI that draws a bar
PROGRESS_HELP = ("draw no progress bar on stderr (NO_PROGRESS=1 does so for every command); no "
                 "bar is drawn when stderr is not a terminal, nor on a rank other than 0")


def progress_bar(iterable=None, *, total=None, desc=None, unit="it", unit_scale=False, initial=0,
                 enabled=True):
    """A tqdm bar on stderr, with the rate and the time left, for work that takes minutes. Drawn
    only where someone watches: not when enabled is False (a CLI's --no-progress), when NO_PROGRESS
    is set (to anything but 0), when stderr is not a terminal (a log file or a pipe gets no bar
    lines), or on any rank but rank 0. Use it in a `with` block: the bar is cleared when the block
    ends, by an error too, so that an `error: ...` line never follows a half-drawn bar."""
    distributed = dist.is_available() and dist.is_initialized()
    # torchrun sets RANK before the process group starts
    first_rank = dist.get_rank() == 0 if distributed else os.environ.get("RANK", "0") == "0"
    watched = sys.stderr is not None and sys.stderr.isatty()
    off = (not (enabled and watched and first_rank)
           or os.environ.get("NO_PROGRESS", "").strip() not in ("", "0"))
    return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale, initial=initial,
                disable=off, leave=False, dynamic_ncols=True, file=sys.stderr)


def say(message):
    """print(message) on stdout, flushed, moving a progress bar drawn on stderr out of its way (the
    message goes above it): in a terminal the two share the screen."""
    with tqdm.external_write_mode():
        print(message, flush=True)


def first_line(error):
    """The first line of an exception's message, or its type name:
    enough to say why inside one line."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def shorten(text, width=80):
    """text, cut to width characters (a value pasted by mistake can be megabytes long)."""
    return text if len(text) <= width else text[:width - 3] + "..."


def current_umask():
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def give_normal_mode(path, directory=False):
    """Give `path` the permissions a file (or directory) created with open() / mkdir() would get
    under the user's umask: mkstemp and mkdtemp create theirs private (0600 / 0700), which would
    make every file we write private."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def _disk_is_full(error, directory):
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch.save's zip writer reports a failed write without an errno
    if isinstance(error, RuntimeError):
        try:
            stat = os.statvfs(directory)
        except OSError:
            return False
        return stat.f_bavail * stat.f_frsize < (1 << 20)
    return False


def _hit_the_file_size_limit(written):
    """Whether the file being written reached the process's file-size limit (ulimit -f)."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    try:
        return limit != resource.RLIM_INFINITY and os.path.getsize(written) >= limit // 2
    except OSError:
        return False


@contextlib.contextmanager
def write_errors_are_one_line(path, written=None):
    """A write in the block that fails becomes one line: UserError("no space left on device: PATH")
    for a full disk or quota, UserError("cannot write PATH (why)") for another failed write (a
    file-size limit, a read-only filesystem, an I/O error, permissions); any other error in the
    block (a download's, say) goes on as it is. `written`: the file the block writes, if not
    path. Enter it before removing any partial file, so that the free space still shows the disk
    was full."""
    try:
        yield
    except (OSError, RuntimeError) as e:  # torch.save's zip writer raises RuntimeError
        if _disk_is_full(e, os.path.dirname(os.path.abspath(path))):
            raise UserError(f"no space left on device: {path}") from None
        if isinstance(e, OSError) and e.errno in WRITE_ERRORS:
            raise UserError(f"cannot write {path} ({e.strerror})") from None
        if isinstance(e, RuntimeError) and _hit_the_file_size_limit(written or path):
            # what the zip writer saw, and does not say
            raise UserError(f"cannot write {path} ({os.strerror(errno.EFBIG)})") from None
        raise  # not a failed write: a download's error, say, is the caller's to explain


# a write that failed for one of these is one line; other errors in the block are not writes
# (EISDIR, ENOTDIR: a folder, or a file above the path, that appeared after the checks)
WRITE_ERRORS = (errno.EFBIG, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG,
                errno.EISDIR, errno.ENOTDIR)


def flush_to_disk(path):
    """fsync a file, or a directory's entries: before a rename publishes a new file, so that after
    a power cut the name holds the old file or the whole new one, never an empty one (which a
    filesystem may otherwise write its data after the rename). Best effort for directories, which
    some filesystems cannot sync."""
    directory = os.path.isdir(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; it replaces `path` only if the block finishes without
    error, so an interrupted write (a kill, a full disk, a power cut) never leaves a file that looks
    complete, and the old file stays."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")
    os.close(fd)
    try:
        give_normal_mode(tmp)
        with write_errors_are_one_line(path, tmp):
            yield tmp
            flush_to_disk(tmp)
            os.replace(tmp, path)
        flush_to_disk(directory)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_directory(path):
    """Yield a temporary directory next to `path`; when the block finishes without error it replaces
    `path` (the old directory is renamed aside first, then removed), so a crash leaves the old
    directory or the new one, never half of one. Everything in it gets the permissions of the user's
    umask."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(path) + ".")
    try:
        with write_errors_are_one_line(path):  # before the finally below frees the space
            yield tmp
        # mkdtemp and some writers (transformers) make theirs private
        for root, dirs, files in os.walk(tmp, topdown=False):  # a folder after what it holds
            for name in files:
                give_normal_mode(os.path.join(root, name))
                flush_to_disk(os.path.join(root, name))
            give_normal_mode(root, directory=True)
            flush_to_disk(root)
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(path) + ".old.")
            os.replace(path, os.path.join(old, "x"))
        os.replace(tmp, path)
        flush_to_disk(parent)
        if old:
            shutil.rmtree(old)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def _nearest_existing(path):
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_output_path(path, inputs=(), directory=False):
    """Refuse, before any work, an output path that could not be written at the end: an existing
    directory (or, with directory=True, an existing file), a path under a file, a place we cannot
    create files in, or the same file as one of `inputs` (the data or model it is computed from).
    None and missing inputs are skipped."""
    if path is None:
        return
    path = os.fspath(path)
    if not path.strip():
        raise UserError("an empty output path; give a file name")
    full = os.path.abspath(path)
    if not directory and os.path.isdir(full):
        raise UserError(f"{path}: an existing directory; give a file path to write")
    if directory and os.path.exists(full) and not os.path.isdir(full):
        raise UserError(f"{path}: an existing file, not a directory")
    for source in inputs:
        if (source is not None and os.path.exists(source)
                and os.path.realpath(source) == os.path.realpath(full)):
            raise UserError(f"{path}: the same file as {source}, which this command reads or "
                            "writes; give another output path")
    where = full if directory and os.path.isdir(full) else _nearest_existing(os.path.dirname(full))
    if not os.path.isdir(where):
        raise UserError(f"{path}: {where} is a file, so nothing can be written under it")
    try:  # permission bits do not stop root, and read-only mounts do not show in them: try it
        fd, probe = tempfile.mkstemp(dir=where, prefix=".write-check.")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{path}: cannot write in {where} ({e.strerror})") from None


@contextlib.contextmanager
def same_error_on_every_rank():
    """Under torch.distributed, a UserError raised in the block on any rank is raised on every rank
    when the block ends, so that an error on one rank never leaves the others waiting in a
    collective. Every rank must enter the block. Under NCCL, torch.cuda.set_device must have been
    called (all_gather_object works on the current GPU)."""
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


def looks_like_a_path(source):
    """Whether a model source that is not on disk was meant as a local path rather than a hub
    name ("org/name")."""
    return (source.startswith((".", "/", "~")) or source.count("/") > 1
            or source.endswith((".pt", ".pth", ".bin")))


def atomic_torch_save(obj, path):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_text(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def resolve_device(device="auto"):
    """"auto" -> cuda, mps or cpu, whichever this machine has; anything else is checked, so that
    asking for a device the machine lacks is one clear error before any model loads."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        kind = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"device {device!r}: not a device name; use auto, cpu, cuda, cuda:N "
                        "or mps") from None
    if kind.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r}: CUDA is not available on this machine; "
                            "use cpu or auto")
        if kind.index is not None and kind.index >= torch.cuda.device_count():
            raise UserError(f"device {device!r}: this machine has {torch.cuda.device_count()} "
                            "CUDA device(s), numbered from 0")
    elif kind.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {device!r}: MPS is not available on this machine; use cpu or auto")
    elif kind.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device {device!r}: this project runs on cpu, cuda or mps")
    return device


def autocast_dtype(dtype, device):
    """A run's autocast dtype from its dtype setting: auto = bfloat16 on CUDA, float32 elsewhere;
    float16 on CUDA only (its GradScaler is CUDA's)."""
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    if dtype == "float16" and not device.startswith("cuda"):
        raise UserError(f"dtype float16 needs a CUDA device, not {device}; use dtype=bfloat16 or "
                        "float32 (--dtype=...)")
    return dtype


def autocast(device, dtype):
    """torch.autocast for dtype ("bfloat16"/"float16") on `device`, or a no-op for "float32"."""
    if dtype in (None, "float32", torch.float32):
        return contextlib.nullcontext()
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def all_reduce_sum(*tensors):
    """Sum float tensors across ranks (no-op without torch.distributed)."""
    stacked = torch.stack([t.float().reshape(()) for t in tensors])
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
            stacked = stacked.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(stacked)
    return stacked.unbind(0)


def _parse_json(text, where):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg})") from None
    except RecursionError:  # json recurses once per level of nesting
        raise UserError(f"{where}: JSON nested too deeply to read") from None


def read_jsonl(path):
    """Yield (where, object) for each non-blank line of a JSON-lines file, where = "PATH, line N".
    A missing, unreadable or malformed file is a UserError that names the file and line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                yield f"{path}, line {n}", _parse_json(line, f"{path}, line {n}")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None


def read_json_objects(path):
    """Leniently, the JSON objects of a JSON-lines file whose last line a killed writer may have
    torn (a run's logs): -> (objects, numbers of the non-blank lines that are not a JSON object).
    Blank lines are skipped."""
    objects, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError):
                obj = None
            if isinstance(obj, dict):
                objects.append(obj)
            else:
                bad.append(n)
    return objects, bad


def read_json(path):
    """The object in a JSON file (a config, a model's config.json). A missing, unreadable, malformed
    or absurdly nested file is a UserError that names the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    return _parse_json(text, path)

