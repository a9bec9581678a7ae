"""hellaswag.py around the scorer: the download (against a local HTTP server), the command line,
--compare and its statistics, and sharding across 2 gloo processes."""

import dataclasses
import http.server
import json
import os
import re
import subprocess
import sys
import threading

import pytest
import torch

import hellaswag
from common import UserError, run_cli
from hellaswag import (compare_predictions, download_split, evaluate, load_examples, load_model,
                       main, mcnemar_exact_p, paired_difference)
from model import GPT, GPTConfig
from weights import CHECKPOINT_FORMAT

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hellaswag_synthetic.jsonl")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=256)


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**TINY)).eval()


def save_checkpoint(path, seed=0, **config):
    """This project's checkpoint of a tiny GPT at path."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY, **config}))
    torch.save({"format": CHECKPOINT_FORMAT, "model_config": dataclasses.asdict(model.config),
                "model": model.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt_000010.pt")


# --------------------------------------------------------------------------------------------------
# download

class FakeServer:
    """Serves `body` at any path on 127.0.0.1; the first `failures` requests get a 503; `cut` sends
    a Content-Length longer than the body (a dropped connection)."""

    def __init__(self, body, failures=0, cut=False):
        self.body, self.failures, self.cut, self.requests = body, failures, cut, 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                if server.requests <= server.failures:
                    self.send_error(503)
                    return
                self.send_response(200)
                self.send_header("Content-Length",
                                 str(len(server.body) + (100 if server.cut else 0)))
                self.end_headers()
                self.wfile.write(server.body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hellaswag_{{split}}.jsonl"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fixture_bytes():
    with open(FIXTURE, "rb") as f:
        return f.read()


def test_download_retries_then_writes_the_split_once(tmp_path, monkeypatch, fixture_bytes):
    monkeypatch.setitem(hellaswag.SPLIT_LINES, "val", 6)
    monkeypatch.setenv("HELLASWAG_CACHE", str(tmp_path / "cache"))
    with FakeServer(fixture_bytes, failures=1) as server:
        monkeypatch.setattr(hellaswag, "DATA_URL", server.url)
        monkeypatch.setattr(hellaswag.time, "sleep", lambda s: None)
        examples = load_examples("val")
        assert server.requests == 2  # one 503, one success
    assert os.listdir(tmp_path / "cache") == ["hellaswag_val.jsonl"]  # no temporary file left
    assert (tmp_path / "cache" / "hellaswag_val.jsonl").read_bytes() == fixture_bytes
    assert [ex["ind"] for ex in examples] == [3, 8, 15, 21, 34, 55]
    assert len(load_examples("val")) == 6  # server gone: read from the cache


def test_download_with_the_wrong_line_count_leaves_nothing(tmp_path, monkeypatch, fixture_bytes):
    monkeypatch.setitem(hellaswag.SPLIT_LINES, "val", 10042)
    with FakeServer(fixture_bytes) as server:
        with pytest.raises(UserError, match="downloaded 6 examples, expected 10042"):
            download_split("val", cache_dir=str(tmp_path), url=server.url.format(split="val"))
    assert os.listdir(tmp_path) == []


def test_a_cut_connection_is_retried_then_reported(tmp_path, monkeypatch, fixture_bytes):
    monkeypatch.setitem(hellaswag.SPLIT_LINES, "val", 6)
    with FakeServer(fixture_bytes, cut=True) as server:
        with pytest.raises(UserError, match="after 2 tries.*--data FILE"):
            download_split("val", cache_dir=str(tmp_path), url=server.url.format(split="val"),
                           retries=2, retry_wait=0)
        assert server.requests == 2
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# command line

def test_cli_writes_results_and_predictions(tmp_path, checkpoint, capsys):
    # into folders that do not exist yet: made, as for every file the project writes
    output, predictions = tmp_path / "out" / "results.json", tmp_path / "new" / "preds.jsonl"
    main(["--model", checkpoint, "--data", FIXTURE, "--batch-size", "4", "--output", str(output),
          "--predictions", str(predictions)])
    printed = capsys.readouterr().out
    results = json.loads(output.read_text())
    direct = evaluate(GPT.from_pretrained(checkpoint), load_examples(data_file=FIXTURE))
    assert (results["n"], results["acc"], results["acc_norm"]) == (
        6, direct["acc"], direct["acc_norm"])
    assert (results["style"] == "completion" and results["model"] == checkpoint
            and results["split"] == "val")
    assert results["seconds"] > 0 and results["examples_per_s"] > 0
    assert {k: v["n"] for k, v in results["groups"]["split_type"].items()} == {"indomain": 3,
                                                                               "zeroshot": 3}
    assert {k: v["n"] for k, v in results["groups"]["source"].items()} == {"ActivityNet": 4,
                                                                           "WikiHow": 2}
    assert len(results["groups"]["activity_label"]) == 6
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert ([p["index"] for p in lines] == list(range(6))
            and [p["ind"] for p in lines] == [3, 8, 15, 21, 34, 55])
    for p in lines:
        assert {"label", "pred", "pred_norm", "sum_logprobs", "norm_scores"} <= set(p)
        assert len(p["sum_logprobs"]) == len(p["norm_scores"]) == 4
    assert sum(p["pred"] == p["label"] for p in lines) / 6 == results["acc"]
    assert f"acc_norm  {results['acc_norm']:.4f}" in printed


def test_a_stopped_evaluation_resumes_where_it_stopped(tmp_path, checkpoint, capsys,
                                                       monkeypatch):
    whole = tmp_path / "whole.jsonl"
    main(["--model", checkpoint, "--data", FIXTURE, "--predictions", str(whole)])
    monkeypatch.setattr(hellaswag, "PARTIAL_CHUNK", 2)
    scored, real_evaluate = [], hellaswag.evaluate

    def stop_after_two_chunks(model, examples, **kwargs):
        if len(scored) == 4:
            raise KeyboardInterrupt
        scored.extend(ex["index"] for ex in examples)
        return real_evaluate(model, examples, **kwargs)

    monkeypatch.setattr(hellaswag, "evaluate", stop_after_two_chunks)
    predictions = tmp_path / "preds.jsonl"
    argv = ["--model", checkpoint, "--data", FIXTURE, "--predictions", str(predictions)]
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    partial = tmp_path / "preds.jsonl.partial"
    assert not predictions.exists() and len(partial.read_text().splitlines()) == 1 + 4
    with open(partial, "a") as f:
        f.write('{"index": 4, "lab')  # a line torn by the kill
    monkeypatch.setattr(hellaswag, "evaluate", real_evaluate)
    capsys.readouterr()
    main(argv)
    assert "resuming" in capsys.readouterr().out and not partial.exists()
    # as if it had never stopped (batches of other examples round differently)
    resumed, uninterrupted = ([json.loads(line) for line in path.read_text().splitlines()]
                              for path in (predictions, whole))
    for a, b in zip(resumed, uninterrupted, strict=True):
        assert a["sum_logprobs"] == pytest.approx(b["sum_logprobs"], abs=1e-4)
        assert {**a, "sum_logprobs": 0, "norm_scores": 0} == {**b, "sum_logprobs": 0,
                                                              "norm_scores": 0}
    assert scored == [0, 1, 2, 3]


@pytest.mark.parametrize("partial_text, message", [
    ('{"settings": {"model": "other"}}\n', "an unfinished evaluation with other settings"),
    ("not json\n", "not the progress file of an evaluation"),
])
def test_an_unfinished_evaluation_of_other_settings_is_one_line(tmp_path, checkpoint,
                                                                partial_text, message):
    (tmp_path / "preds.jsonl.partial").write_text(partial_text)
    with pytest.raises(UserError, match=message):
        main(["--model", checkpoint, "--data", FIXTURE, "--predictions",
              str(tmp_path / "preds.jsonl")])


def stop_after_the_first_chunk(monkeypatch):
    """hellaswag.evaluate, stopped as by Ctrl-C when it is called a second time."""
    calls, real_evaluate = [], hellaswag.evaluate

    def evaluate_once(model, examples, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(len(examples))
        return real_evaluate(model, examples, **kwargs)

    monkeypatch.setattr(hellaswag, "evaluate", evaluate_once)


def test_an_unfinished_evaluation_of_other_data_is_one_line(tmp_path, checkpoint, monkeypatch):
    monkeypatch.setattr(hellaswag, "PARTIAL_CHUNK", 2)
    predictions, partial = tmp_path / "preds.jsonl", tmp_path / "preds.jsonl.partial"
    argv = ["--model", checkpoint, "--data", FIXTURE, "--predictions", str(predictions)]
    stop_after_the_first_chunk(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    # a progress file whose predictions no longer follow the data it was made with
    first, prediction, rest = partial.read_text().split("\n", 2)
    prediction = json.loads(prediction)
    prediction["label"] = (prediction["label"] + 1) % 4
    partial.write_text(first + "\n" + json.dumps(prediction) + "\n" + rest)
    with pytest.raises(UserError, match=r"do not follow the data \(example 0\)"):
        main(argv)


@pytest.mark.parametrize("replaced", ["the file", "the run's newest checkpoint", "the data"])
def test_a_resumed_evaluation_of_other_weights_or_data_at_the_same_path_is_refused(
        tmp_path, monkeypatch, replaced):
    """The progress file knows what its scores came from, not only the paths: resuming it with
    another model or other data at the same path would mix two evaluations in one accuracy."""
    monkeypatch.setattr(hellaswag, "PARTIAL_CHUNK", 2)
    run_dir, data = tmp_path / "run", tmp_path / "data.jsonl"
    run_dir.mkdir()
    data.write_text(open(FIXTURE).read())
    model = (save_checkpoint(run_dir / "ckpt_000010.pt") if replaced != "the file"
             else save_checkpoint(tmp_path / "model.pt"))
    given = str(run_dir) if replaced == "the run's newest checkpoint" else model
    argv = ["--model", given, "--data", str(data), "--predictions", str(tmp_path / "p.jsonl")]
    stop_after_the_first_chunk(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    monkeypatch.setattr(hellaswag, "evaluate", evaluate)
    if replaced == "the file":  # overwritten by another model
        save_checkpoint(model, seed=1)
        message = "an unfinished evaluation of other weights"
    elif replaced == "the run's newest checkpoint":  # the run went on
        save_checkpoint(run_dir / "ckpt_000020.pt", seed=1)
        message = r"other settings \(checkpoint: .*ckpt_000010.pt -> .*ckpt_000020.pt\)"
    else:  # a context edited, the labels as they were
        data.write_text(data.read_text().replace("A woman pours", "A man pours"))
        message = r"other settings \(examples_sha256: "
    with pytest.raises(UserError, match=message):
        main(argv)


def test_an_evaluation_killed_before_its_first_chunk_starts_over(tmp_path, checkpoint,
                                                                 monkeypatch, capsys):
    """The settings line is on disk before the first chunk is scored; an empty progress file (which
    a kill left when it was not) is no progress, not a file of other settings."""
    predictions, partial = tmp_path / "p.jsonl", tmp_path / "p.jsonl.partial"
    argv = ["--model", checkpoint, "--data", FIXTURE, "--predictions", str(predictions)]
    on_disk, real_evaluate = [], hellaswag.evaluate

    def evaluate_and_look(model, examples, **kwargs):
        on_disk.append(partial.read_text())
        return real_evaluate(model, examples, **kwargs)

    monkeypatch.setattr(hellaswag, "evaluate", evaluate_and_look)
    main(argv)
    assert json.loads(on_disk[0])["settings"]["model"] == checkpoint
    whole = predictions.read_text()
    predictions.unlink()
    partial.write_text("")
    main(argv)
    assert predictions.read_text() == whole and not partial.exists()
    assert "resuming" not in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"my notes\nnot finished", b'{"index": 0}\n{"ind'])
def test_a_file_that_is_not_a_progress_file_is_refused_untouched(tmp_path, checkpoint,
                                                                 content):
    """Refused as it is: the torn last line of a progress file is cut only once the file is known
    to be one."""
    partial = tmp_path / "p.jsonl.partial"
    partial.write_bytes(content)
    with pytest.raises(UserError, match="not the progress file of an evaluation"):
        main(["--model", checkpoint, "--data", FIXTURE, "--predictions",
              str(tmp_path / "p.jsonl")])
    assert partial.read_bytes() == content


def test_a_progress_file_of_other_settings_is_refused_before_the_model_loads(
        tmp_path, checkpoint, monkeypatch):
    (tmp_path / "p.jsonl.partial").write_text('{"settings": {"model": "other"}}\n')

    def no_loading(source):
        raise AssertionError(f"{source} loaded")

    monkeypatch.setattr(hellaswag, "load_model", no_loading)
    with pytest.raises(UserError, match=r"other settings \(model: other -> "):
        main(["--model", checkpoint, "--data", FIXTURE, "--predictions",
              str(tmp_path / "p.jsonl")])


def test_output_on_the_progress_file_is_refused(tmp_path, checkpoint, capsys):
    """It would be written over the progress file, and removed with it at the end."""
    predictions = str(tmp_path / "p.jsonl")
    with pytest.raises(SystemExit) as e:
        run_cli(main, ["--model", checkpoint, "--data", FIXTURE, "--predictions", predictions,
                       "--output", predictions + ".partial"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(
        f"error: --output {predictions}.partial is where --predictions {predictions} keeps its "
        "progress")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# the progress bar


def without_timings(printed):
    """The summary line's seconds and speed vary from run to run."""
    return re.sub(r"\| [\d.]+s \| [\d.]+ examples/s", "| TIME", printed)


