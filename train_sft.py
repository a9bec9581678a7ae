r"""
Supervised fine-tuning on HellaSwag-format examples: the classification-style fine-tuning of the
HellaSwag paper's GPT baseline, the usual baseline to run before PPO and its control.

    python train_sft.py configs/sft_demo.py  # offline, CPU, about a minute
    torchrun --standalone --nproc_per_node=8 train_sft.py configs/gpt2_hellaswag_label.py \
        --out_dir=out/sft --learning_rate=5e-6

Every step: batch_size examples per rank, in minibatches of minibatch_size with one optimizer step
each (one PPO epoch's worth of steps over as many rollouts). The policy scores an example's 4
endings exactly as the evaluator and the choice rollouts do (train_ppo.choice_forward: the summed
log-prob of each ending, as policy.encode_choices renders them, divided as acc_norm divides it, or
by its tokens with choice_norm="token"), and the loss is the 4-way cross-entropy of
softmax(scores / choice_temperature) against the gold ending. The value head is
frozen (saved and exported as it was).
Everything else is train_ppo.py's: its Config, config files and overrides (the settings of
rollouts, rewards, the KL penalty and PPO epochs are not read; rollout and reward_kind are set to
"choice" and "label", what is learnt from, and saved so), model sources, data, the evaluation every
eval_interval steps, the run directory, checkpoints, best.pt and hf/, resume, stop signals, DDP and
autocast. Logged besides the loss: reward, the mean probability of the gold ending (the choice
policy's expected label reward), train/acc, the share of gold endings scored highest, and kl, the
exact KL over the 4 endings to the starting policy (as train_ppo's "exact").
"""

import contextlib
import dataclasses
import json
import os
import sys
import time
import types

import torch
import torch.nn.functional as F

import train_ppo
from common import UserError, all_reduce_sum, autocast, run_cli
from config import describe
from run_management import (Batches, RunManager, Shown, TrainingState,
                            log_changed_settings, prepare_out_dir, seed_everything)
from train_ppo import (Config, FixedKLController, build_reward, build_rollouts,
                       check_same_trained_blocks, choice_forward, count_bad_steps, exact_kl,
                       learning_rate_at, load_data, load_models, micro_batches, optimizer_step,
                       set_learning_rate, training_wrappers)
from weights import check_finite_weights


def supervised_argv(argv):
    """The command line as train_ppo reads it: out_dir's default is out/sft, and what supervised
    fine-tuning learns from comes last, whatever a config file says."""
    return ["--out_dir=out/sft", *argv, "--rollout=choice", "--reward_kind=label"]


def choice_cross_entropy(logprobs, labels):
    """The 4-way cross-entropy: (N, 4) log-probs over each example's endings (choice_forward's) and
    (N,) gold endings -> the mean of -log p(gold), float32."""
    return F.nll_loss(logprobs.float(), labels)


def sft_loss(model, encoded, normalisers, labels, cfg, device, rows):
    """A micro-batch's loss: its encoded examples' endings scored by choice_forward (through the
    model's forward, so that DDP syncs the gradients; normalisers: choice_normalisers') -> (the mean
    cross-entropy, the (N, 4) log-probs)."""
    logprobs, _ = choice_forward(model, encoded, normalisers, cfg.choice_temperature, device,
                                 rows)
    return choice_cross_entropy(logprobs, labels), logprobs


