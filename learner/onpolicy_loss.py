"""`objective.kind` / `objective.variant` dispatch for the learner's on-policy update (pure torch, no Ray).

The learner evaluates the loss in two stages: whole-sequence signals first (they need no logits: returns,
advantages), then the per-token terms chunk by chunk of positions (learner/worker.py). Every kind fills the same
terms, so the update's metrics keep one meaning:

    single  the vocabulary-wide term per token (minillm's single-step KL, gkd's JSD, the skew KLs; lmops: unweighted)
    long    the policy-gradient term per token (minillm's long-term term, sampled_rkl's advantage term)
    kl      the reverse KL per token: exact from the vocabulary where the teacher sent it, else (sampled_rkl) the
            sampled token's log q_old(y) - log p(y), its unbiased estimate on the student's own samples
    rho     q_theta(y_t) / p~(y_t), detached
    logq    log q_theta(y_t), detached
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from common.config import ObjectiveConfig
from learner.objectives import (
    Teacher,
    minillm_token_losses,
    reverse_kl_per_token,
    sequence_future_reward,
    token_weights,
)
from learner.objectives_lmops import (
    lmops_minillm_token_losses,
    lmops_returns,
    lmops_rewards,
    micro_batch_mean_weights,
    whiten,
)
from learner.objectives_onpolicy import discounted_returns, divergence_token_losses, sampled_rkl_token_losses

VOCABULARY_KINDS = ("gkd", "skew_kl", "skew_rkl")


def teacher_transport(obj: ObjectiveConfig, configured: str) -> str:
    """What the teacher sends for the on-policy phase's batches: only the sampled tokens' log-probs for
    sampled_rkl, else the configured transport (dense or topk)."""
    return "token" if obj.kind == "sampled_rkl" else configured


def is_lmops(obj: ObjectiveConfig) -> bool:
    return obj.kind == "minillm" and obj.variant == "lmops"


class OnPolicyTerms(NamedTuple):
    single: Tensor
    long: Tensor
    kl: Tensor
    rho: Tensor
    logq: Tensor


def _rewards(teacher_y: Tensor, old: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask > 0, teacher_y - old, torch.zeros_like(old))


def sequence_signal(
    obj: ObjectiveConfig,
    teacher_y: Tensor,
    old: Tensor,
    mask: Tensor,
    global_sum: Callable[[float], float] = lambda x: x,
) -> Tensor | None:
    """The per-token signal of whole sequences [b, T] (right-padded rows): minillm's R_{t+1}, lmops' whitened
    advantages, sampled_rkl's discounted returns; None for the vocabulary-wide kinds. `global_sum` adds a number
    over the data-parallel ranks (lmops' whitening statistics are global, as in the released code); every rank
    must call this once per micro-batch when it does."""
    mask = mask.to(old.dtype)
    if obj.kind in VOCABULARY_KINDS:
        return None
    if obj.kind == "sampled_rkl":
        return discounted_returns(_rewards(teacher_y, old, mask), mask, obj.resolved_discount)
    if not is_lmops(obj):
        return sequence_future_reward(_rewards(teacher_y, old, mask), mask, obj.length_norm)
    returns = lmops_returns(lmops_rewards(teacher_y, old, mask), mask, obj.resolved_discount)
    # the statistics cover the micro-batch's [b, longest response] tensor, padding zeros included
    width = int((mask.sum(-1)).max().item()) if mask.numel() else 0
    inside = returns[:, :width].double()
    total = global_sum(float(inside.sum()))
    count = global_sum(float(inside.numel()))
    mean = total / max(count, 1.0)
    var = global_sum(float(((inside - mean) ** 2).sum())) / max(count, 1.0)
    return whiten(returns, mean, var) * mask


def update_weights(obj: ObjectiveConfig, mask: Tensor, totals: tuple[float, float], parts: int) -> Tensor:
    """Per-token weights of one micro-batch on one rank [b, T]: normalised by the whole mini-batch's `totals`
    (tokens, sequences over ranks and micro-batches; objective.reduction), or for lmops its own token mean divided
    by `parts` = micro-batches x ranks (the mean of micro-batch means)."""
    if is_lmops(obj):
        return micro_batch_mean_weights(mask.float(), parts)
    tokens, seqs = totals
    return token_weights(mask.float(), obj.reduction, tokens, seqs)


def token_terms(
    obj: ObjectiveConfig,
    logits: Tensor,
    teacher: Teacher,
    tokens: Tensor,
    old: Tensor,
    teacher_y: Tensor,
    signal: Tensor | None,
    alpha: float,
    sampled: Tensor | None = None,
    consume_logits: bool = False,
) -> OnPolicyTerms:
    """The per-token terms of `obj` at flat positions [N] (all real: the learner passes response tokens only);
    `sampled` [N] bool marks tokens of sampled responses where a batch also holds the data set's (gkd, lambda < 1:
    those weigh 1). `consume_logits`: the caller never reads `logits` again (minillm may reuse their buffer)."""
    ones = torch.ones(tokens.shape[0], device=logits.device)
    if obj.kind == "sampled_rkl":
        assert signal is not None
        s = sampled_rkl_token_losses(
            logits, tokens, ones, old, teacher_y, alpha, obj.clip_eps, obj.resolved_discount, advantages=signal
        )
        return OnPolicyTerms(torch.zeros_like(s.loss), s.loss, -s.reward, s.rho, s.logq)
    if obj.kind in VOCABULARY_KINDS:
        param = obj.beta if obj.kind == "gkd" else obj.skew
        d = divergence_token_losses(
            obj.kind,
            param,
            logits,
            teacher,
            ones,
            tokens=tokens,
            old_logprobs=old,
            teacher_token_logprobs=teacher_y,
            alpha=alpha,
            sampled=sampled,
        )
        kl = reverse_kl_per_token(logits.detach(), teacher, ones)
        logq = torch.log_softmax(logits.detach().float(), -1).gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
        return OnPolicyTerms(d.loss, torch.zeros_like(d.loss), kl, d.rho, logq)
    assert signal is not None
    if is_lmops(obj):
        t = lmops_minillm_token_losses(
            logits,
            teacher,
            tokens,
            ones,
            old,
            alpha,
            obj.clip_eps,
            signal,
            teacher_token_logprobs=teacher_y,
            consume_logits=consume_logits,
        )
        return OnPolicyTerms(t.reg, t.pg, t.kl, t.rho, t.logq)
    m = minillm_token_losses(
        logits,
        teacher,
        tokens,
        ones,
        old,
        alpha,
        obj.clip_eps,
        teacher_token_logprobs=teacher_y,
        future_reward=signal,
        consume_logits=consume_logits,
    )
    return OnPolicyTerms(m.single, m.long, m.kl, m.rho, m.logq)