@pytest.mark.parametrize("kind", ["gpt", "transformers"])
@pytest.mark.parametrize("predictions", [False, True])
def test_the_scoring_bar_is_drawn_on_a_terminal_only_and_never_changes_stdout(
        tmp_path, checkpoint, terminal_stderr, monkeypatch, kind, predictions):
    model = checkpoint if kind == "gpt" else gpt2_with_its_own_tokenizer(tmp_path / "gpt2")
    argv = ["--model", model, "--data", FIXTURE, "--batch-size", "2"]
    runs = {}
    for run in ("terminal", "--no-progress", "pipe"):
        if run == "pipe":
            monkeypatch.undo()  # stderr is capsys's again, no terminal
        output = tmp_path / f"{run}.jsonl"
        main(argv + (["--predictions", str(output)] if predictions else [])
             + (["--no-progress"] if run == "--no-progress" else []))
        runs[run] = terminal_stderr.readouterr()
        if predictions:
            assert output.read_text() == (tmp_path / "terminal.jsonl").read_text()
    printed = {run: without_timings(out) for run, (out, _) in runs.items()}
    assert printed["terminal"] == printed["--no-progress"] == printed["pipe"]
    assert runs["--no-progress"].err == runs["pipe"].err == ""
    bar = runs["terminal"].err
    assert "hellaswag:   0%" in bar and "0/24 [00:00<?, ? ending/s]" in bar


