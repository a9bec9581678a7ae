"""
Run management for train_ppo.py: everything a training run does besides PPO itself.

- config paths: the config's folders and sources made absolute, local sources checked (config.py
  reads the config itself).
- processes: torchrun's DDP setup, seeding.
- out_dir: checked before any work, another run's files refused (or moved aside with start_over),
  torn writes of a killed run cleaned up.
- state: TrainingState holds what a checkpoint needs to resume exactly (step, data position,
  optimizer, KL controller, reward statistics, rollout caches, random generators, best score);
  checkpoint_dict writes a checkpoint, every key named there, and read_checkpoint reads it back
  (the file itself, its name and the policy's part: weights.py).
- the end of each step (RunManager.end_of_step): the console line, metrics.jsonl, samples, the
  HellaSwag evaluation, checkpoints and best.pt, and stopping on a signal.

It never imports train_ppo.py: the config class and the objects it saves are passed in.
"""

import collections
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import os
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import stat
import time
import typing
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

import synthetic
from common import (UserError, all_reduce_sum, atomic_torch_save, atomic_write_text,
                    autocast_dtype, check_output_path, first_line, looks_like_a_path,
                    read_json_objects, resolve_device, same_error_on_every_rank, shorten, warn,
                    write_errors_are_one_line)
from config import marked
from hellaswag import evaluate, split_path, write_predictions
from reward import REWARD_KINDS
from weights import (check_gguf, checkpoint_path, is_checkpoint, is_gguf, load_checkpoint,
                     policy_part, step_checkpoints)


def absolute_paths(cfg):
    """The config with its folders and every source that exists made absolute (the settings
    marked path="folder" or "source", config.setting): what a run saves (train_config.json, the
    config and reference source in each checkpoint) then works from any working directory. A
    leading ~ is the home folder, which no shell expands in --key=~/x or in a config file."""
    folders, sources = marked(cfg, "path", "folder"), marked(cfg, "path", "source")
    cfg = dataclasses.replace(cfg, **{key: os.path.expanduser(getattr(cfg, key))
                                      for key in folders + sources
                                      if getattr(cfg, key).startswith("~")})
    absolute = {key: os.path.abspath(getattr(cfg, key)) for key in folders if getattr(cfg, key)}
    absolute |= {key: os.path.abspath(getattr(cfg, key)) for key in sources
                 if getattr(cfg, key) and os.path.exists(getattr(cfg, key))}
    return dataclasses.replace(cfg, **absolute)


def check_sources(cfg):
    """A model or data source meant as a local path that is not there: one line now, not after the
    data, the demo task or another model has been prepared."""
    used = {"init_from": cfg.init_from not in ("resume", "scratch", "synthetic"),
            "train_data": not cfg.synthetic, "val_data": not cfg.synthetic,
            "reward_model": not cfg.synthetic and REWARD_KINDS[cfg.reward_kind].judge}
    for key, is_used in used.items():
        source = getattr(cfg, key)
        data_spec = key.endswith("_data") and source.startswith("hellaswag:")
        if (is_used and not data_spec and not os.path.exists(source)
                and (looks_like_a_path(source) or key.endswith("_data"))):
            raise UserError(f"config: {key}={source!r}: no such file or directory")
        if is_used and is_gguf(source):  # its header, before the data and the other model
            check_gguf(source)

# --------------------------------------------------------------------------------------------------
# processes: DDP, seeds


@dataclass
class Distributed:
    """Where this process sits in the run: torchrun's RANK / LOCAL_RANK / WORLD_SIZE, or one
    process."""
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: str  # this process's device: cpu, or the one GPU it owns
    dtype: str = "float32"  # its autocast dtype: the config's on CUDA, float32 elsewhere

    @property
    def master_process(self):  # writes checkpoints, metrics and exports
        return self.rank == 0

    @property
    # prepares this node's data, which another node's filesystem may not share
    def local_master(self):
        return self.local_rank == 0

    def barrier(self):
        if self.ddp:
            dist.barrier()

    def log(self, *args):
        """print, on the master process alone."""
        if self.master_process:
            print(*args)

    def warn(self, message):
        """A warning (on stderr), from the master process alone."""
        if self.master_process:
            warn(message)


