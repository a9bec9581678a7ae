"""
Reward kinds: what train_ppo.py rewards a rollout with (reward_kind = "likelihood" | "teacher" |
"label"), each one entry of REWARD_KINDS: its call (ChoiceReward or TextReward) and what it needs.
The judges and teachers are transformers causal LMs (causal_lm.CausalLM), re-tokenizing text with
their own tokenizers, so they need not share the policy's vocabulary (gpt-neo shares GPT-2's, Llama
and Pythia do not).

    judge = CausalLM.load("EleutherAI/gpt-neo-2.7B", device="cuda")
    # free text: the judge's mean log-prob, running-normalised
    LikelihoodReward(judge)(contexts, continuations)
    # the same for a policy's token ids, and each token's share of it
    LikelihoodReward(judge).dense(context_ids, sample_ids, policy.tokens)
    # multiple choice: the judge's probability of the chosen ending
    TeacherReward(judge, examples)(indices, choices)
    # multiple choice: 1 if the choice is the gold label, else 0
    LabelReward(examples)(indices, choices)

CLI, to see what a judge thinks of some text:

    python reward.py --model EleutherAI/gpt-neo-2.7B --input pairs.jsonl [--output scores.jsonl]
"""

import argparse
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

import hellaswag
from causal_lm import CausalLM, PairError, unicode_problem
from common import (PROGRESS_HELP, UserError, atomic_torch_save, atomic_write_text,
                    check_output_path, progress_bar, read_jsonl, run_cli)

# the seed project's judge: GPT-2's vocabulary, ~5.4 GB in bf16
DEFAULT_REWARD_MODEL = "EleutherAI/gpt-neo-2.7B"
TEACHER_CACHE_FORMAT = "reward-teacher-cache/1"


# --------------------------------------------------------------------------------------------------
# reward kinds

