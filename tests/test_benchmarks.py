"""The benchmark scripts run end to end on tiny stand-ins (their numbers are for docs/results.md,
not for tests)."""

import json
import os
import subprocess
import sys

import pytest

import synthetic
from common import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import arguments  # noqa: E402


def run_script(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("recipe, reward_dir", [
    ("gpt2_hellaswag_teacher", "reward-gpt-neo-2.7B-tiny-float32"),
    ("gpt2_hellaswag_label", None)])
def test_recipe_cost_runs_a_recipe_on_stand_ins(tmp_path, recipe, reward_dir):
    data = tmp_path / "train.jsonl"
    synthetic.write_jsonl(data, synthetic.make_examples(40, seed=0, split="train"))
    out = tmp_path / "cost.json"
    proc = run_script("benchmarks/recipe_cost.py", f"configs/{recipe}.py", "--tiny", "--device=cpu",
                      "--steps", "2", "--data", str(data), "--work", str(tmp_path / "work"),
                      "--output", str(out),
                      "--batch_size=8", "--minibatch_size=4", "--micro_batch_size=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["steps"] == 2 and result["batch_size"] == 8 and result["device"] == "cpu"
    assert result["step_s"] > 0 and result["samples_per_s"] > 0 and result["peak_mem_gb"] > 0
    # the phases are parts of the step: each timed, together no more than the step
    assert set(result["phase_s"]) == {"rollout", "reference", "reward", "update"}
    assert all(s > 0 for s in result["phase_s"].values())
    assert sum(result["phase_s"].values()) <= result["step_s"]
    with open(tmp_path / "work" / "policy-gpt2-tiny" / "config.json") as f:
        assert json.load(f)["n_layer"] == 2  # the stand-in, not the hub model, was trained
    with open(tmp_path / "work" / f"run-{recipe}" / "train_config.json") as f:
        config = json.load(f)
    assert config["init_from"] == str(tmp_path / "work" / "policy-gpt2-tiny")
    if reward_dir:
        assert config["reward_model"] == str(tmp_path / "work" / reward_dir)
        # the teacher really scored
        assert os.listdir(tmp_path / "work" / f"run-{recipe}" / "teacher_cache")


def test_recipe_cost_errors_are_one_line(tmp_path):
    data = tmp_path / "train.jsonl"
    synthetic.write_jsonl(data, synthetic.make_examples(8, seed=0, split="train"))
    proc = run_script("benchmarks/recipe_cost.py", "configs/gpt2_hellaswag_teacher.py", "--tiny",
                      "--device=cpu", "--data", str(data), "--work", str(tmp_path),
                      "--reward_model=someone/unknown-model")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no stand-in shape known" in proc.stderr
    proc = run_script("benchmarks/recipe_cost.py", "configs/gpt2_hellaswag_teacher.py", "--data",
                      "missing.jsonl")
    assert proc.returncode == 0 and proc.stdout.startswith("skipped: no data file")


def test_choice_speed_skips_without_the_data(tmp_path):
    proc = run_script("benchmarks/choice_speed.py", "--data", str(tmp_path / "missing.jsonl"))
    assert (proc.returncode == 0 and proc.stdout.startswith("skipping:")
            and "missing.jsonl" in proc.stdout)


def write_metrics(path, lines, finished=True):
    os.makedirs(path)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(line) + "\n" for line in lines))
    if finished:  # what train_once leaves last
        with open(os.path.join(path, "bench.json"), "w") as f:
            json.dump({"args": [], "seconds": 60.0}, f)


