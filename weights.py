"""
Reading GPT-2 weights from every source we care about and writing them back as a transformers
directory: hub names and transformers directories (this project's exports included), build-nanogpt
and nanoGPT .pt checkpoints, this project's checkpoints and run directories; the checks that turn a
bad file or config into one line (UserError); and the quiet, checked transformers load that
causal_lm.py shares. Plain data in and out: config fields as a dict and state dicts in model.py's
parameter names, from which model.py builds its GPT.

    fields, state_dict, where = read_gpt2("gpt2", defaults)  # or a dir, a .pt, a run directory
    write_gpt2("out/hf", fields, state_dict)                 # AutoModelForCausalLM loads it offline
"""

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import pickle
import re
import shutil
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

# common before transformers: it keeps transformers from asking the hub for kernels
from common import (UserError, atomic_directory, atomic_write_text, check_output_path, first_line,
                    looks_like_a_path, read_json, warn)
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config,
                          GPT2LMHeadModel)
from transformers.utils import logging as hf_logging
from tokenizer import EOT_TOKEN, VOCAB_SIZE, gpt2_hf_tokenizer

# causal-mask buffers that transformers' and old nanoGPT's GPT-2 keep beside their weights
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
HUB_GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# transformers' GPT-2 keeps these in Conv1D layers: (in, out) where nn.Linear has (out, in)
_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight",
                   "mlp.c_fc.weight", "mlp.c_proj.weight")
# safetensors' names of the dtypes that cannot hold weights, with torch's names for them
NON_FLOAT_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
                    "I32": "int32", "U32": "uint32", "I64": "int64", "U64": "uint64",
                    "C64": "complex64"}
# GPT2Config settings this GPT does not compute, each with the value that asks for it
UNSUPPORTED_GPT2_SETTINGS = {"scale_attn_by_inverse_layer_idx": True, "scale_attn_weights": False,
                             "tie_word_embeddings": False}


# --------------------------------------------------------------------------------------------------
# reading


def read_gpt2(source, defaults):
    """
    A GPT-2's weights -> (config fields, state dict, where): the fields complete and checked, the
    state dict as stored (clean_state_dict makes it this project's), where the source to name in
    errors. defaults: the GPT's config fields with their default values, which a source's fields
    fill in.
    source: a hub name ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", or another GPT-2 repo),
    a local transformers GPT-2 directory (ours from write_gpt2 included), a build-nanogpt or
    nanoGPT checkpoint (.pt), or this project's checkpoint (.pt, or a run directory: its newest
    ckpt_<step>.pt).
    """
    source = checkpoint_source(source)
    if is_gguf(source):
        return _read_transformers(gguf_directory(source), defaults)
    if os.path.isdir(source):
        if os.path.exists(os.path.join(source, "config.json")):
            return _read_transformers(source, defaults)
        raise UserError(f"{source}: directory holds neither a transformers model "
                        "(config.json) nor a checkpoint (ckpt_*.pt)")
    if os.path.isfile(source):
        return _read_torch_file(source, defaults)
    if looks_like_a_path(source):
        raise UserError(f"{source}: no such file or directory")
    return _read_transformers(source, defaults)


# --------------------------------------------------------------------------------------------------
# this project's checkpoint file: a dict of plain data and tensors, marked by its format, named
# ckpt_<step>.pt in its run directory. The policy's part is here (policy_part); the training
# state's is run_management.checkpoint_dict's, which read_checkpoint reads back.

CHECKPOINT_FORMAT = "gpt-ppo-checkpoint/1"
CHECKPOINT_PATTERN = re.compile(r"ckpt_(\d+)\.pt")


def checkpoint_path(run_dir, step):
    return os.path.join(run_dir, f"ckpt_{step:06d}.pt")


def step_checkpoints(run_dir):
    """[(step, path)] of the step checkpoints in run_dir, oldest first
    ([] if run_dir is not a directory)."""
    names = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    return sorted((int(m.group(1)), os.path.join(run_dir, name)) for name in names
                  if (m := CHECKPOINT_PATTERN.fullmatch(name)))