class LikelihoodReward:
    """
    For free-text samples: the reward model's mean log-prob of the continuation given the context,
    per token (per="token") or per character (per="char"; fairer across tokenizers and lengths).
    With normalize, rewards are whitened with a running mean / std over every batch seen so far,
    updated before each batch is normalised. Under DDP pass all_reduce (e.g.
    torch.distributed.all_reduce: sums a tensor in place across ranks; the tensor lives on the
    reward model's device) so every rank keeps the same statistics. clip bounds the final reward to
    [-clip, clip]. An empty continuation is a PairError.
    __call__ takes lists of strings, or lists of a policy's token ids with its tokens
    (policy.Tokens; CausalLM.score_tokens: the ids themselves when the judge shares the policy's
    vocabulary). -> (N,) float32 CPU tensor.
    """

    def __init__(self, reward_model, per="token", clip=None, normalize=True, batch_size=32,
                 all_reduce=None, eps=1e-8):
        if per not in ("token", "char"):
            raise UserError(f"likelihood reward: per must be 'token' or 'char', not '{per}'")
        if clip is not None and clip <= 0:
            raise UserError(f"likelihood reward: clip must be positive (or None), not {clip}")
        self.reward_model, self.per, self.clip, self.normalize = reward_model, per, clip, normalize
        self.batch_size, self.all_reduce, self.eps = batch_size, all_reduce, eps
        # running moments (Chan et al.'s parallel update)
        self.count, self.mean, self.m2 = 0, 0.0, 0.0
        # the last call's scores on the judge's own scale, before normalising and clipping: what a
        # log of normalised rewards cannot show (are samples getting more likely?)
        self.last_raw = torch.zeros(0)

    def raw(self, contexts, continuations, tokens=None):
        """The reward model's per-token (or per-char) mean log-prob, before normalisation and
        clipping. tokens: None for texts, else the policy's tokens that wrote the ids."""
        if not continuations:
            return torch.zeros(0)
        if tokens is None:
            scores = self.reward_model.score(contexts, continuations, self.batch_size)
        else:
            scores = self.reward_model.score_tokens(contexts, continuations, tokens,
                                                    self.batch_size)
        return scores["mean_logprob" if self.per == "token" else "per_char_logprob"]

    def __call__(self, contexts, continuations, tokens=None):
        return self.finish(self.raw(contexts, continuations, tokens))

    def finish(self, rewards):
        """Raw scores -> rewards: fold them into the running statistics, normalise, clip."""
        self.last_raw = rewards.float()
        if self.normalize:
            self.update(rewards)
            rewards = (rewards - self.mean) / max(self.std, self.eps)
        if self.clip is not None:
            rewards = rewards.clamp(-self.clip, self.clip)
        return rewards.float()

    def dense(self, contexts, continuations, tokens):
        """
        The rewards of __call__ for a policy's token ids (written with its tokens, policy.Tokens),
        and each token's share of them: -> (N,) rewards and a list of (len(continuations[i]),)
        float32 shares that sum to rewards[i]. A token's share is the judge's log-prob of it
        (CausalLM.score_tokens(per_token=True)) under the same affine map as the reward: divided by
        the length (tokens or chars) and by the running std.
        The map's constant part (-mean / std) and whatever the clip cut off are spread evenly over
        the sample's tokens: they say nothing about any one token, and so the sum over a sample
        stays the sparse reward, whatever the statistics and the clip do.
        """
        if not continuations:
            # still folded into the running statistics: under DDP that is an all-reduce every rank
            # must join
            return self.finish(torch.zeros(0)), []
        scores = self.reward_model.score_tokens(contexts, continuations, tokens, self.batch_size,
                                                per_token=True)
        length = scores["n_tokens" if self.per == "token" else "n_chars"]
        rewards = self.finish(scores["sum_logprob"] / length)
        scale = ((1.0 / (length.double() * max(self.std, self.eps))) if self.normalize
                 else 1.0 / length.double())
        shares = []
        for logprobs, reward, s in zip(scores["token_logprobs"], rewards.double(), scale):
            share = logprobs.double() * s
            shares.append((share + (reward - share.sum()) / len(share)).float())
        return rewards, shares

    @property
    def std(self):
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 0.0

    def update(self, rewards):
        """Fold a batch (gathered across ranks by all_reduce) into the running mean / std. A
        non-finite score is left out: it would stay in the statistics and make every later reward
        NaN (its own step is skipped as non-finite)."""
        x = rewards.double()
        x = x[torch.isfinite(x)]
        n_values = torch.tensor(float(x.numel()), dtype=torch.float64)
        stats = torch.stack([n_values, x.sum(), (x * x).sum()])
        if self.all_reduce is not None:
            stats = stats.to(self.reward_model.device)
            self.all_reduce(stats)
        n, total, total_sq = stats.tolist()
        if n == 0:
            return
        batch_mean = total / n
        batch_m2 = max(total_sq - n * batch_mean * batch_mean, 0.0)
        delta, count = batch_mean - self.mean, self.count + n
        self.mean += delta * n / count
        self.m2 += batch_m2 + delta * delta * self.count * n / count
        self.count = count

    def state_dict(self):
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state):
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.m2 = float(state["m2"])


class NothingToSave:
    """For a reward that a checkpoint need not hold: its scores depend on the example alone (and
    the teacher keeps its own cache on disk)."""

    def state_dict(self):
        return None

    def load_state_dict(self, state):
        pass