def setup_distributed(cfg):
    # a device this machine lacks is an error here, on every rank
    requested = resolve_device(cfg.device)
    if int(os.environ.get("RANK", -1)) == -1:
        device = requested
        if device == "cuda":
            device = f"cuda:{torch.cuda.current_device()}"  # set_device needs an index
        if device.startswith("cuda"):
            torch.cuda.set_device(device)  # memory stats and synchronize follow the chosen GPU
        return Distributed(ddp=False, rank=0, local_rank=0, world_size=1, device=device,
                           dtype=autocast_dtype(cfg.dtype, device))
    rank, local_rank, world_size = (int(os.environ[k])
                                    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    nccl = requested.startswith("cuda")
    device = resolve_device(f"cuda:{local_rank}") if nccl else "cpu"  # one GPU per process
    # a collective waiting on a rank that died fails after ddp_timeout_s instead of hanging
    timeout = datetime.timedelta(seconds=cfg.ddp_timeout_s)
    dist.init_process_group(backend="nccl" if nccl else "gloo", timeout=timeout)
    if nccl:
        torch.cuda.set_device(device)
    # where each rank runs, so that the survivors of a rank that dies can name it (lost_ranks)
    process_store().set(f"gpt2_ppo/rank{rank}", f"{socket.gethostname()} {os.getpid()}")
    return Distributed(ddp=True, rank=rank, local_rank=local_rank, world_size=world_size,
                       device=device, dtype=autocast_dtype(cfg.dtype, device))


def process_store():
    return dist.distributed_c10d._get_default_store()  # the rendezvous' key-value store


def lost_rank_error(run, error):
    """A collective that failed because another rank is gone (killed, crashed, out of memory), as
    one line naming the lost rank where it ran on this machine; else None."""
    text = first_line(error)
    if not (run.ddp and isinstance(error, RuntimeError)
            and any(s in text for s in ("gloo", "NCCL", "Connection", "Timed out", "timed out"))):
        return None
    lost = lost_ranks(run)
    who = (f"rank {', '.join(map(str, lost))} stopped (its process is gone)" if lost
           else "another rank stopped answering")
    return UserError(f"rank {run.rank}: {who}, so the run cannot go on ({text[:200]}); the last "
                     "checkpoint is kept: resume with --init_from=resume")


def lost_ranks(run):
    """The ranks on this machine whose process has ended (best effort: [] when unknown)."""
    lost = []
    try:
        store = process_store()
        for rank in range(run.world_size):
            host, pid = store.get(f"gpt2_ppo/rank{rank}").decode().split()
            if host == socket.gethostname() and not process_alive(int(pid)):
                lost.append(rank)
    except Exception:  # the store went with the lost rank, or is not there
        return []
    return lost


def process_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


def seed_everything(seed, run):
    """Seed the global RNGs per rank. -> (generator for sampling actions, generator for minibatch
    order)."""
    torch.manual_seed(seed + run.rank)
    np.random.seed(seed + run.rank)
    random.seed(seed + run.rank)
    sample_generator = torch.Generator(device=run.device).manual_seed(seed * 1000 + run.rank)
    shuffle_generator = torch.Generator().manual_seed(seed * 1000 + 500 + run.rank)
    return sample_generator, shuffle_generator

def synthetic_dir(cfg):
    return os.path.abspath(cfg.synthetic_dir or os.path.join(cfg.out_dir, "synthetic"))


# --------------------------------------------------------------------------------------------------
# out_dir and checkpoints


def gather_rng_states(sample_generator, shuffle_generator, world_size):
    """Every rank's RNG states (rank order), so that a resumed run samples exactly what an
    uninterrupted one would."""
    state = {"sample": sample_generator.get_state(), "shuffle": shuffle_generator.get_state(),
             "torch": torch.get_rng_state(), "device_type": sample_generator.device.type}
    if world_size == 1:
        return [state]
    states = [None] * world_size
    dist.all_gather_object(states, state)
    return states


def save_checkpoint(out_dir, step, ckpt, keep_last, best):
    """ckpt_<step>.pt written atomically; older step checkpoints beyond keep_last removed; best.pt
    linked. A later step's file (one a resume passed over as damaged) is neither counted nor
    removed: counting it could remove the checkpoint just written."""
    path = checkpoint_path(out_dir, step)
    atomic_torch_save(ckpt, path)
    older = [old for old_step, old in step_checkpoints(out_dir) if old_step < step]
    for old in older[:max(len(older) - (keep_last - 1), 0)]:
        os.remove(old)
    if best:  # a hard link: the step file can be rotated away, best.pt stays
        tmp = os.path.join(out_dir, ".best.pt.tmp")
        if os.path.exists(tmp):
            os.remove(tmp)
        try:
            os.link(path, tmp)
        except OSError:
            atomic_torch_save(ckpt, tmp)
        os.replace(tmp, os.path.join(out_dir, "best.pt"))
    return path


def rewrite_logged_lines(path, change, warn=warn):
    """Rewrite the JSON lines of a run's log atomically, each record through change (-> the new
    record, or None to drop it). A line that does not parse (a kill mid-write tears the last one)
    is dropped with a warning."""
    records, bad = read_json_objects(path)
    for n in bad:
        warn(f"{path}, line {n}: not a JSON line (torn by a kill?), dropped")
    changed = (change(r) for r in records)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in changed if r is not None))


def add_to_logged_step(path, step, fields, warn=warn):
    """Merge fields into the line of path whose "step" is step."""
    rewrite_logged_lines(path, lambda r: {**r, **fields} if r.get("step") == step else r, warn)


def drop_lines_after(path, step, warn=warn):
    """Keep the JSON lines of path whose "step" is at most step."""
    if os.path.exists(path):
        rewrite_logged_lines(path, lambda r: r if r.get("step", 0) <= step else None, warn)


# and ckpt_*.pt
RUN_FILES = ("metrics.jsonl", "samples.jsonl", "train_config.json", "best.pt", "eval", "hf",
             "report")