def test_estimators_tables_from_the_runs_files(tmp_path):
    """--reuse reads the runs' metrics.jsonl: half the gain, first -> final, the mean KL of the last
    5 steps, the median step time, and for generate the judge's 10-step moving average and the
    last evaluation."""
    evals = {0: 0.25, 10: 0.5, 20: 0.5, 30: 0.75}  # half of the gain (0.25 -> 0.75) at step 10
    choice = [{"step": 0, "eval/acc_norm": 0.25}] + [
        {"step": s, "kl": s / 10, "dt": 1.0 + (s == 30), **({"eval/acc_norm": evals[s]}
                                                           if s in evals else {})}
        for s in range(1, 31)]
    for adv, kl in [("gae", "sampled"), ("gae", "exact"), ("expected", "sampled"),
                    ("expected", "exact")]:
        write_metrics(tmp_path / f"choice_{adv}_{kl}_7", choice)
    # the judge: -3 for 10 steps, then -1: its moving average passes -2 (half) at step 15
    generate = [{"step": s, "kl": 2.0, "dt": 0.5, "train/judge_score": -3.0 if s <= 10 else -1.0,
                 **({"eval/acc_norm": 0.25 + s / 100} if s % 10 == 0 else {})}
                for s in range(1, 41)]
    for name in ("gae", "grpo", "reinforce++", "grpo_seq-mean-token-sum-norm"):
        write_metrics(tmp_path / f"generate_{name}_7", generate)
    proc = run_script("benchmarks/estimators.py", "--reuse", "--work", str(tmp_path),
                      "--seeds", "7")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split(" | ")[0]: line for line in proc.stdout.splitlines()
            if line.startswith("| ") and "---" not in line}
    assert rows["| gae × sampled"] == "| gae × sampled | 1 | 10 | 0.250 → 0.750 | 2.8000 | 1.00 |"
    assert rows["| grpo (group 4)"] == (
        "| grpo (group 4) | 1 | 15 | -3.000 → -1.000 | 0.650 | 2.0000 | 0.50 |")
    assert rows["| grpo (group 4) × seq-mean-token-sum-norm"].startswith(
        "| grpo (group 4) × seq-mean-token-sum-norm | 1 | 15 |")
    assert rows["| reinforce++"].startswith("| reinforce++ | 1 | 15 |")
    # the title counts the runs' own steps, not --generate_steps' default (240)
    assert "configs/demo_generate.py, 40 steps (generate rollouts" in proc.stdout
    proc = run_script("benchmarks/estimators.py", "--reuse", "--work", str(tmp_path / "none"))
    assert proc.returncode == 2 and proc.stderr.startswith("error: --reuse: ")
    assert proc.stderr.strip().count("\n") == 0 and "choice_gae_sampled_1337" in proc.stderr


def test_estimators_show_a_bar_over_the_settings_on_a_terminal_only(terminal_stderr,
                                                                      monkeypatch):
    import estimators

    rows = [("gae", ["run 1", "run 2"]), ("grpo", ["run 3"])]
    for run in ("terminal", "pipe"):
        if run == "pipe":
            monkeypatch.setattr(type(sys.stderr), "isatty", lambda self: False)
        assert estimators.summaries(rows, lambda metrics, run: metrics.upper(), str) == [
            ("gae", ["RUN 1", "RUN 2"]), ("grpo", ["RUN 3"])]
        out, err = terminal_stderr.readouterr()
        assert out == "" and (("settings:   0%" in err) if run == "terminal" else err == "")


@pytest.mark.parametrize("metrics, message", [
    ("", "metrics.jsonl: empty, no step logged"),
    ('{"step": 0, "eval/acc_norm": 0.25}\n{"step": 1, "kl',
     "metrics.jsonl, line 2: not valid JSON"),
    ("a directory", "metrics.jsonl: a directory, not a run's metrics"),
    ('{"step": 0}\n', "metrics.jsonl: no training step or evaluation logged; train it again")])
