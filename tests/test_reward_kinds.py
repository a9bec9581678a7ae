"""
The three reward kinds of reward.py (likelihood, teacher, label) on a tiny
GPT-Neo built in the test.
"""

import threading
from types import SimpleNamespace

import pytest
import torch

import hellaswag
from common import UserError
from causal_lm import CausalLM, PairError, continuation_start
from reward import REWARD_KINDS, LabelReward, LikelihoodReward, TeacherReward
# llama and neo are fixtures, shared with test_causal_lm
from test_causal_lm import llama, neo, reference_score, tiktoken_encode  # noqa: F401
from tokenizer import EOT_TOKEN, gpt2_encoding, gpt2_tokens

EXAMPLES = [
    {"ctx": "A man is sitting on a roof. He",
     "endings": ["starts pulling up roofing.", "is using a phone.", "jumps into a pool.",
                 "eats a sandwich quickly."]},
    {"ctx": "A woman holds a violin. She",
     "endings": ["plays a song.", "throws it at a dog, then laughs.", "sings loudly",
                 "puts it down and leaves the room."]},
    {"ctx": "The kids run to the park and",
     "endings": ["play on the swings.", "sleep.", "cook dinner for everyone.", "read newspapers."]},
    {"ctx": "Héllo, the café owner",
     "endings": ["opens the door.", "smiles ☃.", "closes early today.", "waves."]},
    {"ctx": "A dog chases a ball across",
     "endings": ["the yard.", "the moon and the stars.", "a field of grass.", "town."]},
]
for i, ex in enumerate(EXAMPLES):
    ex.update(index=i, label=i % 4, activity_label="Test", ctx_a=ex["ctx"], ctx_b="")

CONTEXTS = ["A man is sitting on a roof.", "The quick brown fox", "Héllo wörld:", "",
            "The weather is"]
CONTINUATIONS = [" He starts pulling up roofing.", " jumps over the lazy dog.", " ☃ snow",
                 " Once upon a time", " nice."]


@pytest.fixture
def count_forwards(neo):
    """The judge's scoring batches: forwards that start from no KV cache (a batch of shared
    contexts then continues its cache once more)."""
    calls = []
    handle = neo.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(1) if kwargs.get("cache") is None
        and kwargs.get("past_key_values") is None else None, with_kwargs=True)
    yield calls
    handle.remove()


def reference_teacher_scores(neo, examples):
    """(N, 4) per-token mean log-probs of " " + ending given ctx, computed pair by pair."""
    rows = []
    for ex in examples:
        row = []
        for ending in ex["endings"]:
            total, n = reference_score(neo.model, tiktoken_encode, ex["ctx"], " " + ending,
                                       EOT_TOKEN)
            row.append(total / n)
        rows.append(row)
    return torch.tensor(rows)


# --------------------------------------------------------------------------------------------------
# likelihood

def test_likelihood_reward_is_the_mean_logprob(neo):
    scores = neo.score(CONTEXTS, CONTINUATIONS)
    per_token = LikelihoodReward(neo, normalize=False)(CONTEXTS, CONTINUATIONS)
    per_char = LikelihoodReward(neo, per="char", normalize=False)(CONTEXTS, CONTINUATIONS)
    torch.testing.assert_close(per_token, scores["sum_logprob"] / scores["n_tokens"])
    torch.testing.assert_close(per_char, scores["sum_logprob"]
                               / torch.tensor([float(len(c)) for c in CONTINUATIONS]))
    assert per_token.dtype == torch.float32 and per_token.shape == (5,)


def test_likelihood_reward_from_gpt2_tokens_equals_from_text(neo):
    enc = gpt2_encoding()
    from_tokens = LikelihoodReward(neo, normalize=False)([enc.encode(c) for c in CONTEXTS],
                                                         [enc.encode(c) for c in CONTINUATIONS],
                                                         gpt2_tokens())
    torch.testing.assert_close(from_tokens,
                               LikelihoodReward(neo, normalize=False)(CONTEXTS, CONTINUATIONS))