def sft_update(model, raw_model, state, encoded, normalisers, labels, cfg, run):
    """A step's examples in minibatches of minibatch_size, one optimizer step each, the gradient
    accumulated over micro-batches of similar length, each weighed by its share of the minibatch
    (micro_batch_size, a memory setting, does not change the update). A non-finite gradient is not
    applied and skips the rest of the step. -> the (B, 4) log-probs each example had when its
    minibatch met it (NaN where skipped), the gradient norms, whether every gradient was finite."""
    logprobs = torch.full((len(encoded), 4), float("nan"), device=run.device)
    lengths, grad_norms = raw_model.choice_lengths(encoded)[1], []
    for minibatch in torch.arange(len(encoded)).split(cfg.minibatch_size):
        micros = micro_batches(minibatch, lengths, cfg.micro_batch_size)
        for i, micro in enumerate(micros):
            # DDP all-reduces the gradients in the minibatch's last backward, which every rank
            # reaches at the same micro-batch (each has minibatch_size examples)
            last = i == len(micros) - 1
            no_sync = model.no_sync() if run.ddp and not last else contextlib.nullcontext()
            with no_sync, autocast(run.device, run.dtype):
                loss, lp = sft_loss(model, [encoded[j] for j in micro.tolist()],
                                    normalisers[micro], labels[micro.to(run.device)], cfg,
                                    run.device, raw_model)
            state.scaler.scale(loss * len(micro) / len(minibatch)).backward()
            logprobs[micro.to(run.device)] = lp.detach()
        grad_norm, applied = optimizer_step(raw_model, state, cfg, value_warmup=False)
        grad_norms.append(grad_norm)
        if not applied:
            return logprobs, grad_norms, False
    return logprobs, grad_norms, True


def check_labels(examples, cfg):
    """Supervised fine-tuning needs every training example's gold ending: found before the models
    load."""
    unlabelled = [ex["index"] for ex in examples if ex["label"] is None]
    if unlabelled:
        raise UserError(f"config: train_data={cfg.train_data!r}: {len(unlabelled)} of its "
                        f"{len(examples)} examples have no label (first: index {unlabelled[0]}; "
                        "HellaSwag's test split is unlabelled); supervised fine-tuning learns from "
                        "the labels: train on train or val")


# a step's console line: the metrics of the dict that run_sft logs, in order
CONSOLE_LINE = (Shown("step", "step {}"), Shown("loss", "loss {:.4f}"),
                Shown("reward", "p(gold) {:.4f}"), Shown("train/acc", "acc {:.3f}"),
                Shown("kl", "kl {:.4f}"), Shown("grad_norm", "grad {:.3f}"),
                Shown("samples_per_s", "{:.1f} samples/s"), Shown("tokens_per_s", "{:.0f} tok/s"),
                Shown("dt", "dt {:.0f}ms", scale=1000), Shown("peak_mem_gb", "mem {:.2f}GB"))