def latest_checkpoint(run_dir):
    """Path of the newest ckpt_<step>.pt in run_dir, or None."""
    checkpoints = step_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


def checkpoint_source(source):
    """The source read_gpt2 reads for `source`: a run directory (no config.json) as its newest
    ckpt_<step>.pt, which the run's later saves do not change; anything else as it is."""
    source = os.fspath(source)
    if os.path.isdir(source) and not os.path.exists(os.path.join(source, "config.json")):
        return latest_checkpoint(source) or source
    return source


def policy_part(fields, state_dict):
    """A checkpoint's policy: the GPT's config fields and its weights, under the format's mark."""
    return {"format": CHECKPOINT_FORMAT, "model_config": fields, "model": state_dict}


def is_checkpoint(ckpt):
    return isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT


def load_checkpoint(path):
    """A checkpoint file -> its dict, tensors on the CPU, nothing executed. Another file is a
    ValueError; torch raises many kinds for a damaged one."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not is_checkpoint(ckpt):
        raise ValueError("not a checkpoint of this project")
    return ckpt


def _read_transformers(name_or_dir, defaults):
    local = os.path.isdir(name_or_dir)
    config_where = os.path.join(name_or_dir, "config.json") if local else name_or_dir
    # files transformers would fail on with a traceback, checked here so the error names them
    if local:
        read_json(config_where)
        # the safetensors files read below: transformers' weights, and our value head
        names = _loaded_weight_files(name_or_dir) + ["value_head.safetensors"]
        for name in names:
            path = os.path.join(name_or_dir, name)
            if name.endswith(".safetensors") and os.path.isfile(path):
                _check_safetensors(path)
    try:
        hf_config = AutoConfig.from_pretrained(name_or_dir)
        if hf_config.model_type != "gpt2":
            raise UserError(f"{name_or_dir}: a '{hf_config.model_type}' model, but "
                            "GPT.from_pretrained loads GPT-2 only (hellaswag.py and reward.py "
                            "take other architectures)")
        c = hf_config
        fields = dict(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
                      n_head=c.n_head, n_embd=c.n_embd, layer_norm_epsilon=c.layer_norm_epsilon)
        fields = _config_fields(fields, defaults, config_where)
        _check_gpt2_variant(c, name_or_dir)
        hf = load_transformers_checked(GPT2LMHeadModel, name_or_dir, dtype=torch.float32)
    except UserError:
        raise
    except OSError as e:
        if local:
            raise UserError(f"{name_or_dir}: not a loadable transformers GPT-2 directory "
                            f"({e})") from None
        raise UserError(
            f"could not load '{name_or_dir}' from the Hugging Face hub (offline, or no such "
            f"repo?); download it where there is internet (hf download {name_or_dir} "
            "--local-dir DIR) and pass that directory instead") from None
    # transformers raises many kinds for a config or weights it cannot use
    except Exception as e:
        raise UserError(f"{name_or_dir}: not a loadable transformers GPT-2 "
                        f"({first_line(e)})") from None
    return fields, _gpt_state_dict(hf, name_or_dir), name_or_dir


def _gpt_state_dict(hf, name_or_dir):
    """A transformers GPT-2's weights in this project's layout, with the value head saved beside
    them (our exports) if there is one."""
    sd = {k: v for k, v in hf.state_dict().items()
          if not k.endswith(MASK_BUFFERS)}
    for k in sd:
        # transformers' Conv1D stores (in, out); nn.Linear wants (out, in)
        if k.endswith(_CONV1D_WEIGHTS):
            sd[k] = sd[k].t()
    value_head = os.path.join(name_or_dir, "value_head.safetensors")
    if os.path.isfile(value_head):
        sd.update({"value_head." + k: v for k, v in load_file(value_head).items()})
    return sd


def _read_torch_file(path, defaults):
    # build-nanogpt pickles its GPTConfig dataclass from __main__;
    # read it as a plain object, nothing executed
    stand_ins = [(type("GPTConfig", (), {}), f"{module}.GPTConfig")
                 for module in ("__main__", "train_gpt2", "model")]
    try:
        with torch.serialization.safe_globals(stand_ins):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    # torch's own advice here is to turn the safety off: never repeat it
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = (f"Python code ({found.group(1)})" if found
                else "Python objects, not just tensors and data")
        raise UserError(f"{path}: refused: loading it would run {what}; only tensors and plain "
                        "data are read, so save the weights alone (a state dict of tensors) "
                        "and load that") from None
    except Exception as e:
        raise UserError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt "
                        f"({first_line(e)})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path}: expected a checkpoint dict, found {type(ckpt).__name__}")
    if is_checkpoint(ckpt):  # ours
        config_key, fields, strict = "model_config", ckpt.get("model_config"), True
    # build-nanogpt
    elif "model" in ckpt and "config" in ckpt and not isinstance(ckpt["config"], dict):
        config_key, fields, strict = "config", getattr(ckpt["config"], "__dict__", None), False
    elif "model" in ckpt and "model_args" in ckpt:  # nanoGPT's ckpt.pt
        config_key, fields, strict = "model_args", ckpt["model_args"], False
    else:
        raise UserError(f"{path}: unknown checkpoint layout (keys: {sorted(ckpt)[:8]}); "
                        "expected this project's, build-nanogpt's or nanoGPT's")
    for key, value in ((config_key, fields), ("model", ckpt.get("model"))):
        if not isinstance(value, dict):
            problem = ("missing" if key not in ckpt
                       else f"a {type(ckpt[key]).__name__}, not a dict")
            raise UserError(f"{path}: the checkpoint's '{key}' is {problem}")
    return _config_fields(fields, defaults, path, strict), ckpt["model"], path


def clean_state_dict(sd, where):
    """A state dict as this project's GPT names it: torch.compile's and DDP's prefixes and the
    causal-mask buffers gone, lm_head.weight tied to transformer.wte.weight. One line naming
    `where` if it holds something other than float tensors or an lm_head that the tie would
    lose."""
    clean = {}
    wrappers = ("_orig_mod.", "module.")  # torch.compile and DDP, nested in either order
    for k, v in sd.items():
        while k.startswith(wrappers):
            k = k.removeprefix("_orig_mod.").removeprefix("module.")
        if k.endswith(MASK_BUFFERS):
            continue
        clean[k] = v
    # tied: some store only one
    if "lm_head.weight" not in clean and "transformer.wte.weight" in clean:
        clean["lm_head.weight"] = clean["transformer.wte.weight"]
    for k, v in clean.items():  # load_state_dict would cast them to float without a word
        if isinstance(v, torch.Tensor) and not v.is_floating_point():
            raise _non_float_weights(where, k, str(v.dtype).removeprefix("torch."))
    head, wte = clean.get("lm_head.weight"), clean.get("transformer.wte.weight")
    if (isinstance(head, torch.Tensor) and isinstance(wte, torch.Tensor)
            and head.shape == wte.shape and not torch.equal(head, wte)):
        # one tensor here: whichever loaded last would silently be both
        raise UserError(f"{where}: lm_head.weight differs from transformer.wte.weight, but "
                        "this GPT ties them (GPT-2's embedding is its output layer); "
                        "hellaswag.py scores an untied model saved in transformers format")
    not_tensors = [k for k, v in clean.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise UserError(f"{where}: the weights hold things that are not tensors "
                        f"({not_tensors[:4]})")
    return clean


# --------------------------------------------------------------------------------------------------
# config checks


def _config_fields(fields, defaults, where, strict=False):
    """The checked config fields of a checkpoint's or config.json's, defaults filling in the rest.
    strict: an unknown field is an error (this project's checkpoints hold exactly the GPT's
    fields); otherwise other fields are ignored (nanoGPT's)."""
    unknown = sorted(set(fields) - set(defaults))
    if strict and unknown:
        raise UserError(f"{where}: unknown model config field(s) {unknown[:4]}; not a checkpoint "
                        "of this version")
    config = {**defaults, **{k: v for k, v in fields.items() if k in defaults}}
    check_model_config(config, where)
    return config


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_model_config(config, where):
    """One line naming `where` if config fields (a dict) cannot build a GPT: a size that is not a
    positive integer, n_embd not a multiple of n_head, fewer token embeddings than GPT-2's tokenizer
    has, a dropout outside [0, 1), a non-positive layer_norm_epsilon."""
    for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
        value = config[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{where}: {name} must be a positive integer, not {value!r}")
    if config["n_embd"] % config["n_head"]:
        raise UserError(f"{where}: n_embd={config['n_embd']} is not a multiple of "
                        f"n_head={config['n_head']}")
    if config["vocab_size"] < VOCAB_SIZE:
        raise UserError(f"{where}: vocab_size={config['vocab_size']} is smaller than GPT-2's "
                        f"{VOCAB_SIZE}, whose tokenizer drives this GPT; a model with a tokenizer "
                        "of its own is scored by hellaswag.py and reward.py from a transformers "
                        "directory with that tokenizer saved beside it")
    if not _is_number(config["dropout"]) or not 0 <= config["dropout"] < 1:
        raise UserError(f"{where}: dropout must be a number in [0, 1), not {config['dropout']!r}")
    if not isinstance(config["bias"], bool):
        raise UserError(f"{where}: bias must be true or false, not {config['bias']!r}")
    epsilon = config["layer_norm_epsilon"]
    if not _is_number(epsilon) or not 0 < epsilon < 1:
        raise UserError(f"{where}: layer_norm_epsilon must be a small positive number, not "
                        f"{epsilon!r}")


def unsupported_gpt2_setting(config):
    """The first setting of a transformers GPT2Config (or its dict) that this GPT does not compute,
    as 'name=value', or None. Such a model would load and give other logits than transformers'."""
    if isinstance(config, dict):
        get = config.get
    else:
        def get(name, default):
            return getattr(config, name, default)
    activation = get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        return f"activation_function={activation!r}"
    for name, value in UNSUPPORTED_GPT2_SETTINGS.items():
        if get(name, not value) == value:
            return f"{name}={value}"
    return None


def _check_gpt2_variant(c, where):
    setting = unsupported_gpt2_setting(c)
    if setting:
        raise UserError(f"{where}: config.json sets {setting}, which GPT-2 does not have and this "
                        "GPT does not compute (hellaswag.py and reward.py score such a model "
                        "through transformers)")


# --------------------------------------------------------------------------------------------------
# GGUF files (llama.cpp's format): read by transformers, which dequantizes them to float. That takes
# a minute for a 100M-parameter model on a CPU, so the result is kept once as a transformers
# directory under a cache folder named by the file's sha256: a changed file is a new entry, never a
# stale one. Processes that load the same file at once (DDP ranks, jobs sharing $GGUF_CACHE) take
# turns on a lock file beside the entry: the first converts, the others then read its entry.

GGUF_MAGIC = b"GGUF"
# written last into a cache entry: the file it came from and the size of each file of the entry
GGUF_ENTRY_RECORD = "gguf_source.json"
# a conversion's temporary folder (atomic_directory's, beside the entry): .<sha256>.<random>
GGUF_TEMP_NAME = re.compile(r"\.([0-9a-f]{64})\..+")


def is_gguf(source):
    """Whether a model source names a GGUF file (by its extension: a hub name never ends so)."""
    return os.fspath(source).lower().endswith(".gguf")


def gguf_cache_dir():
    """Where dequantized GGUF models are kept: $GGUF_CACHE, by default
    ~/.cache/gpt2-ppo-hellaswag/gguf."""
    return os.path.abspath(os.path.expanduser(os.environ.get("GGUF_CACHE") or os.path.join(
        "~", ".cache", "gpt2-ppo-hellaswag", "gguf")))


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def require_gguf_package():
    """The gguf package, which transformers reads GGUF files with (and asks for accelerate
    beside it); a one-line error without either."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"reading a .gguf model needs the {' and '.join(missing)} "
                        f"package{'s' if len(missing) > 1 else ''}: pip install "
                        f"{' '.join(missing)}")
    import gguf
    return gguf


def check_gguf(path):
    """-> the GGUF file's architecture, after refusing in one line what transformers could not turn
    into a model: no such file, not GGUF, truncated or damaged (its header or a tensor runs past the
    end), an architecture transformers does not read from GGUF, or a quantization it cannot undo.
    Reads the header and maps the file: seconds, where the conversion takes a minute."""
    if not os.path.isfile(path):
        what = "a directory, not a file" if os.path.isdir(path) else "no such file"
        raise UserError(f"{path}: {what}")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror}); give a file you may read, or "
                        "change its permissions") from None
    if magic != GGUF_MAGIC:
        raise UserError(f"{path}: not a GGUF file (it does not start with 'GGUF'); give a "
                        "llama.cpp .gguf file or a transformers model directory")
    gguf = require_gguf_package()
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    try:
        reader = gguf.GGUFReader(path)
        architecture = str(reader.fields["general.architecture"].contents())
        tensor_types = {t.tensor_type for t in reader.tensors}
    # the reader fails in many ways on a cut or damaged file (ValueError, IndexError, KeyError...)
    except Exception as e:
        raise UserError(f"{path}: a truncated or damaged GGUF file ({first_line(e)}); "
                        "download or assemble it again") from None
    readable = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    if architecture not in readable:
        raise UserError(f"{path}: a GGUF model of architecture '{architecture}', which "
                        f"transformers cannot read from GGUF (it reads {', '.join(readable)})")
    float_types = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}
    unknown = sorted(t.name for t in tensor_types
                     if t not in float_types and t not in gguf.quants._type_traits)
    if unknown:
        raise UserError(f"{path}: tensors quantized as {', '.join(unknown)}, which the gguf "
                        "package cannot dequantize; convert the model with another quantization")
    return architecture


def _entry_files(directory):
    return {name: os.path.getsize(os.path.join(directory, name))
            for name in sorted(os.listdir(directory)) if name != GGUF_ENTRY_RECORD}


def _complete_entry(directory):
    """Whether a cache entry holds every file its record names, at the size it names (a damaged or
    cut entry is rebuilt rather than refused: the GGUF file beside it is still good)."""
    try:
        record = read_json(os.path.join(directory, GGUF_ENTRY_RECORD))
        return isinstance(record, dict) and record.get("files") == _entry_files(directory)
    except (OSError, UserError):
        return False


def gguf_directory(path):
    """
    The transformers directory (config, float32 safetensors weights, tokenizer) of a GGUF file,
    converted on first use into gguf_cache_dir()/<sha256 of the file> and read from there after:
    seconds instead of a minute. The entry is written atomically (a kill leaves none or all of it),
    by one process at a time: another that wants it meanwhile waits, then reads it. A finished
    entry is never replaced, so a process may read it while others start.
    """
    path = os.path.abspath(os.fspath(path))
    architecture = check_gguf(path)
    sha256 = file_sha256(path)
    cache = gguf_cache_dir()
    entry = os.path.join(cache, sha256)
    if _complete_entry(entry):
        return entry
    check_output_path(entry, directory=True)  # $GGUF_CACHE under a file, or not writable
    os.makedirs(cache, exist_ok=True)
    lock = _lock_file(entry + ".lock")
    if lock is None:
        print(f"waiting for another process converting {path} into {entry}", file=sys.stderr,
              flush=True)
        lock = _lock_file(entry + ".lock", wait=True)
    with lock:  # closing it (an error, a kill) frees the lock
        if _complete_entry(entry):  # the other process's
            return entry
        _remove_unfinished_conversions(cache, sha256)
        if os.path.exists(entry):
            warn(f"{entry}: a damaged cache entry of {path}; converting the file again")
        _convert_gguf(path, entry, sha256, architecture)
    return entry


def _lock_file(path, wait=False):
    """The open file `path` holding an exclusive lock (flock: on one machine, or a shared file
    system that supports it, such as NFS), or None where another process holds it and not wait."""
    try:
        f = open(path, "a")
    except OSError as e:  # a shared cache whose lock file another user made
        raise UserError(f"{path}: cannot open this lock file of the GGUF cache ({e.strerror}); "
                        "set $GGUF_CACHE to a folder of your own") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        return f
    except BlockingIOError:
        f.close()
        return None
    except OSError as e:
        f.close()
        raise UserError(f"{os.path.dirname(path)}: cannot lock a file in the GGUF cache "
                        f"({e.strerror}); set $GGUF_CACHE to a folder on a local disk") from None


def _remove_unfinished_conversions(cache, sha256):
    """Remove the temporary folders that killed conversions left in the cache (a whole float32
    copy each): those of the entry `sha256`, whose lock the caller holds, and those of any other
    entry that no process is converting now (its lock is free)."""
    for name in os.listdir(cache):
        match = GGUF_TEMP_NAME.fullmatch(name)
        if not match:
            continue
        if match.group(1) == sha256:
            shutil.rmtree(os.path.join(cache, name), ignore_errors=True)
        elif lock := _lock_file(os.path.join(cache, match.group(1) + ".lock")):
            with lock:
                shutil.rmtree(os.path.join(cache, name), ignore_errors=True)


def _convert_gguf(path, entry, sha256, architecture):
    """Convert the GGUF file at path into the cache entry (see gguf_directory)."""
    print(f"converting {path} to a transformers directory in {entry} (once; a minute or two on a "
          "CPU)", file=sys.stderr, flush=True)
    directory, name = os.path.split(path)
    with atomic_directory(entry) as tmp, transformers_quietly():
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
            config = AutoConfig.from_pretrained(directory, gguf_file=name)
            if config.model_type == "gpt2":  # transformers reads GPT-2's window into n_ctx only
                config.n_positions = config.n_ctx
            model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, config=config,
                                                         dtype=torch.float32)
        except ImportError as e:  # transformers names the package it lacks
            raise UserError(f"{path}: {first_line(e)}") from None
        except Exception as e:
            raise UserError(f"{path}: transformers could not read this GGUF model "
                            f"({first_line(e)})") from None
        # the weights are plain float now: saving refuses while the model still says it is
        # quantized
        model.hf_quantizer, model.is_quantized = None, False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {"gguf_file": path, "sha256": sha256, "architecture": architecture,
                  "files": _entry_files(tmp)}
        atomic_write_text(os.path.join(tmp, GGUF_ENTRY_RECORD), json.dumps(record, indent=2))



# --------------------------------------------------------------------------------------------------
# weight checks


def check_finite_weights(model, source):
    """One line naming `source` and the first parameter that holds NaN or inf. A diverged run's
    weights do not fail on their own: they score as chance, so evaluation and training check before
    they start."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise UserError(f"{source}: non-finite weights (NaN or inf) in {name}; a diverged or "
                            "damaged model, use an earlier checkpoint")


def weights_fingerprint(model):
    """sha256 of a model's tensors (names, dtypes, shapes and bytes), hex: what two loads of the
    same weights share, whatever the file they came from."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _non_float_weights(where, name, dtype):
    """The error for a tensor of a non-float dtype where a weight belongs: loading would cast it to
    float without a word, and an integer or boolean copy of a model would be scored."""
    return UserError(f"{where}: non-float weights ({dtype}) in {name}; a damaged or wrongly "
                     "converted model, save its weights as float32, bfloat16 or float16")


def _check_safetensors(path):
    """A GPT-2 directory's safetensors file, refused in one line if it is truncated or corrupt or
    holds a tensor that is not float (the causal-mask buffers aside)."""
    for name, dtype in sorted(_safetensors_dtypes(path).items()):
        if dtype in NON_FLOAT_DTYPES and not name.endswith(MASK_BUFFERS):
            raise _non_float_weights(path, name, NON_FLOAT_DTYPES[dtype])


def _safetensors_dtypes(path):
    """{tensor name: safetensors dtype} from the header, which is enough to find a truncated file:
    it must cover the file exactly."""
    try:
        with safe_open(path, framework="pt") as f:
            return {name: f.get_slice(name).get_dtype() for name in f.keys()}
    except Exception as e:  # safetensors raises its own error type, and OSError
        raise UserError(f"{path}: not a readable safetensors file, truncated or corrupt "
                        f"({first_line(e)})") from None


def _check_loaded_dtypes(model, directory):
    """The tensors of a directory's weight files (safetensors, or the older pytorch_model*.bin)
    that transformers loaded into float weights of model are floats too; tensors it left out (a
    causal mask some architectures stored as bool) may be anything. A file's names may lack the
    model's prefix ("transformer.")."""
    prefix = model.base_model_prefix + "."
    floats = {k for k, v in model.state_dict().items() if v.is_floating_point()}
    for name in _loaded_weight_files(directory):
        path = os.path.join(directory, name)
        if name.endswith(".safetensors"):
            non_floats = {key: NON_FLOAT_DTYPES[dtype]
                          for key, dtype in _safetensors_dtypes(path).items()
                          if dtype in NON_FLOAT_DTYPES}
        else:
            non_floats = _bin_non_float_dtypes(path)
        for key, dtype in sorted(non_floats.items()):
            if {key, prefix + key, key.removeprefix(prefix)} & floats:
                raise _non_float_weights(path, key, dtype)


def _loaded_weight_files(directory):
    """The weight files transformers loads from a directory, picked as it picks them:
    model.safetensors, else the shards its index names, else the same for pytorch_model.bin.
    Other files beside them (an int8 copy, a stale .bin) are never read, so never judged."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if os.path.isfile(os.path.join(directory, single)):
            return [single]
        if os.path.isfile(os.path.join(directory, index)):
            content = read_json(os.path.join(directory, index))
            # a malformed index, or one naming a missing shard, is transformers' to report
            shards = content.get("weight_map") if isinstance(content, dict) else None
            names = shards.values() if isinstance(shards, dict) else []
            return sorted({name for name in names if isinstance(name, str)
                           and os.path.isfile(os.path.join(directory, name))})
    return []


def _bin_non_float_dtypes(path):
    """{tensor name: torch dtype name} of the tensors of a pytorch_model*.bin that are not float
    (memory-mapped where the format allows, so little is read; weights_only, as transformers
    loads it)."""
    try:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # transformers loaded it just before: unlikely, but one line
        raise UserError(f"{path}: not a readable PyTorch weights file ({first_line(e)})") from None
    return {key: str(t.dtype).removeprefix("torch.") for key, t in state_dict.items()
            if isinstance(t, torch.Tensor) and not t.is_floating_point()}


# --------------------------------------------------------------------------------------------------
# transformers


def load_transformers_checked(cls, source, allow_unexpected=False, **kwargs):
    """
    cls.from_pretrained(source, **kwargs), refused in one line (UserError) where transformers
    could load the weights only by making some up (missing or misshapen tensors: it would fill
    them with random values, and print a table where a run goes on) or, unless allow_unexpected,
    by leaving some out, or, from a local directory, by casting integer or boolean tensors to
    float weights.
    """
    with transformers_quietly():  # its table; _check_loading_info says what matters in one line
        model, info = cls.from_pretrained(source, output_loading_info=True,
                                          ignore_mismatched_sizes=True, **kwargs)
    _check_loading_info(info, source, allow_unexpected)
    if os.path.isdir(source):
        _check_loaded_dtypes(model, source)
    return model


@contextlib.contextmanager
def transformers_quietly():
    """transformers' warnings and its own progress bars (loading and writing weights) off, for a
    load or save whose outcome this project checks and reports itself. The hub's download bars
    are not transformers' own and stay."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    set_tqdm_hook = getattr(hf_logging, "set_tqdm_hook", None)  # in recent releases only
    if set_tqdm_hook:
        previous = set_tqdm_hook(lambda make_bar, args, kwargs:
                                 make_bar(*args, **{**kwargs, "disable": True}))
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if set_tqdm_hook:
            set_tqdm_hook(previous)


def _check_loading_info(info, where, allow_unexpected=False):
    if info["mismatched_keys"]:
        key, found, expected = sorted(info["mismatched_keys"])[0]
        raise UserError(f"{where}: the weights and config.json disagree: {key} is "
                        f"{tuple(found)}, but the config makes it {tuple(expected)}")
    missing = sorted(k for k in info["missing_keys"] if not k.endswith(MASK_BUFFERS))
    if missing:
        raise UserError(f"{where}: the weights lack {len(missing)} tensor(s) of this config "
                        f"({', '.join(missing[:3])}); the file is incomplete, export or download "
                        "it again")
    unexpected = sorted(k for k in info["unexpected_keys"] if not k.endswith(MASK_BUFFERS))
    if unexpected and not allow_unexpected:  # e.g. a config.json with fewer layers than the weights
        raise UserError(f"{where}: the weights hold {len(unexpected)} tensor(s) that config.json "
                        f"does not describe ({', '.join(unexpected[:3])}); fix config.json to "
                        "match them")


# --------------------------------------------------------------------------------------------------
# writing


def write_gpt2(out_dir, fields, state_dict):
    """Write a GPT's config fields and state dict as a transformers GPT-2 directory (config,
    safetensors, tokenizer) plus value_head.safetensors and gpt_config.json. The directory is
    replaced atomically: a crash leaves the old export or the new one, never half of one."""
    hf = _transformers_gpt2(fields, state_dict)
    with atomic_directory(out_dir) as tmp, transformers_quietly():
        hf.save_pretrained(tmp)
        gpt2_hf_tokenizer().save_pretrained(tmp)
        write_value_head(tmp, state_dict)
        with open(os.path.join(tmp, "gpt_config.json"), "w") as f:
            json.dump(fields, f, indent=2)


def write_value_head(directory, state_dict):
    """The value head's tensors of a policy's state dict, as value_head.safetensors in an export
    directory (beside the transformers model, which has no place for it)."""
    vh = {k.removeprefix("value_head."): v.detach().float().cpu().contiguous()
          for k, v in state_dict.items() if k.startswith("value_head.")}
    save_file(vh, os.path.join(directory, "value_head.safetensors"))


def _transformers_gpt2(fields, state_dict):
    """transformers' GPT2LMHeadModel holding a GPT's weights (the value head left out)."""
    c = fields
    hf_config = GPT2Config(
        vocab_size=c["vocab_size"], n_positions=c["block_size"], n_embd=c["n_embd"],
        n_layer=c["n_layer"], n_head=c["n_head"], layer_norm_epsilon=c["layer_norm_epsilon"],
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=EOT_TOKEN, eos_token_id=EOT_TOKEN, tie_word_embeddings=True)
    hf = GPT2LMHeadModel(hf_config)
    sd = {k: v.detach().float().cpu() for k, v in state_dict.items()
          if not k.startswith("value_head.")}
    for k in sd:
        if k.endswith(_CONV1D_WEIGHTS):
            sd[k] = sd[k].t().contiguous()
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    # a GPT without biases (nanoGPT's bias=False) is GPT-2 with zero biases
    zeroed = [k for k in missing if not c["bias"] and k.endswith(".bias")
              and not k.endswith(MASK_BUFFERS)]
    with torch.no_grad():
        for k in zeroed:
            hf.get_parameter(k).zero_()
    assert not unexpected and all(k.endswith(MASK_BUFFERS) or k in zeroed
                                  for k in missing), missing
    return hf