def test_likelihood_running_normalisation_over_batches(neo):
    reward = LikelihoodReward(neo)
    raw = LikelihoodReward(neo, normalize=False)
    first, second = (CONTEXTS[:3], CONTINUATIONS[:3]), (CONTEXTS[3:], CONTINUATIONS[3:])
    raw1, raw2 = raw(*first).double(), raw(*second).double()
    out1 = reward(*first)
    torch.testing.assert_close(out1.double(), (raw1 - raw1.mean()) / raw1.std(), atol=1e-5, rtol=0)
    out2 = reward(*second)
    # statistics over all rewards seen so far, this batch included
    everything = torch.cat([raw1, raw2])
    torch.testing.assert_close(out2.double(), (raw2 - everything.mean()) / everything.std(),
                               atol=1e-5, rtol=0)
    assert reward.count == 5 and reward.mean == pytest.approx(everything.mean().item())
    # the judge's own scale stays readable for logging
    torch.testing.assert_close(reward.last_raw.double(), raw2, atol=1e-6, rtol=0)

    restored = LikelihoodReward(neo)  # a resumed run continues the same statistics
    restored.load_state_dict(reward.state_dict())
    torch.testing.assert_close(restored(*first), reward(*first))


def test_a_non_finite_score_stays_out_of_the_running_statistics(neo):
    """Its own step is skipped as non-finite; in the statistics it would make every later reward
    NaN, and a resumed run would load the NaN from the checkpoint."""
    reward, clean = LikelihoodReward(neo), LikelihoodReward(neo)
    raw = LikelihoodReward(neo, normalize=False)(CONTEXTS, CONTINUATIONS)
    broken = raw[:3].clone()
    broken[1] = float("nan")
    assert torch.isnan(reward.finish(broken)[1])
    clean.finish(raw[[0, 2]])
    assert (reward.count, reward.mean, reward.m2) == (clean.count, clean.mean, clean.m2)
    later = reward.finish(raw[3:])
    assert torch.isfinite(later).all()
    torch.testing.assert_close(later, clean.finish(raw[3:]))


def test_likelihood_clipping(neo):
    raw = LikelihoodReward(neo, normalize=False)(CONTEXTS, CONTINUATIONS)
    assert raw.min() < -3  # a tiny random model: so the clip below changes something
    torch.testing.assert_close(
        LikelihoodReward(neo, normalize=False, clip=3.0)(CONTEXTS, CONTINUATIONS),
        raw.clamp(-3.0, 3.0))
    normalised = LikelihoodReward(neo, clip=0.5)(CONTEXTS, CONTINUATIONS)
    # whitened values of 5 rewards reach beyond 0.5; clipped after
    assert normalised.abs().max() == 0.5
    with pytest.raises(UserError, match="clip must be positive"):
        LikelihoodReward(neo, clip=0)
    with pytest.raises(UserError, match="per must be"):
        LikelihoodReward(neo, per="word")