def test_estimators_reuse_of_a_damaged_run_is_one_line_and_prints_no_table(tmp_path, metrics,
                                                                           message):
    """Each run's file is read before a table prints: a bad one (here the last generate run's)
    is all that prints."""
    good = [{"step": 0, "eval/acc_norm": 0.25}, {"step": 1, "kl": 0.1, "dt": 1.0,
                                                 "train/judge_score": -2.0, "eval/acc_norm": 0.5}]
    names = [f"choice_{adv}_{kl}_7" for adv in ("gae", "expected") for kl in ("sampled", "exact")]
    for name in names + ["generate_gae_7", "generate_grpo_7"]:
        write_metrics(tmp_path / name, good)
    bad = tmp_path / "generate_reinforce++_7" / "metrics.jsonl"
    if metrics == "a directory":
        os.makedirs(bad)
    else:
        os.makedirs(bad.parent)
        bad.write_text(metrics)
    (bad.parent / "bench.json").write_text('{"args": [], "seconds": 60.0}')  # damaged after
    proc = run_script("benchmarks/estimators.py", "--reuse", "--work", str(tmp_path),
                      "--seeds", "7")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and str(bad) in proc.stderr
    assert message in proc.stderr and proc.stdout == ""


def test_estimators_reuse_refuses_a_run_that_did_not_finish(tmp_path):
    """A stopped run's metrics.jsonl holds steps and evaluations too: without the bench.json a
    finished run leaves, --reuse names it instead of tabling half a run."""
    good = [{"step": 0, "eval/acc_norm": 0.25}, {"step": 1, "kl": 0.1, "dt": 1.0,
                                                 "train/judge_score": -2.0, "eval/acc_norm": 0.5}]
    names = [f"choice_{adv}_{kl}_7" for adv in ("gae", "expected") for kl in ("sampled", "exact")]
    for name in names:
        write_metrics(tmp_path / name, good, finished=name != "choice_expected_sampled_7")
    proc = run_script("benchmarks/estimators.py", "--reuse", "--work", str(tmp_path),
                      "--seeds", "7", "--only", "choice")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: --reuse: {tmp_path / 'choice_expected_sampled_7'}: "
                                  "unfinished (no bench.json") and proc.stdout == ""


def test_a_stopped_retrain_leaves_no_record_of_the_run_before_it(tmp_path, monkeypatch):
    """A finished run, then one of other arguments stopped midway (--start_over moved the first
    run's files aside, not bench.json), then the first arguments again: the run trains again
    rather than the stopped one being taken for it."""
    calls = []

    def run_script(*args, log=None, append=False):
        calls.append(args)
        if "--max_steps=2" in args:
            raise KeyboardInterrupt  # stopped midway
    monkeypatch.setattr(arguments, "run_script", run_script)
    out = str(tmp_path / "run")
    arguments.train_once(out, "configs/demo.py", "--start_over=True", "--max_steps=1")
    with pytest.raises(KeyboardInterrupt):
        arguments.train_once(out, "configs/demo.py", "--start_over=True", "--max_steps=2")
    assert not os.path.exists(os.path.join(out, "bench.json"))
    arguments.train_once(out, "configs/demo.py", "--start_over=True", "--max_steps=1")
    assert [args[-2] for args in calls] == ["--max_steps=1", "--max_steps=2", "--max_steps=1"]


def test_a_failed_stage_is_one_line_naming_the_command_and_the_log(tmp_path):
    """A script that fails with a traceback, or with one line among others: the message is one
    line, the command and the script's last error (or last line), and the log that holds all it
    said."""
    log = tmp_path / "stage.log"
    with pytest.raises(UserError) as e:
        arguments.run_script("-c", "print('noise'); raise KeyError('value_head')", log=str(log))
    assert str(e.value) == (f"-c print('noise'); raise KeyError('value_head') failed: "
                            f"KeyError: 'value_head' (all it said: {log})")
    assert "Traceback (most recent call last)" in log.read_text()
    script = ("import sys; print('error: out_dir x is in use', file=sys.stderr); "
              "print('torchrun: 1 process failed', file=sys.stderr); sys.exit(2)")
    with pytest.raises(UserError) as e:
        arguments.run_script("-c", script, log=str(log))
    assert "\n" not in str(e.value)
    assert str(e.value).endswith(f"failed: error: out_dir x is in use (all it said: {log})")
    # a script that said nothing: how it ended (a stop signal is one to start again from)
    for script, ended in (
            ("import sys; sys.exit(3)", "exit status 3"),
            ("import sys; sys.exit(143)", "stopped by SIGTERM (exit status 143); start the "
             "benchmark again to go on from its last checkpoint"),
            ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "killed by SIGKILL; "
             "start the benchmark again to go on from its last checkpoint")):
        with pytest.raises(UserError) as e:
            arguments.run_script("-c", script, log=str(log))
        assert str(e.value) == f"-c {script} failed: {ended} (all it said: {log})"