class TeacherReward(NothingToSave):
    """
    For the multiple-choice rollout: the reward model, as teacher, scores the 4 endings of each
    example as hellaswag.py's acc_norm does: the ending's log-prob given
    hellaswag.example_texts(example, style), per token for style="completion" (build-nanogpt), per
    character of the ending for style="lm-eval" (lm-evaluation-harness).
    The reward for choosing ending c is softmax(scores / temperature)[c] (mode="prob") or 1 / 0 for
    agreeing with the teacher's pick (mode="agree"); ties go to the first ending.
    Scores depend only on the example, so they are computed once, lazily, kept in memory and in
    cache_dir (one file keyed by the model, the scored texts and the style; data_id only names the
    file), so a rerun on the same data does no forwards. Under DDP each rank scores the examples it
    meets and merges the file's contents into its own before each (atomic) save; the rare entry lost
    to two simultaneous saves is only scored again. Every pair not in the cache is tokenized when
    the reward is built, so that one the teacher cannot score (an ending longer than its window) is
    an error then, not when its example is first drawn hours into a run (progress=True: with a
    common.progress_bar, as that takes a minute for the full training set).
    examples: dicts as from hellaswag.load_examples; indices are positions in this list.
    """

    def __init__(self, reward_model, examples, *, style="completion", temperature=1.0, mode="prob",
                 cache_dir=None, data_id=None, batch_size=32, progress=False):
        if mode not in ("prob", "agree"):
            raise UserError(f"teacher reward: mode must be 'prob' or 'agree', not '{mode}'")
        if not temperature > 0:
            raise UserError(f"teacher reward: temperature must be positive, not {temperature}")
        self.reward_model = reward_model
        self.style = style
        self.temperature = temperature
        self.mode = mode
        self.batch_size = batch_size
        self.texts = [hellaswag.example_texts(ex, style) for ex in examples]
        # characters of each ending without the space before it:
        # lm-evaluation-harness's acc_norm length
        n_chars = [[max(1, len(c) - 1) for c in endings] for _, endings in self.texts]
        self.n_chars = torch.tensor(n_chars, dtype=torch.float32).view(-1, 4)
        self.sum_logprob = torch.full((len(examples), 4), float("nan"))
        self.n_tokens = torch.full((len(examples), 4), float("nan"))
        data_hash = hashlib.sha256(json.dumps(self.texts).encode("utf-8")).hexdigest()
        key = {"format": TEACHER_CACHE_FORMAT, "model": reward_model.fingerprint(), "style": style,
               "data": data_hash}
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()
        self.cache_path = None
        if cache_dir is not None:
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", data_id or "data")
            self.cache_path = os.path.join(cache_dir, f"teacher-{name}-{style}-{self.key[:16]}.pt")
            self._merge_cache()
        unscored = [i for i in range(len(examples)) if math.isnan(self.sum_logprob[i, 0])]
        with progress_bar(total=len(unscored), desc="teacher: tokenizing", unit=" example",
                          enabled=progress) as bar:
            for start in range(0, len(unscored), 1024):  # the token rows of a chunk at a time
                chunk = unscored[start:start + 1024]
                try:
                    reward_model.encode_pairs(*self._pairs(chunk))
                except PairError as e:
                    raise UserError(f"teacher reward: {data_id or 'the training data'}, example "
                                    f"{chunk[e.index // 4]}, ending {e.index % 4}: {e.problem}; "
                                    "the teacher cannot score it") from None
                bar.update(len(chunk))

    def __len__(self):
        return len(self.texts)

    def teacher_scores(self, indices):
        """(N, 4) float32: the teacher's normalised log-prob of each ending of examples[indices]."""
        indices = self._check(indices)
        missing = sorted({i for i in indices if math.isnan(self.sum_logprob[i, 0])})
        if missing:
            self._score(missing)
        lengths = self.n_chars[indices] if self.style == "lm-eval" else self.n_tokens[indices]
        return self.sum_logprob[indices] / lengths

    def __call__(self, example_indices, choices):
        """-> (N,) float32 CPU rewards for choosing ending choices[k] (0..3) of
        examples[example_indices[k]]."""
        choices = torch.as_tensor(choices).long().cpu()
        if choices.shape != (len(example_indices),):
            raise ValueError(f"choices of shape {tuple(choices.shape)} for "
                             f"{len(example_indices)} examples")
        scores = self.teacher_scores(example_indices)
        if self.mode == "agree":
            return (scores.argmax(dim=-1) == choices).float()
        probs = torch.softmax(scores / self.temperature, dim=-1)
        return probs.gather(-1, choices[:, None]).squeeze(-1)

    def _check(self, indices):
        indices = [int(i) for i in indices]
        bad = [i for i in indices if not 0 <= i < len(self)]
        if bad:
            raise IndexError(f"teacher reward: example index {bad[0]} out of range "
                             f"(have {len(self)} examples)")
        return indices

    def _pairs(self, indices):
        """The (context, ending) text pairs of examples[indices], 4 an example: -> (contexts,
        continuations)."""
        contexts, continuations = [], []
        for i in indices:
            context, endings = self.texts[i]
            contexts += [context] * 4
            continuations += list(endings)
        return contexts, continuations

    def _score(self, missing):
        scores = self.reward_model.score(*self._pairs(missing), self.batch_size)
        self.sum_logprob[missing] = scores["sum_logprob"].view(-1, 4)
        self.n_tokens[missing] = scores["n_tokens"].view(-1, 4)
        if self.cache_path is not None:
            # pick up what other ranks wrote meanwhile, so the file keeps everyone's work
            self._merge_cache()
            cache = {"format": TEACHER_CACHE_FORMAT, "key": self.key,
                     "sum_logprob": self.sum_logprob, "n_tokens": self.n_tokens}
            atomic_torch_save(cache, self.cache_path)

    def _merge_cache(self):
        """Fill unscored examples from the cache file. A cache that cannot be read is ignored (and
        replaced on the next save): it only costs time."""
        if not os.path.exists(self.cache_path):
            return
        try:
            cache = torch.load(self.cache_path, map_location="cpu", weights_only=True)
            ok = (cache.get("format") == TEACHER_CACHE_FORMAT and cache.get("key") == self.key
                  and cache["sum_logprob"].shape == self.sum_logprob.shape)
        except Exception as e:
            print(f"warning: {self.cache_path}: unreadable teacher cache, rescoring "
                  f"({type(e).__name__})", file=sys.stderr)
            return
        if not ok:
            print(f"warning: {self.cache_path}: teacher cache for other data or another model, "
                  "ignored", file=sys.stderr)
            return
        fill = torch.isnan(self.sum_logprob[:, 0]) & ~torch.isnan(cache["sum_logprob"][:, 0])
        self.sum_logprob[fill] = cache["sum_logprob"][fill]
        self.n_tokens[fill] = cache["n_tokens"][fill]