def test_a_resumed_evaluation_starts_its_bar_where_it_stopped(tmp_path, checkpoint,
                                                             terminal_stderr, monkeypatch):
    monkeypatch.setattr(hellaswag, "PARTIAL_CHUNK", 2)
    argv = ["--model", checkpoint, "--data", FIXTURE, "--predictions", str(tmp_path / "p.jsonl")]
    stop_after_the_first_chunk(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    monkeypatch.setattr(hellaswag, "evaluate", evaluate)
    terminal_stderr.readouterr()
    main(argv)
    assert "hellaswag:  33%" in terminal_stderr.readouterr().err  # 2 of the 6 examples


def test_an_error_while_scoring_clears_the_bar_before_its_line(tmp_path, terminal_stderr):
    short = save_checkpoint(tmp_path / "short.pt", block_size=8)
    with pytest.raises(SystemExit):
        run_cli(main, ["--model", short, "--data", FIXTURE])
    *drawn, cleared, error = terminal_stderr.readouterr().err.split("\r")
    assert "hellaswag" in drawn[-1] and not cleared.strip()
    assert error.startswith("error: example 0: an ending of") and error.count("\n") == 1


def test_cli_on_a_transformers_model_of_another_architecture(tmp_path, capsys):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from tokenizer import gpt2_hf_tokenizer

    torch.manual_seed(0)
    config = GPTNeoConfig(vocab_size=50257, hidden_size=64, num_layers=2, num_heads=2,
                          attention_types=[[["global"], 2]],
                          max_position_embeddings=256)
    # stored in bf16, as many are
    GPTNeoForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "neo")
    gpt2_hf_tokenizer().save_pretrained(tmp_path / "neo")
    model, tokenizer = load_model(str(tmp_path / "neo"))
    assert type(model).__name__ == "GPTNeoForCausalLM" and tokenizer is not None
    # --dtype picks the autocast, not the weights
    assert all(p.dtype == torch.float32 for p in model.parameters())
    main(["--model", str(tmp_path / "neo"), "--data", FIXTURE, "--style", "lm-eval", "--output",
          str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text())["n"] == 6


def gpt2_with_its_own_tokenizer(path, vocab_size=400, **config):
    """A tiny transformers GPT-2 trained on another vocabulary (as GPT-2s for other languages are),
    its BPE saved beside it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    with open(FIXTURE) as f:
        corpus = [json.loads(line)["ctx"] for line in f] * 20
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=64, n_layer=2,
                               n_head=2, eos_token_id=tokenizer.eos_token_id,
                               **config)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("vocab_size", [400, 50257])
def test_a_gpt2_with_its_own_tokenizer_is_scored_with_it(tmp_path, vocab_size):
    """GPT-2's architecture does not mean GPT-2's tokens: such a model is scored as a judge is, with
    its own tokenizer (a smaller vocabulary would crash GPT-2's token ids; one of the same size
    would score them silently as the wrong text)."""
    from causal_lm import CausalLM

    path = gpt2_with_its_own_tokenizer(tmp_path / "gpt2", vocab_size=min(vocab_size, 400))
    if vocab_size > 400:  # GPT-2's size, another tokenizer
        from transformers import GPT2Config, GPT2LMHeadModel
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=256, n_embd=64, n_layer=2,
                                   n_head=2)).save_pretrained(path)
    model, tokenizer = load_model(path)
    assert (not isinstance(model, GPT)
            and tokenizer.get_vocab() == CausalLM.load(path).tokenizer.get_vocab())
    examples = load_examples("val", FIXTURE)
    scored = evaluate(model, examples, tokenizer=tokenizer, return_predictions=True)["predictions"]
    judge = CausalLM.load(path)
    for ex, p in zip(examples, scored):
        endings = [" " + e for e in ex["endings"]]
        expected = judge.score([ex["ctx"]] * 4, endings)
        torch.testing.assert_close(torch.tensor(p["sum_logprobs"]), expected["sum_logprob"],
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("setting", [{"scale_attn_by_inverse_layer_idx": True},
                                     {"tie_word_embeddings": False}])
def test_a_gpt2_variant_this_gpt_does_not_compute_is_scored_by_transformers(tmp_path, setting):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tokenizer import gpt2_hf_tokenizer

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_positions=256, n_embd=64, n_layer=2, n_head=2,
                                    **setting)).eval()
    hf.save_pretrained(tmp_path / "hf")
    gpt2_hf_tokenizer().save_pretrained(tmp_path / "hf")
    model, tokenizer = load_model(str(tmp_path / "hf"))
    assert isinstance(model, GPT2LMHeadModel) and tokenizer is not None
    example = load_examples("val", FIXTURE)[0]
    scored = evaluate(model, [example], tokenizer=tokenizer,
                      return_predictions=True)["predictions"][0]
    ids = tokenizer(example["ctx"] + " " + example["endings"][0])["input_ids"]
    n_ending = len(tokenizer(" " + example["endings"][0])["input_ids"])
    logprobs = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1].float(), -1)
    expected = logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])][-n_ending:].sum()
    assert abs(scored["sum_logprobs"][0] - expected.item()) < 1e-4


def test_a_project_export_is_still_scored_by_the_projects_gpt(tmp_path):
    tiny_gpt().save_pretrained(tmp_path / "hf")  # GPT-2's own tokenizer files beside it
    model, tokenizer = load_model(str(tmp_path / "hf"))
    assert isinstance(model, GPT) and tokenizer is None
    # copied without its vocabulary: GPT-2's as before
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (tmp_path / "hf" / name).unlink(missing_ok=True)
    model, tokenizer = load_model(str(tmp_path / "hf"))
    assert isinstance(model, GPT) and tokenizer is None


@pytest.mark.parametrize("argv, message", [
    (["--data", FIXTURE], "give --model"),
    (["--model", "MODEL", "--data", "missing.jsonl"], "missing.jsonl: no such file"),
    (["--model", "MODEL", "--data", "BAD"], "line 2: field 'endings'"),
    (["--model", "nowhere/ckpt.pt", "--data", FIXTURE], "no such file"),
    (["--model", "MODEL", "--split", "test"], "test split has no labels"),
    (["--model", "MODEL", "--data", FIXTURE, "--limit", "0"], "must be positive"),
    (["--model", "MODEL", "--data", FIXTURE, "--device", "gpu"], "device 'gpu': not a device name"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, checkpoint, capsys, argv, message):
    bad = tmp_path / "bad.jsonl"
    with open(FIXTURE) as f:
        bad.write_text(f.readline() + json.dumps({"ctx": "x", "endings": ["a"], "label": 0}) + "\n")
    argv = [{"MODEL": checkpoint, "BAD": str(bad)}.get(a, a) for a in argv]
    with pytest.raises(SystemExit) as e:
        run_cli(main, argv)
    err = capsys.readouterr().err
    assert (e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
            and message in err)


@pytest.mark.parametrize("kind", ["gpt", "transformers"])
def test_text_that_is_not_valid_unicode_is_one_line(tmp_path, checkpoint, capsys, kind):
    """A lone surrogate ("\\ud800" in the JSON) is refused for every model: this project's GPT
    would score it as U+FFFD, a transformers tokenizer would raise a TypeError."""
    with open(FIXTURE) as f:
        first, second = f.readline(), json.loads(f.readline())
    second["endings"][1] += " \ud800"
    data = tmp_path / "data.jsonl"
    data.write_text(first + json.dumps(second) + "\n")
    model = checkpoint if kind == "gpt" else gpt2_with_its_own_tokenizer(tmp_path / "gpt2")
    with pytest.raises(SystemExit) as e:
        run_cli(main, ["--model", model, "--data", str(data)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(
        f"error: {data}, line 2: field 'endings': ending 1 holds a lone surrogate (U+D800) at "
        f"character {len(second['endings'][1]) - 1}, which is not valid Unicode text")
    if kind == "transformers":  # examples built in code reach the scorer: one line too
        examples = load_examples(data_file=FIXTURE, limit=2)
        examples[1]["ctx"] += " \ud800"
        lm, tokenizer = load_model(model)
        with pytest.raises(UserError, match=r"^example 1: the context holds a lone surrogate"):
            evaluate(lm, examples, tokenizer=tokenizer)


def test_cli_entry_point_in_a_subprocess(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "hellaswag.py", "--model", str(tmp_path / "none.pt"),
                           "--data", FIXTURE],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("error: ") and "no such file" in proc.stderr


# --------------------------------------------------------------------------------------------------
# --compare

def test_mcnemar_exact_p_values():
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(3, 3) == 1.0
    assert mcnemar_exact_p(0, 5) == pytest.approx(2 / 32)
    # P(X <= 1) for X ~ Bin(10, 1/2), two-sided
    assert mcnemar_exact_p(9, 1) == pytest.approx(2 * 11 / 1024)
    assert 0 < mcnemar_exact_p(1400, 1600) < 0.001  # large counts stay exact and finite


def test_paired_difference_interval():
    a = [1, 1, 0, 0, 1, 0, 1, 0]
    b = [1, 0, 1, 1, 1, 1, 1, 0]  # diffs: 0 -1 1 1 0 1 0 0 -> mean 0.25, sample sd 0.7071
    c = paired_difference(a, b)
    assert (c["acc_a"], c["acc_b"], c["diff"], c["a_only"], c["b_only"]) == (0.5, 0.75, 0.25, 1, 3)
    half = 1.96 * 0.7071067811865476 / 8 ** 0.5
    assert c["ci95"] == pytest.approx([0.25 - half, 0.25 + half])
    assert c["p_value"] == pytest.approx(mcnemar_exact_p(1, 3))


def test_paired_difference_refuses_lists_that_do_not_pair():
    """zip would drop the longer list's tail and divide by the other's length."""
    for a, b in (([1, 0, 1], [1, 0]), ([1], [1, 1]), ([], [])):
        with pytest.raises(ValueError, match="the same examples"):
            paired_difference(a, b)


def test_compare_groups_an_example_by_whichever_file_records_its_group():
    """A file that does not record a group (an older --predictions file) is still paired line by
    line with one that does."""
    labels, groups = [0, 1, 2, 3], ["indomain", "indomain", "zeroshot", "zeroshot"]
    a = [{"index": i, "label": y, "pred": 0, "pred_norm": 0, "split_type": g}
         for i, (y, g) in enumerate(zip(labels, groups))]  # right on 0
    b = [{"index": i, "label": y, "pred": y, "pred_norm": y} for i, y in enumerate(labels)]
    for first, second, diff in ((a, b, 1.0), (b, a, -1.0)):
        by_group = compare_predictions(first, second)["groups"]["split_type"]
        assert by_group["indomain"]["n"] == by_group["zeroshot"]["n"] == 2
        assert by_group["zeroshot"]["diff"] == diff
        assert by_group["indomain"]["diff"] == diff / 2


def write_predictions(path, labels, preds, groups):
    path.write_text("".join(json.dumps({"index": i, "label": y, "pred": p, "pred_norm": p,
                                        "split_type": g, "sum_logprobs": [0.0] * 4,
                                        "norm_scores": [0.0] * 4}) + "\n"
                            for i, (y, p, g) in enumerate(zip(labels, preds, groups))))
    return str(path)


def test_compare_cli_reports_both_runs_and_groups(tmp_path, capsys):
    labels = [0, 1, 2, 3, 0, 1, 2, 3]
    groups = ["indomain"] * 4 + ["zeroshot"] * 4
    # right on 0 and 4
    a = write_predictions(tmp_path / "a.jsonl", labels, [0, 0, 0, 0, 0, 0, 0, 0], groups)
    # right on 0-3 and 5
    b = write_predictions(tmp_path / "b.jsonl", labels, [0, 1, 2, 3, 1, 1, 1, 1], groups)
    main(["--compare", a, b])
    out = capsys.readouterr().out
    assert "acc_norm    0.2500  0.6250  +0.3750" in out
    assert "indomain" in out and "zeroshot" in out
    # a field neither file records (here all but split_type) gets no empty heading
    assert "acc_norm by split_type" in out and out.count("acc_norm by") == 1
    comparison = compare_predictions(hellaswag.read_predictions(a), hellaswag.read_predictions(b))
    assert comparison["groups"]["split_type"]["indomain"]["diff"] == 0.75
    assert comparison["groups"]["split_type"]["zeroshot"]["diff"] == 0.0
    assert (comparison["acc"]["a_only"], comparison["acc"]["b_only"]) == (1, 4)


def test_compare_refuses_files_of_different_data(tmp_path, capsys):
    a = write_predictions(tmp_path / "a.jsonl", [0, 1, 2], [0, 0, 0], ["x"] * 3)
    b = write_predictions(tmp_path / "b.jsonl", [0, 1, 3], [0, 0, 0], ["x"] * 3)
    c = write_predictions(tmp_path / "c.jsonl", [0, 1], [0, 1], ["x"] * 2)
    with pytest.raises(SystemExit):
        run_cli(main, ["--compare", a, b])
    assert "differ in index/label/ind at prediction 3 (index 2)" in capsys.readouterr().err
    # a shorter file (--limit) of the same data: compared on the examples both cover, and said so
    run_cli(main, ["--compare", a, c])
    out = capsys.readouterr().out
    assert "note: compared on the 2 examples both cover (3 and 2 evaluated)" in out
    assert "acc_norm    0.5000  1.0000  +0.5000" in out
    d = tmp_path / "d.jsonl"
    d.write_text(json.dumps({"index": 5, "label": 0, "pred": 0, "pred_norm": 0}) + "\n")
    with pytest.raises(SystemExit):
        run_cli(main, ["--compare", a, str(d)])
    assert "share no example index" in capsys.readouterr().err
    (tmp_path / "junk.jsonl").write_text('{"index": 0}\n')
    with pytest.raises(UserError, match="not a prediction line"):
        hellaswag.read_predictions(str(tmp_path / "junk.jsonl"))


@pytest.mark.parametrize("value", [3, None, ["indomain"]])
def test_compare_a_group_field_that_is_not_text_is_one_line(tmp_path, capsys, value):
    """A hand-edited group field of another type among text ones would not sort (a traceback)."""
    a = write_predictions(tmp_path / "a.jsonl", [0, 1, 2], [0, 0, 0], ["indomain"] * 3)
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    edited = {**json.loads(lines[1]), "split_type": value}
    b = tmp_path / "b.jsonl"
    b.write_text("\n".join([lines[0], json.dumps(edited), lines[2]]) + "\n")
    with pytest.raises(SystemExit) as e:
        run_cli(main, ["--compare", a, str(b)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(
        f"error: {b}, line 2: 'split_type' is {json.dumps(value)}, but a group field is text")


# --------------------------------------------------------------------------------------------------
# distributed: 2 gloo processes on CPU

def _ddp_worker(rank, world_size, store_path, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                                         world_size=world_size)
    try:
        model = torch.nn.parallel.DistributedDataParallel(tiny_gpt())
        examples = load_examples(data_file=FIXTURE, limit=5)  # 3 on rank 0, 2 on rank 1
        result = evaluate(model, examples, batch_size=2, return_predictions=True)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        # DDP's reducer must not be the process group's last owner at teardown (train_ppo.train)
        del model
        torch.distributed.barrier()  # both ranks past every collective before the teardown
    finally:
        torch.distributed.destroy_process_group()


def _ddp_error_worker(rank, world_size, store_path, out_dir):
    import datetime

    torch.distributed.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                                         world_size=world_size,
                                         timeout=datetime.timedelta(seconds=30))
    try:
        torch.manual_seed(0)
        # fits the first 4 examples' endings (<= 16 tokens)
        model = GPT(GPTConfig(**{**TINY, "block_size": 17}))
        examples = load_examples(data_file=FIXTURE, limit=4)
        examples[1]["endings"][2] = (
            "a very long ending with far more tokens than this small model's window " * 2)
        try:  # example 1 is rank 1's: rank 0 alone would wait for it in a collective
            evaluate(model, examples)
            message = "no error"
        except UserError as e:
            message = str(e)
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(message)
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_an_error_on_one_rank_is_raised_on_every_rank(tmp_path):
    torch.multiprocessing.spawn(_ddp_error_worker, args=(2, str(tmp_path / "store"), str(tmp_path)),
                                nprocs=2)
    messages = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)]
    assert messages[0] == messages[1]
    assert messages[0].startswith("example 1: an ending of") and "17-token window" in messages[0]


@pytest.mark.slow
def test_ddp_shards_and_every_rank_returns_the_single_process_totals(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)),
                                nprocs=2)
    single = evaluate(tiny_gpt(), load_examples(data_file=FIXTURE, limit=5),
                      return_predictions=True)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert (result["n"], result["acc"], result["acc_norm"]) == (
            5, single["acc"], single["acc_norm"])
        assert [p["index"] for p in result["predictions"]] == list(range(5))
        for p, q in zip(result["predictions"], single["predictions"]):
            assert (p["pred"], p["pred_norm"]) == (q["pred"], q["pred_norm"])
            assert p["sum_logprobs"] == pytest.approx(q["sum_logprobs"], abs=1e-4)