def test_a_stopped_run_goes_on_from_its_checkpoint_with_its_time_so_far(tmp_path, monkeypatch):
    """A run stopped after a checkpoint: started again with the same arguments, it goes on from
    there (--init_from=resume, its log appended to), and its seconds count those up to the
    checkpoint; a run of other arguments, or one whose checkpoint is its last step, starts over."""
    calls = []
    out = str(tmp_path / "run")

    def run_script(*args, log=None, append=False):
        calls.append((args[-3:], append))
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "train_config.json"), "w") as f:
            json.dump({"max_steps": 4}, f)
        if "--init_from=resume" not in args:  # trains 100 s to step 2, then stops
            checkpoint = os.path.join(out, "ckpt_000002.pt")
            open(checkpoint, "w").close()
            started = json.load(open(out + ".started.json"))["started"]
            os.utime(checkpoint, (started + 100, started + 100))
            raise KeyboardInterrupt
    monkeypatch.setattr(arguments, "run_script", run_script)
    with pytest.raises(KeyboardInterrupt):
        arguments.train_once(out, "configs/demo.py", "--start_over=True", "--max_steps=4")
    arguments.train_once(out, "configs/demo.py", "--start_over=True", "--max_steps=4")
    assert calls[-1] == (("--max_steps=4", f"--out_dir={out}", "--init_from=resume"), True)
    assert 100 <= json.load(open(os.path.join(out, "bench.json")))["seconds"] < 110
    arguments.train_once(out, "configs/demo.py", "--start_over=True", "--max_steps=4")
    assert len(calls) == 2  # finished: kept
    calls.clear()
    os.remove(os.path.join(out, "bench.json"))  # stopped again, now at step 2 of another run
    for steps in ("--max_steps=5", "--max_steps=2"):
        with pytest.raises(KeyboardInterrupt):
            arguments.train_once(out, "configs/demo.py", "--start_over=True", steps)
    assert [append for _, append in calls] == [False, False]
    with open(os.path.join(out, "train_config.json"), "w") as f:
        json.dump({"max_steps": 2}, f)  # the checkpoint is the last step's: nothing to go on with
    with pytest.raises(KeyboardInterrupt):
        arguments.train_once(out, "configs/demo.py", "--start_over=True", "--max_steps=2")
    assert calls[-1] == (("--start_over=True", "--max_steps=2", f"--out_dir={out}"), False)
    with open(os.path.join(out, "train_config.json"), "w") as f:
        json.dump({"max_steps": 4}, f)
    with open(out + ".started.json", "w") as f:
        f.write('{"args": ["train_ppo.py"')  # a torn record: nothing to go on with, start over
    with pytest.raises(KeyboardInterrupt):
        arguments.train_once(out, "configs/demo.py", "--start_over=True", "--max_steps=4")
    assert calls[-1] == (("--start_over=True", "--max_steps=4", f"--out_dir={out}"), False)