def run_sft(cfg, run):
    """Supervised fine-tuning as configured, in the process `run` describes, out_dir held (the loop
    train_ppo.train runs). -> a summary as run_ppo's: final step, last eval, last metrics, the
    policy and the signal that stopped the run early (or None)."""
    # ---- setup: seeds, out_dir, data (labels checked), models, optimizer, resume
    sample_generator, shuffle_generator = seed_everything(cfg.seed, run)
    resume_path, ckpt = prepare_out_dir(cfg, run, run.log)
    os.makedirs(cfg.out_dir, exist_ok=True)
    run.log(json.dumps(dataclasses.asdict(cfg), indent=2))
    if ckpt:
        check_same_trained_blocks(ckpt.config, cfg, resume_path)
        log_changed_settings(ckpt.config, cfg, run)
    train_examples, val_examples, sources = load_data(cfg, run, run.log)
    check_labels(train_examples, cfg)
    raw_model, reference, reference_state = load_models(cfg, sources["init_from"], ckpt,
                                                        resume_path, run.device)
    check_finite_weights(raw_model, resume_path or reference_state.source)
    raw_model.value_head.requires_grad_(False)  # no baseline to fit: frozen, as saved
    run.log(f"policy: {raw_model.num_params() / 1e6:.2f}M parameters from "
            f"{reference_state.source}; supervised on the labels; device {run.device}, "
            f"{run.world_size} process(es), autocast {run.dtype}")
    # a label run's reward and choice rollouts (the encoded examples, the reference's cached
    # scores for the KL): the checkpoints hold what a PPO run's do
    label_reward, _ = build_reward(cfg, train_examples, sources, run)
    choices = build_rollouts(cfg, raw_model, train_examples, label_reward, run.device)
    labels = torch.tensor([ex["label"] for ex in train_examples], device=run.device)
    device_type = torch.device(run.device).type
    model, train_model, optimizer = training_wrappers(raw_model, cfg, run)
    state = TrainingState(
        optimizer=optimizer,
        scaler=torch.amp.GradScaler(device_type, enabled=(run.dtype == "float16")),
        kl_controller=FixedKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon),  # unused
        reward_fn=label_reward, rollout_kind=choices,
        sample_generator=sample_generator, shuffle_generator=shuffle_generator,
        batches=Batches(len(train_examples), cfg.batch_size, cfg.seed, run),
        reference=reference_state)
    if ckpt:
        state.resume(ckpt, resume_path, cfg, run)
        del ckpt
    manager = RunManager(cfg, run, state, raw_model, val_examples, CONSOLE_LINE)
    manager.evaluations_before_the_loop()
    timer = manager.timer

    while state.step < cfg.max_steps:
        t0 = time.time()
        lr = learning_rate_at(state.step, cfg)
        set_learning_rate(optimizer, lr, cfg.value_lr_scale)
        indices = state.next_batch()
        encoded = [choices.encoded[i] for i in indices]

        # ---- the starting policy's distribution over the endings (cached per example): the KL
        with timer("reference"), torch.no_grad(), autocast(run.device, run.dtype):
            ref_logprobs = choices.reference(reference, indices)

        # ---- the 4-way cross-entropy against the gold endings, one optimizer step a minibatch
        with timer("update"):
            logprobs, grad_norms, finite = sft_update(
                train_model, raw_model, state, encoded, choices.normalisers[indices],
                labels[indices], cfg, run)
        count_bad_steps(raw_model, state, finite, "gradient", cfg, run)
        state.step += 1

        # ---- log / eval / checkpoint / stop
        gold = logprobs.gather(1, labels[indices][:, None]).squeeze(1)
        picks = logprobs.argmax(1)
        loss, p_gold, acc, kl = (x / run.world_size for x in all_reduce_sum(
            -gold.mean(), gold.exp().mean(), (picks == labels[indices]).float().mean(),
            exact_kl(logprobs, ref_logprobs).mean()))
        metrics = {"step": state.step, "loss": loss.item(), "reward": p_gold.item(),
                   "train/acc": acc.item(), "kl": kl.item(), "lr": lr,
                   "grad_norm": sum(grad_norms) / len(grad_norms),
                   **manager.throughput(t0, len(indices),
                                        int(raw_model.choice_lengths(encoded)[1].sum()))}
        # samples.jsonl: the first examples, the ending scored highest, p(gold)
        batch = types.SimpleNamespace(scores=gold.exp(), samples=[
            {"ctx": train_examples[i]["ctx"], "chosen": train_examples[i]["endings"][c],
             "label": train_examples[i]["label"]} for i, c in zip(indices, picks.tolist())])
        if manager.end_of_step(metrics, batch):
            break

    stopped_by = manager.finish()
    return {"step": state.step, "eval": manager.last_eval, "metrics": manager.metrics,
            "model": raw_model, "stopped_by": stopped_by}


def load_config(argv):
    """train_ppo's Config, from the same config files and overrides (supervised_argv)."""
    return train_ppo.load_config(supervised_argv(argv))


def train(cfg):
    """Run supervised fine-tuning as train_ppo.train runs PPO. -> run_sft's summary."""
    return train_ppo.train(cfg, loop=run_sft)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nusage: train_sft.py [configs/X.py ...] [--key=value ...]; the settings (those of "
              "rollouts, rewards, the KL and PPO unused; out_dir's default out/sft), their "
              "defaults and limits:")
        print(describe(Config))
        return None
    return train_ppo.main(supervised_argv(argv), loop=run_sft)


if __name__ == "__main__":
    run_cli(main)