class LabelReward(NothingToSave):
    """For the multiple-choice rollout on labelled data: 1.0 if the chosen ending is the gold label,
    else 0.0."""

    def __init__(self, examples):
        self.labels = [ex.get("label") for ex in examples]
        unlabelled = [i for i, label in enumerate(self.labels) if label is None]
        if unlabelled:
            raise UserError(
                f"label reward needs gold labels, but {len(unlabelled)} of {len(self.labels)} "
                f"examples have none (first: example {unlabelled[0]}); the test split is "
                "unlabelled, train on train or val, or use reward_kind='teacher'")
        self.labels = torch.tensor(self.labels, dtype=torch.long)

    def __call__(self, example_indices, choices):
        """-> (N,) float32 CPU: 1.0 where choices[k] == label of examples[example_indices[k]]."""
        choices = torch.as_tensor(choices).long().cpu()
        indices = torch.as_tensor(list(example_indices), dtype=torch.long)
        return (self.labels[indices] == choices).float()


# --------------------------------------------------------------------------------------------------
# the reward kinds, one entry each: what train_ppo.py calls a reward with, and what it needs


class ChoiceReward(Protocol):
    """The call of a reward for choice rollouts."""

    def __call__(self, example_indices, choices):
        """-> (N,) float32 CPU rewards for choosing ending choices[k] (0..3) of training example
        example_indices[k]."""

    def state_dict(self):
        """What a checkpoint keeps of it (None: nothing)."""

    def load_state_dict(self, state):
        ...


class TextReward(ChoiceReward, Protocol):
    """The calls of a reward for generate rollouts."""
    # the last call's scores on the judge's own scale, before normalising and clipping (logged)
    last_raw: torch.Tensor

    def __call__(self, contexts, continuations, tokens=None):
        """-> (N,) float32 CPU rewards of each continuation of its context: texts, or (tokens, the
        policy's tokens: policy.Tokens) the policy's token ids."""

    def dense(self, contexts, continuations, tokens):
        """-> the rewards of __call__ for the policy's token ids, and each token's share of
        them."""


@dataclass(frozen=True)
class RewardKind:
    """A reward kind: its protocol (the rollout kind it rewards) and what it needs."""
    build: Callable  # (judge or None, training examples, config, cache_dir, data_id, all_reduce)
    rollout: str  # "choice": a ChoiceReward; "generate": a TextReward
    judge: bool  # scores with the causal LM reward_model, loaded for it
    cache: bool  # keeps its scores on disk (teacher_cache)
    # its judge picks among the endings too: a run evaluates those picks at step 0, beside the
    # policy's (eval/teacher.jsonl, for analyze.py's teacher agreement)
    picks: bool = False