@pytest.mark.slow
def test_a_stopped_run_resumed_ends_as_one_never_stopped(tmp_path, synthetic_dir):
    """train_once on a run whose last part was lost (bench.json and the checkpoints after step 2
    gone, as when it was killed before step 4's checkpoint, its later lines logged): it goes on
    from step 2, rather than starting over, and ends with the metrics of the run that never
    stopped."""
    out = str(tmp_path / "run")
    settings = ("configs/demo.py", "--start_over=True", f"--synthetic_dir={synthetic_dir}",
                "--max_steps=4", "--checkpoint_interval=2", "--eval_interval=2", "--eval_limit=8")
    arguments.train_once(out, *settings)
    metrics = os.path.join(out, "metrics.jsonl")
    whole = [json.loads(line) for line in open(metrics)]
    os.remove(os.path.join(out, "bench.json"))
    os.remove(os.path.join(out, "ckpt_000004.pt"))
    arguments.train_once(out, *settings)
    resumed = [json.loads(line) for line in open(metrics)]
    timeless = {"dt", "samples_per_s", "tokens_per_s", "peak_mem_gb"}
    assert [{k: v for k, v in m.items() if k not in timeless and not k.startswith("time/")}
            for m in resumed] == [{k: v for k, v in m.items() if k not in timeless
                                   and not k.startswith("time/")} for m in whole]
    assert not os.path.exists(os.path.join(out, "previous"))  # not started over


@pytest.mark.slow
def test_a_finished_run_is_kept_and_a_changed_or_failed_one_trains_again(tmp_path, synthetic_dir):
    """train_once: a run that finished with the same settings is not trained again (a stopped
    benchmark goes on where it stopped); other settings, or a torn bench.json, train again, the old
    run moved aside; a run that fails leaves no bench.json."""
    out = str(tmp_path / "run")
    settings = ("configs/demo.py", "--start_over=True", f"--synthetic_dir={synthetic_dir}",
                "--eval_interval=1", "--eval_limit=8")
    metrics = os.path.join(out, "metrics.jsonl")
    arguments.train_once(out, *settings, "--max_steps=1")
    first = open(metrics).read()
    assert json.loads(first.splitlines()[-1])["step"] == 1
    assert json.load(open(os.path.join(out, "bench.json")))["args"] == [
        "train_ppo.py", *settings, "--max_steps=1", f"--out_dir={out}"]
    arguments.train_once(out, *settings, "--max_steps=1")
    assert open(metrics).read() == first and not os.path.exists(os.path.join(out, "previous"))
    arguments.train_once(out, *settings, "--max_steps=2")
    assert json.loads(open(metrics).read().splitlines()[-1])["step"] == 2
    assert len(os.listdir(os.path.join(out, "previous"))) == 1
    with open(os.path.join(out, "bench.json"), "w") as f:
        f.write('{"args": ["train_ppo.py"')  # a torn write
    arguments.train_once(out, *settings, "--max_steps=2")
    assert len(os.listdir(os.path.join(out, "previous"))) == 2
    assert json.load(open(os.path.join(out, "bench.json")))["args"][-2] == "--max_steps=2"
    failed = str(tmp_path / "failed")
    with pytest.raises(UserError, match="^train_ppo.py configs/demo.py .* failed: "):
        arguments.train_once(failed, *settings, "--no_such_setting=1")
    assert not os.path.exists(os.path.join(failed, "bench.json"))