def remove_torn_writes(out_dir, restore_export=False):
    """Temporary files that a killed atomic write left behind (.NAME.XXXX.tmp), and the export's
    temporary folders (.hf.XXXX, .hf.old.XXXX, as large as the model); they never replaced
    anything. A kill between the export's two renames leaves no hf/ and the previous export in
    .hf.old.XXXX/x: restore_export (a resume) puts that one back."""
    export = os.path.join(out_dir, "hf")
    for folder in (out_dir, os.path.join(out_dir, "eval")):
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            path = os.path.join(folder, name)
            if name.startswith(".") and name.endswith(".tmp") and os.path.isfile(path):
                os.remove(path)
            elif folder == out_dir and name.startswith(".hf.") and os.path.isdir(path):
                displaced = os.path.join(path, "x")
                if (restore_export and name.startswith(".hf.old.") and os.path.isdir(displaced)
                        and not os.path.exists(export)):
                    os.replace(displaced, export)
                shutil.rmtree(path)


def log_changed_settings(saved, cfg, run):
    """Say which settings of a resumed run differ from its checkpoint's: a note for the run's
    management (the settings marked run=True, config.setting: they leave the training the same),
    a warning for the rest, which makes another experiment from there on (the state that depends
    on them, such as cached reference scores, is checked where it is restored). init_from and
    start_over always differ on a resume: not mentioned at all."""
    changed = {key: f"{key} {saved[key]!r} -> {value!r}"
               for key, value in dataclasses.asdict(cfg).items()
               if key in saved and saved[key] != value and key not in ("init_from", "start_over")}
    run_settings = marked(cfg, "run")
    notes = [text for key, text in changed.items() if key in run_settings]
    warnings = [text for key, text in changed.items() if key not in run_settings]
    if notes:
        run.log(f"resuming with {'; '.join(notes)}")
    if warnings:
        run.warn(f"resuming with settings that differ from the checkpoint's, so another "
                 f"experiment from here on: {'; '.join(warnings)}")


def load_resume_checkpoint(out_dir, warn=warn):
    """The newest checkpoint in out_dir that loads, -> (path, Checkpoint). A damaged one
    (truncated, empty, not a checkpoint, keys missing) is named in a warning and the next older one
    is tried."""
    candidates = step_checkpoints(out_dir)
    if not candidates:
        raise UserError(f"init_from=resume: no checkpoint (ckpt_*.pt) in {out_dir}")
    for step, path in reversed(candidates):
        try:
            ckpt = read_checkpoint(load_checkpoint(path))
        except Exception as e:  # torch raises many kinds for a damaged file
            warn(f"{path}: cannot resume from it ({first_line(e)}); trying an older checkpoint")
            continue
        if ckpt.step != step:  # another run's file, copied in and renamed?
            raise UserError(f"{path}: holds step {ckpt.step!r}, not the step its name says, so it "
                            f"is not this run's checkpoint; move it out of {out_dir} and resume "
                            "again")
        return path, ckpt
    raise UserError(f"init_from=resume: none of the {len(candidates)} checkpoint(s) in {out_dir} "
                    "loads; see the warnings above")


@contextlib.contextmanager
def out_dir_lock(out_dir, run):
    """Hold out_dir for this run's life: a second run into it is refused in one line before it
    touches anything. The lock is the kernel's (flock on out_dir/.lock), so a run that is killed
    leaves no lock behind, only the empty file. The master process holds it; every rank learns of
    a refusal."""
    fd = None
    with same_error_on_every_rank():
        if run.master_process:
            check_output_path(out_dir, directory=True)
            try:
                os.makedirs(out_dir, exist_ok=True)
            except OSError as e:  # a name too long, say
                raise UserError(f"out_dir {shorten(out_dir)}: cannot create it "
                                f"({e.strerror})") from None
            fd = open_lock_file(os.path.join(out_dir, ".lock"))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 100).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UserError(f"out_dir {out_dir} is in use by another run (process {holder}); "
                                "wait for it to end, or choose another out_dir") from None
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing releases the lock


def open_lock_file(path):
    """-> a descriptor of out_dir/.lock, a regular file of this name alone. Anything else is
    refused, never written through: a symbolic link (or a hard link) planted there would make the
    run truncate the file it points to and write its process id into it."""
    try:  # O_NONBLOCK: a FIFO planted there must not hang the open
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as e:
        what = {errno.ELOOP: "a symbolic link", errno.EISDIR: "a directory"}.get(e.errno)
        if what is None:
            raise UserError(f"{path}: cannot open the run's lock file ({e.strerror}); make "
                            "out_dir writable, or choose another out_dir") from None
        raise UserError(f"{path}: {what}, where the run keeps its lock file; remove it, or "
                        "choose another out_dir") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        what = "not a regular file" if not stat.S_ISREG(info.st_mode) else "a hard link"
        raise UserError(f"{path}: {what}, where the run keeps its lock file; remove it, or "
                        "choose another out_dir")
    return fd


def holds_something(path):
    """A file that is not empty, or a folder that is not."""
    if os.path.isdir(path):
        return bool(os.listdir(path))
    return os.path.isfile(path) and os.path.getsize(path) > 0