def likelihood_reward(judge, examples, cfg, cache_dir, data_id, all_reduce):
    return LikelihoodReward(judge, per=cfg.likelihood_per, clip=cfg.reward_clip or None,
                            normalize=cfg.reward_normalize, batch_size=cfg.reward_batch_size,
                            all_reduce=all_reduce)


def teacher_reward(judge, examples, cfg, cache_dir, data_id, all_reduce):
    return TeacherReward(judge, examples, style=cfg.style, mode=cfg.teacher_mode,
                         temperature=cfg.teacher_temperature, batch_size=cfg.reward_batch_size,
                         cache_dir=cache_dir, data_id=data_id, progress=True)


def label_reward(judge, examples, cfg, cache_dir, data_id, all_reduce):
    return LabelReward(examples)


REWARD_KINDS = {
    "likelihood": RewardKind(likelihood_reward, "generate", judge=True, cache=False),
    "teacher": RewardKind(teacher_reward, "choice", judge=True, cache=True, picks=True),
    "label": RewardKind(label_reward, "choice", judge=False, cache=False),
}


# --------------------------------------------------------------------------------------------------
# CLI

def read_pairs(path):
    """-> contexts, continuations, and where each pair is ("PATH, line N") from a jsonl file of
    {"context": str, "continuation": str}."""
    contexts, continuations, wheres = [], [], []
    for where, obj in read_jsonl(path):
        if not isinstance(obj, dict):
            raise UserError(f'{where}: expected an object {{"context": ..., "continuation": ...}}')
        for key in ("context", "continuation"):
            if not isinstance(obj.get(key), str):
                problem = ("missing" if key not in obj
                           else f"not a string ({type(obj[key]).__name__})")
                raise UserError(f"{where}: '{key}' {problem}")
            invalid = unicode_problem(obj[key])
            if invalid:  # before the model loads, not when it tokenizes
                raise UserError(f"{where}: '{key}' holds {invalid}")
        if not obj["continuation"]:
            raise UserError(f"{where}: empty continuation; there is nothing to score")
        contexts.append(obj["context"])
        continuations.append(obj["continuation"])
        wheres.append(where)
    if not contexts:
        raise UserError(f"{path}: no pairs to score")
    return contexts, continuations, wheres


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Score (context, continuation) pairs with a reward model.")
    parser.add_argument("--model", default=DEFAULT_REWARD_MODEL,
                        help="hub name or local transformers directory")
    parser.add_argument("--input", required=True,
                        help='jsonl file of {"context": ..., "continuation": ...}')
    parser.add_argument("--output", default=None, help="jsonl file of scores (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on CUDA, float32 elsewhere")
    parser.add_argument("--no-progress", action="store_true", help=PROGRESS_HELP)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {args.batch_size}")
    # before the model loads, not after scoring
    check_output_path(args.output, inputs=[args.input, args.model])

    contexts, continuations, wheres = read_pairs(args.input)
    t0 = time.time()
    reward_model = CausalLM.load(args.model, device=args.device, dtype=args.dtype)
    try:
        with progress_bar(total=len(contexts), desc="scoring", unit=" pair",
                          enabled=not args.no_progress) as bar:
            scores = reward_model.score(contexts, continuations, batch_size=args.batch_size,
                                        progress=bar)
    except PairError as e:
        raise UserError(f"{wheres[e.index]}: {e.problem}") from None
    lines = []
    for i, where in enumerate(wheres):
        # the input's line number: blank lines are skipped, so output line k need not be input k
        lines.append(json.dumps({"line": int(where.rsplit(" ", 1)[1]),
                                 "sum_logprob": scores["sum_logprob"][i].item(),
                                 "n_tokens": int(scores["n_tokens"][i]),
                                 "mean_logprob": scores["mean_logprob"][i].item(),
                                 "n_chars": int(scores["n_chars"][i]),
                                 "per_char_logprob": scores["per_char_logprob"][i].item()}))
    text = "\n".join(lines) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        atomic_write_text(args.output, text)
    print(f"scored {len(contexts)} pairs with {reward_model} in {time.time() - t0:.1f}s",
          file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