@pytest.mark.parametrize("script, args, message", [
    ("same_training", ["--before", "{tmp}/missing"],
     "error: --before {tmp}/missing is not a checkout of this project"),
    ("same_training", ["--work", "{tmp}/file"], "error: --work {tmp}/file: an existing file"),
    ("same_training", ["--work", "{tmp}/file/runs"],
     "error: --work {tmp}/file/runs: {tmp}/file is a file"),
    ("same_training", ["--generate_steps", "0"],
     "error: --generate_steps must be at least 1, not 0"),
    ("same_training", ["--resume_at", "40"], "error: --resume_at 40: configs/demo.py's run has 40 "
     "steps; give a step from 1 to 39"),
    ("same_training", ["--resume_at", "0"], "error: --resume_at 0: configs/demo.py's run has 40 "
     "steps; give a step from 1 to 39"),
    ("estimators", ["--work", "{tmp}/file"], "error: --work {tmp}/file: an existing file"),
    ("estimators", ["--generate_steps", "0"], "error: --generate_steps must be at least 1, not 0"),
    ("estimators", ["--seeds", "1", "-1"], "error: --seeds must be at least 0, not -1"),
    ("choice_speed", ["--rounds", "0"], "error: --rounds must be at least 1, not 0"),
    ("choice_speed", ["--seed", "-2"], "error: --seed must be at least 0, not -2"),
    ("hellaswag_speed", ["--threads", "0"], "error: --threads must be at least 1, not 0"),
    ("hellaswag_speed", ["--batch-size", "-1"], "error: --batch-size must be at least 1, not -1"),
    ("generate_speed", ["--new-tokens", "0"], "error: --new-tokens must be at least 1, not 0"),
    ("generate_speed", ["--prompt-len", "1000"],
     "error: --prompt-len 1000 + --new-tokens 48 is more than GPT-2's 1024 positions"),
    ("generate_speed", ["--before", "no-such-revision"],
     "error: --before no-such-revision: git cannot show model.py at that revision here"),
    ("update_speed", ["--seed", "-1"], "error: --seed must be at least 0, not -1")])
def test_benchmark_arguments_are_checked_before_any_work(tmp_path, script, args, message):
    (tmp_path / "file").write_text("not a folder")
    defaults = {"same_training": ["--before", ".", "--work", str(tmp_path / "work")],
                "estimators": ["--work", str(tmp_path / "work")]}.get(script, [])
    proc = run_script(f"benchmarks/{script}.py", *defaults,
                      *(a.format(tmp=tmp_path) for a in args))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(message.format(tmp=tmp_path)) and proc.stdout == ""
    assert not (tmp_path / "work").exists()  # nothing run


@pytest.mark.slow
def test_update_speed_compares_two_checkouts(tmp_path):
    # this checkout against itself: the same weights and minibatch, so the same gradient norms
    proc = run_script("benchmarks/update_speed.py", "--tiny", "--before", ".", "--rounds", "1",
                      "--updates", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert (lines[0].startswith("one minibatch update")
            and "tiny shape, 1 updates in each of 1 fresh" in lines[0])
    assert (lines[1].startswith("--before .") and lines[2].startswith("this checkout")
            and "(1.00x)" in lines[1])
    assert lines[3] == ("largest relative difference in the gradient norms between the checkouts: "
                        "0.0e+00")


@pytest.mark.parametrize("args, message", [
    (["--before", "{tmp}"], "error: --before {tmp} is not a checkout of this project"),
    (["--rounds", "0"], "error: --rounds must be at least 1, not 0"),
    (["--updates", "-1"], "error: --updates must be at least 1, not -1"),
    (["--threads", "0"], "error: --threads must be at least 1, not 0"),
    # a checkout whose update cannot run (here: empty modules) is named, in one line
    (["--before", "{tmp}", "--rounds", "1", "--updates", "1"],
     "error: the update failed in {tmp}: ")])
def test_update_speed_bad_input_is_one_line(tmp_path, args, message):
    if message.startswith("error: the update failed"):
        (tmp_path / "train_ppo.py").write_text("")
        (tmp_path / "model.py").write_text("")
    proc = run_script("benchmarks/update_speed.py", "--tiny",
                      *(a.format(tmp=tmp_path) for a in args))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith(message.format(tmp=tmp_path)) and proc.stdout == ""


@pytest.mark.parametrize("setting, message", [("BEFORE", "is not a checkout of this project"),
                                              ("DATA", "no HellaSwag data at")])
def test_gpu_check_refuses_bad_paths_before_any_work(tmp_path, setting, message):
    env = {**os.environ, "DEVICE": "cpu", "OUT_DIR": str(tmp_path / "out"), "DATA": __file__,
           setting: str(tmp_path / "missing")}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr
    assert str(tmp_path / "missing") in proc.stderr  # names the path
    assert not (tmp_path / "out").exists() and proc.stdout == ""  # nothing written, nothing run