def prepare_out_dir(cfg, run, log):
    """Everything about out_dir that can fail, checked before any model or data work. A fresh run
    refuses a directory that holds another run, unless start_over, which moves that run's files to
    out_dir/previous/TIME/.
    -> (resume path, checkpoint) for init_from=resume, else (None, None)."""
    check_output_path(cfg.out_dir, directory=True)
    check_output_path(os.path.join(cfg.out_dir, "eval"), directory=True)
    if REWARD_KINDS[cfg.reward_kind].cache and cfg.teacher_cache:
        check_output_path(cfg.teacher_cache, directory=True)
    # folders read, and written only where something is missing (a finished one may be read-only)
    if cfg.synthetic and not synthetic.is_complete(synthetic_dir(cfg)):
        check_output_path(synthetic_dir(cfg), directory=True)
    splits = [spec.split(":", 1)[1] for spec in (cfg.train_data, cfg.val_data)
              if spec.startswith("hellaswag:")]
    if (not cfg.synthetic and cfg.data_cache
            and not all(os.path.isfile(split_path(s, cfg.data_cache)) for s in splits)):
        check_output_path(cfg.data_cache, directory=True)
    if cfg.init_from == "resume":
        if run.master_process:
            remove_torn_writes(cfg.out_dir, restore_export=True)
        check_evaluation_files(cfg.out_dir)
        path, ckpt = load_resume_checkpoint(cfg.out_dir, run.warn)
        if ckpt.step >= cfg.max_steps:
            raise UserError(f"init_from=resume: {path} is at step {ckpt.step}, and "
                            f"max_steps={cfg.max_steps} asks for nothing more; raise max_steps")
        return path, ckpt
    # a run's work: train_config.json and empty logs alone are a setup that failed after writing
    # them (wandb's login, the first evaluation), with nothing to lose
    existing = [name for name in RUN_FILES
                if name != "train_config.json" and holds_something(os.path.join(cfg.out_dir, name))]
    existing += [os.path.basename(path) for _, path in step_checkpoints(cfg.out_dir)]
    if existing and os.path.exists(os.path.join(cfg.out_dir, "train_config.json")):
        existing.append("train_config.json")  # moved aside with the rest
    # the demo task in out_dir belongs to the run that built it, with its seed
    built_with = synthetic.task_seed(synthetic_dir(cfg)) if cfg.synthetic else None
    if built_with is not None and built_with != cfg.seed and not cfg.synthetic_dir:
        if not (existing or cfg.start_over):
            raise UserError(f"{synthetic_dir(cfg)} holds the demo task built with seed "
                            f"{built_with}, and this run asks for seed {cfg.seed}; pass "
                            "--start_over=True to move it aside and build this seed's, or give "
                            "--synthetic_dir")
        existing.append("synthetic")
    if existing and not cfg.start_over:
        raise UserError(f"out_dir {cfg.out_dir} holds another run "
                        f"({', '.join(sorted(existing)[:4])}); continue it with "
                        "--init_from=resume, choose a new out_dir, or pass --start_over=True to "
                        f"move its files to {os.path.join(cfg.out_dir, 'previous')}/")
    previous = os.path.join(cfg.out_dir, "previous", time.strftime("%Y%m%d-%H%M%S"))
    run.barrier()  # every rank has looked before anything moves
    # the master moves the run's files; each node's local master its own demo task (nodes need not
    # share a filesystem)
    moving = [name for name in existing
              if (run.local_master if name == "synthetic" else run.master_process)]
    for name in moving:
        if os.path.exists(os.path.join(cfg.out_dir, name)):  # else another node's rank moved it
            os.makedirs(previous, exist_ok=True)
            os.replace(os.path.join(cfg.out_dir, name), os.path.join(previous, name))
    if moving:
        log(f"start_over: moved the previous run's files to {previous}")
    if run.master_process:
        remove_torn_writes(cfg.out_dir)
    return None, None


def eval_predictions_path(out_dir, step):
    """eval/step_NNNNNN.jsonl for the policy at a step, eval/teacher.jsonl for the teacher."""
    name = "teacher.jsonl" if step == "teacher" else f"step_{step:06d}.jsonl"
    return os.path.join(out_dir, "eval", name)


def evaluation_files(out_dir):
    """[(step, path)] of the prediction files of the policy's evaluations in out_dir/eval."""
    eval_dir = os.path.join(out_dir, "eval")
    names = os.listdir(eval_dir) if os.path.isdir(eval_dir) else []
    return [(int(m.group(1)), os.path.join(eval_dir, name)) for name in names
            if (m := re.fullmatch(r"step_(\d+)\.jsonl", name))]


def check_evaluation_files(out_dir):
    """A resume removes or writes again the prediction files of the steps it redoes: something
    else under such a name (a folder made there) is named now, before any work."""
    for step, path in sorted(evaluation_files(out_dir)):
        if not os.path.isfile(path):
            what = "a directory" if os.path.isdir(path) else "not a regular file"
            raise UserError(f"{path}: {what}, where the run keeps the predictions of step {step}; "
                            f"move it out of {os.path.dirname(path)} and resume again")


def drop_evaluations_after(out_dir, step):
    """Remove the prediction files of evaluations after step (a resumed run redoes those steps)."""
    for evaluated, path in evaluation_files(out_dir):
        if evaluated > step:
            os.remove(path)


