"""
The 4 rows context + ending of every HellaSwag example, one full forward: the straightforward
multiple-choice computation that hellaswag.score_choices (the evaluator) and GPT.choice_forward
(PPO's choice rollouts) replace. The benchmarks time them against it, and the tests check them
against it.

    idx, attention_mask, target_mask = pad_choices(encoded)   # encoded: GPT.encode_choices
    logits, _ = model(idx, attention_mask, logits_at=target_mask.bool())
    sum_logprobs, n_tokens = choice_logprobs(logits, idx, target_mask)  # (N, 4) each
"""

import torch

from model import logprobs_from_logits


def pad_choices(encoded, pad_token=0):
    """
    N encoded examples -> idx, attention_mask, target_mask, each (4N, T) long, right-padded; row
    4*i+j holds context_i + ending_j. target_mask[r, t] = 1 where idx[r, t+1] is an ending token:
    the positions whose logits predict the ending (the last column is always 0). The padding is
    after every real token, so a causal model never attends to it: any id in its vocabulary pads.
    """
    rows = [(context, ending) for context, endings in encoded for ending in endings]
    T = max(len(c) + len(e) for c, e in rows)
    idx = torch.full((len(rows), T), pad_token, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), T, dtype=torch.long)
    target_mask = torch.zeros(len(rows), T, dtype=torch.long)
    for r, (context, ending) in enumerate(rows):
        n = len(context) + len(ending)
        idx[r, :n] = torch.tensor(context + ending)
        attention_mask[r, :n] = 1
        target_mask[r, len(context) - 1:n - 1] = 1
    return idx, attention_mask, target_mask


def choice_logprobs(logits, idx, target_mask):
    """
    Logits of the rows of pad_choices -> sum of the ending tokens' log-probs (N, 4) and their number
    (N, 4), float32 and differentiable. The acc_norm score of completion style is sum / n. logits
    are (4N, T, V), or (K, V) at just the K positions where target_mask is 1 (GPT's
    logits_at=target_mask.bool(), which skips most of the LM head).
    """
    mask = target_mask.bool()
    if logits.dim() == 3:
        logits = logits[mask]
    next_tokens = torch.roll(idx, -1, dims=1)[mask]  # position t predicts token t + 1
    token_logprobs = torch.zeros(mask.shape, device=logits.device).masked_scatter(
        mask, logprobs_from_logits(logits, next_tokens))
    return token_logprobs.sum(1).view(-1, 4), mask.sum(1).float().view(-1, 4)