def test_likelihood_statistics_agree_across_ranks(neo):
    """Two ranks (threads here) with different batches end with the same statistics:
    those of both batches."""
    world, parts, barrier = 2, [None, None], threading.Barrier(2, timeout=60)

    def all_reduce_for(rank):
        # torch.distributed.all_reduce's contract: sum in place across ranks
        def all_reduce(tensor):
            parts[rank] = tensor.clone()
            barrier.wait()
            tensor.copy_(parts[0] + parts[1])
            barrier.wait()
        return all_reduce

    rewards = [LikelihoodReward(neo, all_reduce=all_reduce_for(rank)) for rank in range(world)]
    batches = [(CONTEXTS[:2], CONTINUATIONS[:2]), (CONTEXTS[2:], CONTINUATIONS[2:])]
    outputs = [None, None]

    def score(rank):
        outputs[rank] = rewards[rank](*batches[rank])

    def on_both_ranks(target):
        threads = [threading.Thread(target=target, args=(rank,)) for rank in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    on_both_ranks(score)
    raw = LikelihoodReward(neo, normalize=False)(CONTEXTS, CONTINUATIONS).double()
    assert rewards[0].state_dict() == rewards[1].state_dict()
    assert rewards[0].count == 5 and rewards[0].mean == pytest.approx(raw.mean().item())
    assert rewards[0].std == pytest.approx(raw.std().item())
    torch.testing.assert_close(torch.cat(outputs).double(), (raw - raw.mean()) / raw.std(),
                               atol=1e-5, rtol=0)

    # a rank with nothing to score this step still takes part (else the other rank would wait
    # forever)
    batches = [([], []), (CONTEXTS, CONTINUATIONS)]
    on_both_ranks(score)
    assert outputs[0].shape == (0,) and rewards[0].state_dict() == rewards[1].state_dict()
    assert rewards[0].count == 10 and rewards[0].mean == pytest.approx(raw.mean().item())

    # the same for dense rewards: a rank whose samples were all empty asks for none
    def score_dense_empty(rank):
        outputs[rank] = (rewards[rank].dense([], [], gpt2_tokens())[0] if rank == 0
                         else rewards[rank](*batches[rank]))

    on_both_ranks(score_dense_empty)
    assert outputs[0].shape == (0,) and rewards[0].state_dict() == rewards[1].state_dict()
    assert rewards[0].count == 15


def test_likelihood_empty_sample(neo):
    with pytest.raises(PairError, match="empty"):
        LikelihoodReward(neo, normalize=False)(["A man"], [""])


# dense: each sampled GPT-2 token's share of the reward

def dense_batches():
    """Two batches of GPT-2 token pairs: a non-canonical " ro" "of", a judge token across the
    boundary ("Line one" + "\\n" "Line" " two" for the metaspace tokenizer), characters cut between
    tokens, a long-tailed mix of lengths."""
    enc = gpt2_encoding()
    first = [("A man on the", [enc.encode(" ro")[0], enc.encode("of")[0], enc.encode(".")[0]]),
             ("Line one", enc.encode("\nLine two")),
             ("He starts pulling up", enc.encode(" roofing."))]
    second = [(context, enc.encode(continuation))
              for context, continuation in zip(CONTEXTS, CONTINUATIONS)]
    return [([enc.encode(c) for c, _ in batch], [tokens for _, tokens in batch])
            for batch in (first, second)]


@pytest.mark.parametrize("judge", ["neo", "llama"])
@pytest.mark.parametrize("settings", [dict(normalize=False), dict(), dict(per="char", clip=0.8)])
def test_dense_shares_sum_to_the_sparse_reward(judge, settings, request):
    rm = request.getfixturevalue(judge)
    sparse, dense = LikelihoodReward(rm, **settings), LikelihoodReward(rm, **settings)
    for contexts, tokens in dense_batches():  # the running statistics move between the batches
        want = sparse(contexts, tokens, gpt2_tokens())
        rewards, shares = dense.dense(contexts, tokens, gpt2_tokens())
        torch.testing.assert_close(rewards, want, atol=1e-6, rtol=0)
        assert [len(s) for s in shares] == [len(t) for t in tokens]
        torch.testing.assert_close(torch.stack([s.sum() for s in shares]), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(dense.last_raw, sparse.last_raw, atol=1e-6, rtol=0)
    assert dense.state_dict() == sparse.state_dict()
    if settings.get("clip"):
        # the clip cut something, and the shares still add up
        assert want.abs().max() == pytest.approx(0.8)


def test_dense_shares_follow_the_judges_token_logprobs(neo):
    contexts, tokens = dense_batches()[1]
    scores = neo.score_tokens(contexts, tokens, gpt2_tokens(), per_token=True)
    _, shares = LikelihoodReward(neo, normalize=False).dense(contexts, tokens, gpt2_tokens())
    for share, logprobs, n in zip(shares, scores["token_logprobs"], scores["n_tokens"]):
        # without normalisation the shares are the mean's terms: the constant part is 0
        torch.testing.assert_close(share, logprobs / n, atol=1e-6, rtol=0)
    reward = LikelihoodReward(neo)
    reward.dense(*dense_batches()[0], gpt2_tokens())  # statistics from another batch
    rewards, shares = reward.dense(contexts, tokens, gpt2_tokens())
    for share, logprobs, n in zip(shares, scores["token_logprobs"], scores["n_tokens"]):
        # differences between a sample's shares are those of its log-probs,
        # scaled by 1 / (length * std)
        torch.testing.assert_close(share - share[0], (logprobs - logprobs[0]) / (n * reward.std),
                                   atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# teacher

def test_teacher_scores_match_reference_and_rewards(neo):
    teacher = TeacherReward(neo, EXAMPLES, temperature=0.5)
    expected = reference_teacher_scores(neo, EXAMPLES)
    torch.testing.assert_close(teacher.teacher_scores(range(5)), expected, atol=1e-4, rtol=0)
    choices = torch.tensor([0, 1, 2, 3, 0])
    probs = torch.softmax(expected / 0.5, dim=-1)
    torch.testing.assert_close(teacher([0, 1, 2, 3, 4], choices), probs[torch.arange(5), choices],
                               atol=1e-4, rtol=0)
    agree = TeacherReward(neo, EXAMPLES, mode="agree")([4, 0, 2], expected.argmax(-1)[[4, 0, 2]])
    assert agree.tolist() == [1.0, 1.0, 1.0]
    disagree = TeacherReward(neo, EXAMPLES, mode="agree")([4], (expected.argmax(-1)[[4]] + 1) % 4)
    assert disagree.tolist() == [0.0]


def test_the_teachers_setup_pass_shows_a_bar_on_a_terminal(neo, terminal_stderr, monkeypatch):
    """The pass over every unscored training example when the reward is built (a minute for the
    full training set): train_ppo.py's teacher shows a bar, never on a rank but 0."""
    cfg = SimpleNamespace(style="completion", teacher_mode="prob", teacher_temperature=1.0,
                          reward_batch_size=4)
    REWARD_KINDS["teacher"].build(neo, EXAMPLES, cfg, cache_dir=None, data_id=None,
                                  all_reduce=None)
    assert "teacher: tokenizing:   0%" in terminal_stderr.readouterr().err
    TeacherReward(neo, EXAMPLES)  # a teacher built in code: quiet unless asked
    monkeypatch.setenv("RANK", "1")
    REWARD_KINDS["teacher"].build(neo, EXAMPLES, cfg, cache_dir=None, data_id=None,
                                  all_reduce=None)
    assert terminal_stderr.readouterr().err == ""


def test_an_ending_the_teacher_cannot_score_is_an_error_when_the_reward_is_built(tmp_path):
    """Not when its example is first drawn, hours into a run, on one rank. A cached example is
    already scored and not tokenized again."""
    from test_causal_lm import build_gpt_neo

    short = CausalLM.load(build_gpt_neo(tmp_path / "neo", window=16))
    examples = [dict(ex) for ex in EXAMPLES]
    long = ("waves at every single customer who walks into the café today, one after another, "
            "all day.")
    examples[3] = dict(examples[3], endings=["opens the door.", "waves.", long, long])
    with pytest.raises(UserError, match=r"teacher reward: unit/val, example 3, ending 2: the "
                                        r"continuation alone \(\d+ tokens\) does not fit the "
                                        r"model's window of 16 tokens"):
        TeacherReward(short, examples, data_id="unit/val", cache_dir=tmp_path)
    TeacherReward(short, EXAMPLES, data_id="unit/val", cache_dir=tmp_path).teacher_scores(
        range(len(EXAMPLES)))  # all scored and cached
    calls = []
    short.encode_pairs = lambda contexts, continuations: calls.append(len(contexts))
    TeacherReward(short, EXAMPLES, data_id="unit/val", cache_dir=tmp_path)
    assert calls == []  # every example cached: nothing tokenized


def test_an_ending_that_is_not_valid_unicode_is_an_error_when_the_reward_is_built(neo):
    examples = [dict(ex) for ex in EXAMPLES]
    examples[2] = dict(examples[2], endings=["a", "b", "c \ud800", "d"])
    with pytest.raises(UserError, match=r"^teacher reward: unit/val, example 2, ending 2: the "
                                        r"continuation holds a lone surrogate \(U\+D800\)"):
        TeacherReward(neo, examples, data_id="unit/val")
    with pytest.raises(PairError, match=r"^pair 0: the context holds a lone surrogate"):
        LikelihoodReward(neo)(["\udc80"], [" text"])


def spanning_lm(path):
    """A tiny GPT-2-architecture LM whose BPE has no pre-tokenizer, so merges cross spaces: "Wait."
    + " .." encodes whole with a token ". ." that spans the context/ending boundary."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    corpus = ["Wait. .. he said. Wait. .. again", "A man sits. He waves. He stands.",
              "The dog. The cat. Wait."]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.train_from_iterator(corpus * 8, trainers.BpeTrainer(vocab_size=120,
                                                            special_tokens=["<unk>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return CausalLM.load(path)


@pytest.mark.parametrize("style", ["completion", "lm-eval"])
def test_teacher_scores_equal_the_evaluator_norm_scores(tmp_path, style):
    """The teacher scores endings exactly as hellaswag.evaluate scores them with the same model,
    also where a token spans the context/ending boundary."""
    lm = spanning_lm(tmp_path)
    examples = [dict(ex) for ex in EXAMPLES[:3]]
    examples[0].update(ctx="Wait.", ctx_a="Wait.", endings=["..", "he said.", "again.", "The dog."])
    context, continuations = hellaswag.example_texts(examples[0], style)
    context_ids = lm.encode(context.rstrip())
    whole_ids = lm.encode(context.rstrip() + " " + continuations[0].lstrip())
    # the data has a spanning token
    assert continuation_start(context_ids, whole_ids) < len(context_ids)
    teacher = TeacherReward(lm, examples, style=style).teacher_scores(range(len(examples)))
    evaluated = hellaswag.evaluate(lm.model, examples, tokenizer=lm.tokenizer, style=style,
                                   batch_size=2, return_predictions=True)["predictions"]
    torch.testing.assert_close(teacher, torch.tensor([p["norm_scores"] for p in evaluated]),
                               atol=1e-5, rtol=0)


def test_teacher_lm_eval_style_normalises_per_character(neo):
    teacher = TeacherReward(neo, EXAMPLES, style="lm-eval")
    context, endings = hellaswag.example_texts(EXAMPLES[1], "lm-eval")
    scores = neo.score([context] * 4, endings)
    expected = scores["sum_logprob"] / torch.tensor([len(e) - 1 for e in endings],
                                                    dtype=torch.float32)
    torch.testing.assert_close(teacher.teacher_scores([1])[0], expected)


def test_teacher_scores_lazily_and_caches_on_disk(neo, tmp_path, count_forwards):
    first = TeacherReward(neo, EXAMPLES, cache_dir=tmp_path, data_id="unit/val", batch_size=4)
    r1 = first([0, 2, 2], torch.tensor([1, 0, 3]))
    assert len(count_forwards) == 2  # 2 examples x 4 endings, batches of 4
    first([2, 0], torch.tensor([0, 0]))
    assert len(count_forwards) == 2  # in memory
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("teacher-unit_val-completion-")

    second = TeacherReward(neo, EXAMPLES, cache_dir=tmp_path, data_id="unit/val", batch_size=4)
    torch.testing.assert_close(second([0, 2, 2], torch.tensor([1, 0, 3])), r1)
    assert len(count_forwards) == 2  # a new run: no forwards at all
    second([1], torch.tensor([0]))
    assert len(count_forwards) == 3  # an example nobody scored yet

    third = TeacherReward(neo, EXAMPLES, cache_dir=tmp_path, data_id="unit/val")
    third.teacher_scores([0, 1, 2])
    assert len(count_forwards) == 3  # the file holds what both runs scored

    # two ranks that opened the cache at the same time, each scoring its own
    # examples: the file keeps both
    rank0, rank1 = (TeacherReward(neo, EXAMPLES, cache_dir=tmp_path, data_id="unit/val")
                    for _ in range(2))
    rank0.teacher_scores([3])
    rank1.teacher_scores([4])
    assert len(count_forwards) == 5
    TeacherReward(neo, EXAMPLES, cache_dir=tmp_path, data_id="unit/val").teacher_scores(range(5))
    assert len(count_forwards) == 5

    changed = [dict(ex) for ex in EXAMPLES]
    changed[0]["endings"] = ["sits still."] + changed[0]["endings"][1:]
    TeacherReward(neo, changed, cache_dir=tmp_path, data_id="unit/val").teacher_scores([2])
    assert len(count_forwards) == 6  # other data -> other key: nothing reused, nothing overwritten
    TeacherReward(neo, EXAMPLES, cache_dir=tmp_path, data_id="unit/val",
                  style="lm-eval").teacher_scores([2])
    assert len(count_forwards) == 7  # other style, other strings
    assert len(list(tmp_path.iterdir())) == 3


def test_teacher_unreadable_cache_is_rescored(neo, tmp_path, capsys, count_forwards):
    teacher = TeacherReward(neo, EXAMPLES, cache_dir=tmp_path)
    expected = teacher.teacher_scores([3])
    (path,) = tmp_path.iterdir()
    path.write_bytes(b"not a torch file")
    again = TeacherReward(neo, EXAMPLES, cache_dir=tmp_path)
    assert "unreadable teacher cache" in capsys.readouterr().err
    before = len(count_forwards)
    torch.testing.assert_close(again.teacher_scores([3]), expected)
    assert len(count_forwards) == before + 1


def test_teacher_bad_arguments(neo):
    with pytest.raises(UserError, match="mode must be"):
        TeacherReward(neo, EXAMPLES, mode="max")
    with pytest.raises(UserError, match="temperature must be positive"):
        TeacherReward(neo, EXAMPLES, temperature=0)
    with pytest.raises(UserError, match="unknown style"):
        TeacherReward(neo, EXAMPLES, style="zero-shot")
    with pytest.raises(IndexError, match="example index 5 out of range"):
        TeacherReward(neo, EXAMPLES)([5], torch.tensor([0]))


# --------------------------------------------------------------------------------------------------
# label

def test_label_reward():
    reward = LabelReward(EXAMPLES)  # labels 0, 1, 2, 3, 0
    got = reward([0, 1, 4, 3], torch.tensor([0, 2, 0, 3]))
    assert got.tolist() == [1.0, 0.0, 1.0, 1.0] and got.dtype == torch.float32
    unlabelled = [dict(ex) for ex in EXAMPLES]
    unlabelled[2]["label"] = None
    with pytest.raises(UserError, match="label reward needs gold labels.*first: example 2"):
        LabelReward(unlabelled)