def peak_memory_gb(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


# --------------------------------------------------------------------------------------------------
# the training state, logs and the end of a step


class Reference(typing.NamedTuple):
    """What a checkpoint keeps of the frozen reference."""
    source: str  # where it came from (a checkpoint file, not a run directory)
    settings: dict  # a scratch reference's settings (SCRATCH_SETTINGS), else None
    fingerprint: str  # sha256 of its weights


def checkpoint_dict(raw_model, cfg, state, run):
    """A checkpoint, each of its keys named here: the policy (weights and shape), the config, and
    the TrainingState a run needs to go on exactly. read_checkpoint reads it back. Every rank
    calls this: it gathers every rank's random generators."""
    return {**policy_part(raw_model.checkpoint_fields(), raw_model.state_dict()),
            "config": dataclasses.asdict(cfg),
            "step": state.step, "data_position": state.data_position,
            "best_acc_norm": state.best_acc_norm, "optimizer": state.optimizer.state_dict(),
            "scaler": state.scaler.state_dict(), "kl_controller": state.kl_controller.state_dict(),
            "reward": state.reward_fn.state_dict(), "rollouts": state.rollout_kind.state_dict(),
            "rng": gather_rng_states(state.sample_generator, state.shuffle_generator,
                                     run.world_size),
            "reference_from": state.reference.source,
            "reference_settings": state.reference.settings,
            "reference_fingerprint": state.reference.fingerprint}


@dataclass
class Checkpoint:
    """A checkpoint as read back (read_checkpoint); the fields are checkpoint_dict's keys."""
    format: str
    step: int
    model_config: dict
    model: dict
    config: dict  # the run's Config, as a dict
    data_position: int
    best_acc_norm: float
    optimizer: dict
    scaler: dict
    kl_controller: dict
    reward: object  # the reward's state_dict, or None
    rollouts: object  # the rollout kind's state_dict, or None
    rng: list  # every rank's random generators (gather_rng_states)
    reference: Reference


def read_checkpoint(ckpt):
    """A loaded checkpoint dict (checkpoint_dict's) -> Checkpoint. Older checkpoints lack some
    keys: no config reads as an empty one, no reference settings or fingerprint as None. Another
    file (or one without a key every checkpoint has) is a ValueError or a KeyError."""
    if not is_checkpoint(ckpt):
        raise ValueError("not a checkpoint of this project")
    return Checkpoint(
        format=ckpt["format"], step=ckpt["step"], model_config=ckpt["model_config"],
        model=ckpt["model"], config=ckpt.get("config", {}),
        data_position=ckpt["data_position"], best_acc_norm=ckpt["best_acc_norm"],
        optimizer=ckpt["optimizer"], scaler=ckpt["scaler"],
        kl_controller=ckpt["kl_controller"], reward=ckpt.get("reward"),
        rollouts=ckpt.get("rollouts"), rng=ckpt["rng"],
        reference=Reference(ckpt["reference_from"], ckpt.get("reference_settings"),
                            ckpt.get("reference_fingerprint")))



@dataclass(kw_only=True)
class TrainingState:
    """Everything besides the weights and the config that a run needs to go on exactly where it
    stopped: checkpoint_dict() saves it, load_state_dict() puts a Checkpoint's back. Built with
    keywords, each part named."""
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    kl_controller: object  # .value, the KL coefficient
    reward_fn: object  # its running statistics (or None)
    rollout_kind: object  # its caches, such as the reference's scores (or None)
    sample_generator: torch.Generator  # the actions sampled
    shuffle_generator: torch.Generator  # the minibatch order
    batches: "Batches"  # the training examples of each step
    reference: "Reference"  # where the frozen reference came from, a fingerprint of its weights
    step: int = 0  # steps done
    data_position: int = 0  # where the next batch starts in the training data's epochs
    best_acc_norm: float = -1.0  # the best evaluation so far, best.pt's
    bad_steps: int = 0  # non-finite steps in a row (not saved: a resumed run counts afresh)

    def next_batch(self):
        """-> this rank's example indices for the step, and moves the data position on."""
        indices, self.data_position = self.batches.at(self.data_position)
        return indices

    def resume(self, ckpt, path, cfg, run):
        """Go on from a Checkpoint (read from path): its state put back, and what was logged and
        evaluated after it dropped, to be redone."""
        self.load_state_dict(ckpt, cfg, run)
        run.log(f"resumed from {path} at step {self.step}")
        forget_after(cfg.out_dir, self.step, run)

    def load_state_dict(self, ckpt, cfg, run):
        """Put back a Checkpoint's state (read_checkpoint)."""
        if ckpt.rollouts is not None and not self.rollout_kind.load_state_dict(ckpt.rollouts):
            run.log("the checkpoint's cached reference scores are for other training examples "
                    "or another choice_temperature or choice_norm: computing them again as "
                    "examples are met")
        self.optimizer.load_state_dict(value_head_groups(ckpt.optimizer, self.optimizer))
        # saved param groups carry their own flags: keep this run's kernel (a checkpoint from
        # before the fused AdamW on CPUs says fused=None, which would run the slower loop)
        for group in self.optimizer.param_groups:
            group["fused"] = self.optimizer.defaults["fused"]
        if ckpt.scaler:  # empty when saved without float16 (bf16, float32, CPU)
            self.scaler.load_state_dict(ckpt.scaler)
        self.kl_controller.load_state_dict(ckpt.kl_controller)
        if self.kl_controller.value != cfg.kl_coef:
            run.log(f"KL coefficient {self.kl_controller.value:.4g} restored from the checkpoint "
                    f"(config kl_coef {cfg.kl_coef})")
        if ckpt.reward is not None:
            self.reward_fn.load_state_dict(ckpt.reward)
        self.load_rng_states(ckpt.rng, run)
        self.step, self.data_position = ckpt.step, ckpt.data_position
        self.best_acc_norm = ckpt.best_acc_norm
        evaluated_on = ("val_data", "eval_limit", "style")
        if any(ckpt.config.get(k, getattr(cfg, k)) != getattr(cfg, k)
               for k in evaluated_on):
            self.best_acc_norm = -1.0  # a score on other examples is no bar to clear
            run.log("the evaluation set changed (val_data, eval_limit or style): best.pt is the "
                    "best evaluation on the new one from here on")

    def load_rng_states(self, rng, run):
        if (len(rng) == run.world_size
                and rng[run.rank].get("device_type") == self.sample_generator.device.type):
            mine = rng[run.rank]
            self.sample_generator.set_state(mine["sample"])
            self.shuffle_generator.set_state(mine["shuffle"])
            torch.set_rng_state(mine["torch"])
        else:
            run.warn(f"checkpoint has RNG states of {len(rng)} rank(s) on "
                     f"{rng[0].get('device_type')}, this run has {run.world_size} on "
                     f"{self.sample_generator.device.type}; sampling is reseeded, not continued")


def value_head_groups(saved, optimizer):
    """An optimizer state saved by an older release, in this optimizer's parameter groups. Before
    the value head had groups of its own (one group per weight decay), the saved groups are split
    as the optimizer's are (model.configure_optimizers): the parameters' numbering is the same, the
    value head's last in each group. A key a group gained since (value_head) takes this
    optimizer's value: loading keeps only the saved groups' keys."""
    groups, saved_groups = optimizer.param_groups, saved["param_groups"]
    if len(saved_groups) != len(groups):
        split, at = [], 0
        for old in saved_groups:
            start = 0
            while start < len(old["params"]):
                n = len(groups[at]["params"])
                split.append({**old, "params": old["params"][start:start + n]})
                start, at = start + n, at + 1
        saved_groups = split
    return {**saved, "param_groups": [{**group, **old}
                                      for group, old in zip(groups, saved_groups)]}


def forget_after(out_dir, step, run):
    """What a run logged and evaluated after the checkpoint it resumes from is about to be
    redone: dropped."""
    if run.master_process:
        for name in ("metrics.jsonl", "samples.jsonl"):
            drop_lines_after(os.path.join(out_dir, name), step)
        drop_evaluations_after(out_dir, step)


class Batches:
    """Each rank's slice of each global batch, from a permutation of the training set per epoch
    seeded by seed + epoch: a resumed run needs only the position to go on exactly where it
    stopped. batch_size counts examples; each comes group_size times in a row (a group of samples
    of one prompt, kept on one rank)."""

    def __init__(self, n_examples, batch_size, seed, run, group_size=1):
        self.n_examples, self.batch_size, self.seed, self.run = n_examples, batch_size, seed, run
        self.group_size = group_size
        self.epoch, self.permutation = None, None

    def at(self, position):
        """-> (this rank's example indices, the next batch's position)."""
        indices = []
        start = position + self.run.rank * self.batch_size
        for i in range(start, start + self.batch_size):
            epoch, offset = divmod(i, self.n_examples)
            if epoch != self.epoch:
                self.epoch = epoch
                rng = np.random.RandomState(self.seed + epoch)
                self.permutation = rng.permutation(self.n_examples)
            indices += [int(self.permutation[offset])] * self.group_size
        return indices, position + self.batch_size * self.run.world_size


class StoppedAtOnce(KeyboardInterrupt):
    """A second stop signal: the run stops where it is (an atomic write under way is dropped)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


class StopSignal:
    """SIGTERM / SIGINT: finish the step, write a checkpoint, then stop (train_ppo.py exits with
    128 + the signal's number, as a process killed by it would, so that schedulers and `&&` see
    a run that did not finish). A second signal stops at once (StoppedAtOnce)."""

    def __init__(self, log):
        self.received, self.log = None, log
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.received is not None:
            raise StoppedAtOnce(signum)
        self.received = signum
        self.log(f"signal {signum}: finishing this step, then writing a checkpoint (signal again "
                 "to stop at once)")

    def on_any_rank(self):
        return all_reduce_sum(torch.tensor(float(self.received is not None)))[0].item() > 0


class Shown(typing.NamedTuple):
    """A metric in the console line: its key, how it is printed, and by what it is scaled."""
    key: str
    template: str
    scale: float = 1


class RunLog:
    """metrics.jsonl (and wandb), samples.jsonl and the console line; the master process alone
    writes."""

    def __init__(self, cfg, master_process):
        self.cfg, self.master_process, self.wandb_run = cfg, master_process, None
        self.log = print if master_process else (lambda *a, **k: None)
        if cfg.wandb_log and master_process:
            try:
                import wandb  # optional
                self.wandb_run = wandb.init(project=cfg.wandb_project,
                                            name=cfg.wandb_run_name or None,
                                            config=dataclasses.asdict(cfg))
            except ImportError:
                warn("wandb_log=True but wandb is not installed; logging to metrics.jsonl only")
            except Exception as e:  # no API key in a batch job, no network, ...
                raise UserError(f"wandb_log=True, but wandb could not start a run "
                                f"({first_line(e)}); log in (wandb login), or pass "
                                "--wandb_log=False") from None
        metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
        self.metrics_file = open(metrics_path, "a") if master_process else None

    def metrics(self, metrics):
        if self.master_process:
            with write_errors_are_one_line(self.metrics_file.name):
                self.metrics_file.write(json.dumps(metrics) + "\n")
                self.metrics_file.flush()
            if self.wandb_run:
                self.wandb_run.log(metrics, step=metrics["step"])

    def add_to_step(self, step, fields):
        """Merge fields into the logged line of step: metrics.jsonl rewritten atomically, so
        reopened (appends to the old file would be lost)."""
        if self.master_process:
            path = self.metrics_file.name
            self.metrics_file.close()
            try:
                add_to_logged_step(path, step, fields)
            finally:
                self.metrics_file = open(path, "a")

    def step_line(self, metrics, fields):
        """The console line of a step: each of fields (Shown) of its metrics."""
        m = collections.defaultdict(lambda: float("nan"), metrics)  # a skipped step has no losses
        self.log(" | ".join(f.template.format(m[f.key] * f.scale) for f in fields))

    def eval_line(self, step, result):
        self.log(f"step {step} | eval acc {result['eval/acc']:.4f} | "
                 f"acc_norm {result['eval/acc_norm']:.4f}")

    def samples(self, step, rollouts):
        if (self.master_process and self.cfg.sample_interval
                and step % self.cfg.sample_interval == 0):
            path = os.path.join(self.cfg.out_dir, "samples.jsonl")
            with write_errors_are_one_line(path), open(path, "a") as f:
                for sample, score in list(zip(rollouts.samples, rollouts.scores.tolist()))[:4]:
                    f.write(json.dumps({"step": step, **sample, "reward": score}) + "\n")

    def close(self):
        if self.metrics_file:
            self.metrics_file.close()
        if self.wandb_run:
            self.wandb_run.finish()


def run_eval(model, val_examples, cfg, device, dtype):
    """HellaSwag on the val examples (every rank takes part). -> the scores for the metrics, and
    the per-example predictions."""
    result = evaluate(model, val_examples, style=cfg.style, batch_size=cfg.eval_batch_size,
                      device=device, dtype=dtype, return_predictions=True)
    return {"eval/acc": result["acc"], "eval/acc_norm": result["acc_norm"], "eval/n": result["n"],
            "predictions": result["predictions"]}


class PhaseTimer:
    """Wall-clock seconds a step spends in each phase (rollout, reference, reward, update), logged
    as time/<phase>. On CUDA a phase waits for its kernels before and after, so each figure is the
    phase's own: a few synchronisations a step."""

    def __init__(self, device):
        self.cuda = str(device).startswith("cuda")
        self.seconds = {}

    @contextlib.contextmanager
    def __call__(self, phase):
        self.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.synchronize()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def synchronize(self):
        if self.cuda:
            torch.cuda.synchronize()

    def take(self):
        """-> {"time/<phase>": seconds} since the last take, and starts over."""
        seconds, self.seconds = self.seconds, {}
        return {f"time/{phase}": s for phase, s in seconds.items()}




class RunManager:
    """Around the PPO loop: the evaluations, and the end of every step (the console line,
    metrics.jsonl, samples, the HellaSwag evaluation, checkpoints and best.pt, a stop signal).
    An output that cannot be written (a log, an evaluation's predictions) stops the run in one
    line, after the step's checkpoint: it never costs the step's weights."""

    def __init__(self, cfg, run, state, raw_model, val_examples, console_line):
        self.cfg, self.run, self.state = cfg, run, state
        self.console_line = console_line  # the metrics in a step's console line (Shown)
        self.raw_model, self.val_examples = raw_model, val_examples
        self.run_log = RunLog(cfg, run.master_process)  # wandb's login too
        if run.master_process:  # after the setup: one that failed leaves no run behind to refuse
            atomic_write_text(os.path.join(cfg.out_dir, "train_config.json"),
                              json.dumps(dataclasses.asdict(cfg), indent=2))
        self.stop_signal = StopSignal(run.log)
        self.timer = PhaseTimer(run.device)
        self.last_eval, self.metrics, self.output_error = None, {}, None

    def output(self, write, *args):
        """write(*args), but a write that fails is kept for later (raised after the checkpoint)."""
        try:
            write(*args)
        except UserError as e:
            self.output_error = self.output_error or e

    def evaluate(self, model, step):
        """HellaSwag on the val examples; the predictions go to eval/ (step_N.jsonl,
        teacher.jsonl)."""
        result = run_eval(model, self.val_examples, self.cfg, self.run.device, self.run.dtype)
        predictions = result.pop("predictions")
        if self.run.master_process:
            self.output(write_predictions, eval_predictions_path(self.cfg.out_dir, step),
                        predictions)
        return result

    def evaluations_before_the_loop(self, teacher=None):
        """A new run's: the starting policy's, and the teacher's own picks if the reward kind has a
        teacher (for analyze.py's teacher agreement). A resumed run's: the evaluation its stop
        skipped, if it did."""
        step = self.state.step
        if step == 0:
            self.last_eval = self.evaluate(self.raw_model, 0)
            self.run_log.eval_line(0, self.last_eval)
            self.output(self.run_log.metrics, {"step": 0, **self.last_eval})
            if teacher is not None:
                teacher = self.evaluate(teacher, "teacher")
                self.run.log(f"teacher | eval acc {teacher['eval/acc']:.4f} | "
                             f"acc_norm {teacher['eval/acc_norm']:.4f}")
        elif self.evaluation_due(step) and not os.path.exists(
                eval_predictions_path(self.cfg.out_dir, step)):
            self.last_eval = self.evaluate(self.raw_model, step)
            self.run_log.eval_line(step, self.last_eval)
            self.output(self.run_log.add_to_step, step, self.last_eval)
            if self.last_eval["eval/acc_norm"] > self.state.best_acc_norm:
                self.state.best_acc_norm = self.last_eval["eval/acc_norm"]
                self.checkpoint(is_best=True)  # the state it was saved with: the same file
        self.raise_output_error()

    def evaluation_due(self, step):
        return bool(self.cfg.eval_interval and step % self.cfg.eval_interval == 0)

    def throughput(self, t0, n_samples, n_tokens):
        """The step's speed and memory figures, and the seconds of each phase, for its metrics."""
        self.timer.synchronize()
        dt = time.time() - t0
        world_size = self.run.world_size
        return {"samples_per_s": n_samples * world_size / dt,
                "tokens_per_s": n_tokens * world_size / dt, "dt": dt,
                "peak_mem_gb": peak_memory_gb(self.run.device), **self.timer.take()}

    def end_of_step(self, metrics, batch):
        """Log the step; evaluate at eval_interval and at the end; checkpoint at
        checkpoint_interval, at the end, at a better evaluation, on a stop signal (first: a
        scheduler's grace period may be short, so an interval's evaluation is skipped then; the
        resumed run does it) and when an output failed. -> whether to stop now."""
        cfg, step = self.cfg, self.state.step
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            self.run_log.step_line(metrics, self.console_line)
        self.output(self.run_log.samples, step, batch)
        stop_now = self.stop_signal.on_any_rank()
        if (self.evaluation_due(step) and not stop_now) or step == cfg.max_steps:
            self.last_eval = self.evaluate(self.raw_model, step)
            metrics.update(self.last_eval)
            self.run_log.eval_line(step, self.last_eval)
            stop_now = self.stop_signal.on_any_rank()  # a signal during the evaluation: stop too
        self.output(self.run_log.metrics, metrics)
        self.metrics = metrics
        is_best = "eval/acc_norm" in metrics and metrics["eval/acc_norm"] > self.state.best_acc_norm
        failed = self.output_failed_on_any_rank()
        if (step % cfg.checkpoint_interval == 0 or step == cfg.max_steps or stop_now or is_best
                or failed):
            if is_best:
                self.state.best_acc_norm = metrics["eval/acc_norm"]
            self.checkpoint(is_best)
        self.raise_output_error()
        if stop_now:
            received = self.stop_signal.received
            which = (f"signal {received}" if received is not None
                     else "a stop signal on another rank")
            self.run.log(f"received {which}: checkpoint written at step {step}, stopping")
        return stop_now

    def output_failed_on_any_rank(self):
        failed = torch.tensor(float(self.output_error is not None))
        return all_reduce_sum(failed)[0].item() > 0

    def raise_output_error(self):
        """The first output that failed, as one line on every rank."""
        with same_error_on_every_rank():
            if self.output_error is not None:
                raise self.output_error

    def checkpoint(self, is_best):
        ckpt = checkpoint_dict(self.raw_model, self.cfg, self.state, self.run)
        with same_error_on_every_rank():  # a failed write stops every rank, not the master alone
            if self.run.master_process:
                path = save_checkpoint(self.cfg.out_dir, self.state.step, ckpt,
                                       self.cfg.keep_last, is_best)
                self.run.log(f"saved {path}")

    def finish(self):
        """The export of a finished run (out_dir/hf), and the logs closed. -> the signal that
        stopped the run early, or None."""
        cfg, run = self.cfg, self.run
        if run.master_process and cfg.export_hf and self.state.step == cfg.max_steps:
            self.raw_model.save_pretrained(os.path.join(cfg.out_dir, "hf"))
            run.log(f"exported the policy to {os.path.join(cfg.out_dir, 'hf')}")
        self.run_log.close()
        run.log(f"report: python analyze.py {shlex.quote(cfg.out_dir)}")
        return self.stop_signal.received
