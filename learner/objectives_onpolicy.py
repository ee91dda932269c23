"""The other on-policy distillation objectives the field uses, as pure per-token torch functions (no Ray).

Conventions as in learner/objectives.py: leading dims [...] (flat tokens [N] in the learner, [B, T] in tests),
vocabulary V last, `mask` 1 on real response tokens and 0 on padding (padding may hold garbage: it never reaches an
output or a gradient). p is the teacher, q = q_theta the student, q_old the student that sampled.

Vocabulary-wide divergences (gkd, skew_kl, skew_rkl) take a dense teacher [..., V] or `TopKLogprobs`; with top-k
both distributions are coarsened to the teacher's top-k tokens plus one tail bucket (exact tail masses) and the
divergence is taken between the coarsened distributions, as the top-k single-step KL of MiniLLM is: by the data
processing inequality (each divergence here is an f-divergence, or a KL to a mixture that coarsens with it), a
lower bound of the full one, equal to it at k = V.

    generalized_jsd          JSD(beta) per position, TRL's GKD convention (beta = 0 forward KL, 1 reverse KL)
    skew_kl / skew_rkl       DistiLLM's skew KL(p || a p + (1-a) q) and skew reverse KL(q || a q + (1-a) p)
    divergence_token_losses  any of them per position, weighted by the detached importance weight of the token
    discounted_returns       A_t = sum_{t' >= t} gamma^(t'-t) r_t' per sequence
    sampled_rkl_token_losses the sampled-token reverse KL as a policy-gradient advantage, PPO-clipped
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from common.logprobs import TopKLogprobs, tail_logprob
from learner.objectives import (
    LOGP_FLOOR,
    Teacher,
    _clean_teacher,
    _floor,
    _masked_log_softmax,
    _safe_tokens,
    _token_logprob,
    importance_ratio,
    ppo_clipped_loss,
)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL[a || b] over the last dim; entries where a underflows to 0 contribute exactly 0 (b is floored)."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b.clamp_min(LOGP_FLOOR)), torch.zeros_like(a)).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w a + (1 - w) b), exact at w = 0 and w = 1 (where the other term would be log 0)."""
    if weight_a == 0.0:
        return log_b
    if weight_a == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def paired_logprobs(logq: Tensor, teacher: Teacher) -> tuple[Tensor, Tensor]:
    """(student, teacher) log-probs over the same outcomes: the vocabulary (dense teacher), or the teacher's top-k
    tokens plus one tail bucket [..., k + 1] (top-k teacher; the student's tail from a log-sum-exp)."""
    if not isinstance(teacher, TopKLogprobs):
        return logq, teacher
    q_tail = tail_logprob(logq, teacher.ids).clamp_min(LOGP_FLOOR)
    q = torch.cat([logq.gather(-1, teacher.ids), q_tail.unsqueeze(-1)], -1)
    p = torch.cat([teacher.logprobs, teacher.tail.unsqueeze(-1)], -1)
    return q, p


def generalized_jsd(logq: Tensor, logp: Tensor, beta: float) -> Tensor:
    """JSD(beta) per position, in TRL's GKD convention (GKDTrainer.generalized_jsd_loss; Agarwal et al., ICLR 2024,
    "On-Policy Distillation of Language Models", eq. for JSD(beta)):

        m = beta p + (1 - beta) q,   JSD(beta) = beta KL[p || m] + (1 - beta) KL[q || m]   for 0 < beta < 1,
        JSD(0) = KL[p || q] (forward KL),   JSD(1) = KL[q || p] (reverse KL).

    The end points are TRL's special cases, not the limits of the formula (which tend to 0 there). The gradient
    flows through q wherever it appears, the mixture included (as in TRL)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return _kl(logp, logq)
    if beta == 1.0:
        return _kl(logq, logp)
    logm = _log_mix(logp, logq, beta)
    return beta * _kl(logp, logm) + (1 - beta) * _kl(logq, logm)


def skew_kl(logq: Tensor, logp: Tensor, skew: float) -> Tensor:
    """Skew KL per position (DistiLLM, Ko et al., ICML 2024, eq. 4; distillm/losses.py skewed_forward_kl):
    SKL^(a)(p, q) = KL[p || a p + (1 - a) q]; a = 0 is the forward KL[p || q]. The released code minimises the
    cross-entropy -sum p log(a p + (1-a) q), which differs from this by p's entropy (same gradient)."""
    if not 0.0 <= skew <= 1.0:
        raise ValueError(f"skew must be in [0, 1], got {skew}")
    return _kl(logp, _log_mix(logp, logq, skew))


def skew_rkl(logq: Tensor, logp: Tensor, skew: float) -> Tensor:
    """Skew reverse KL per position (DistiLLM, eq. 5; skewed_reverse_kl): SRKL^(a)(q, p) = KL[q || a q + (1 - a) p];
    a = 0 is the reverse KL[q || p]. The gradient flows through both q's, the mixture's included (as released)."""
    if not 0.0 <= skew <= 1.0:
        raise ValueError(f"skew must be in [0, 1], got {skew}")
    return _kl(logq, _log_mix(logq, logp, skew))


DIVERGENCES = {"gkd": generalized_jsd, "skew_kl": skew_kl, "skew_rkl": skew_rkl}


class DivergenceTerms(NamedTuple):
    """Per-token terms, each shaped like `mask` and exactly 0 where it is 0."""

    loss: Tensor  # w_t * D_t (with grad through q_theta)
    divergence: Tensor  # D_t itself, detached (a metric)
    rho: Tensor  # the detached weight w_t (1 where no old log-probs were given)


def divergence_token_losses(
    kind: str,
    param: float,
    student_logits: Tensor,
    teacher: Teacher,
    mask: Tensor,
    *,
    tokens: Tensor | None = None,
    old_logprobs: Tensor | None = None,
    teacher_token_logprobs: Tensor | None = None,
    alpha: float = 0.0,
    sampled: Tensor | None = None,
) -> DivergenceTerms:
    """kind (gkd | skew_kl | skew_rkl) with its parameter (beta or skew) at every position, weighted per token.

    On sampled responses (tokens, old_logprobs and teacher_token_logprobs given) the weight is MiniLLM's
    single-step one, w_t = q_theta(y_t) / p~(y_t) detached, p~ = alpha p + (1 - alpha) q_old: 1 exactly at
    alpha = 0 before the first update of a collection, the token-level correction for teacher-mixed sampling and
    later PPO epochs otherwise. On the data set's responses (GKD's 1 - lambda part) there is no sampling
    distribution to correct: the weight is 1 (TRL's choice); `sampled` (bool, like `mask`) marks the sampled tokens
    when a batch mixes both (None: all sampled)."""
    fn = DIVERGENCES[kind]
    mask = mask.to(student_logits.dtype)
    real = mask > 0
    logq = _masked_log_softmax(student_logits, mask)
    clean = _clean_teacher(teacher, mask, logq.dtype)
    q, p = paired_logprobs(logq, clean)
    divergence = fn(q, p, param) * mask
    if old_logprobs is None:
        rho = mask
    else:
        if tokens is None or teacher_token_logprobs is None:
            raise ValueError("importance weights need tokens, old_logprobs and teacher_token_logprobs")
        safe = _safe_tokens(tokens, mask)
        logp_y = _floor(torch.where(real, teacher_token_logprobs.to(logq.dtype), torch.zeros_like(mask)))
        old = torch.where(real, old_logprobs.to(logq.dtype), torch.zeros_like(mask))
        rho = importance_ratio(_token_logprob(logq, safe), logp_y.detach(), old.detach(), alpha, real).detach() * mask
        if sampled is not None:
            rho = torch.where(sampled, rho, mask)
    return DivergenceTerms(rho * divergence, divergence.detach(), rho)


def discounted_returns(rewards: Tensor, mask: Tensor, discount: float) -> Tensor:
    """A_t = sum over real t' >= t of discount^(t' - t) * r_t' over the last dim (the current token's reward
    included; the exponent counts positions); 0 on padding. discount = 1 is the plain reward-to-go, 0 the
    token's own reward."""
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount must be in [0, 1], got {discount}")
    mask = mask.to(rewards.dtype)
    r = torch.where(mask > 0, rewards, torch.zeros_like(rewards))
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[..., 0])
    for t in range(r.shape[-1] - 1, -1, -1):
        running = r[..., t] + discount * running
        out[..., t] = running
    return out * mask


class SampledTerms(NamedTuple):
    """Per-token terms, each shaped like `mask` and exactly 0 where it is 0."""

    loss: Tensor  # PPO-clipped -A_t rho_t (with grad through rho_t)
    reward: Tensor  # r_t = log p(y_t) - log q_old(y_t), detached: minus the sampled token's reverse KL estimate
    rho: Tensor  # q_theta(y_t) / p~(y_t), detached
    logq: Tensor  # log q_theta(y_t), detached


def sampled_rkl_token_losses(
    student_logits: Tensor,
    tokens: Tensor,
    mask: Tensor,
    old_logprobs: Tensor,
    teacher_token_logprobs: Tensor,
    alpha: float,
    clip_eps: float | None,
    discount: float,
    *,
    advantages: Tensor | None = None,
) -> SampledTerms:
    """The sampled-token reverse KL as the advantage of a PPO policy-gradient update (Thinking Machines, "On-Policy
    Distillation", 2025; Qwen3 technical report's on-policy distillation; verl / slime / AReaL / prime-rl):

        r_t = log p(y_t) - log q_old(y_t)        (no vocabulary-wide term: only the sampled token's log-probs)
        A_t = sum_{t' >= t} discount^(t' - t) r_t'   (discounted_returns over the last dim, or `advantages`)
        rho_t = q_theta(y_t) / p~(y_t),  p~ = alpha p + (1 - alpha) q_old
        loss_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))   (clip_eps None or <= 0: no clipping)

    With discount = 1, alpha = 0 and theta = theta_old, E_{y~q}[grad sum_t loss_t] is exactly the gradient of the
    sequence-level reverse KL[q || p] (the enumeration test); discount < 1 (Thinking Machines use 0) trades that
    bias for variance. The teacher only needs log p(y_t) of the sampled tokens."""
    mask = mask.to(student_logits.dtype)
    real = mask > 0
    logq = _masked_log_softmax(student_logits, mask)
    logq_y = _token_logprob(logq, _safe_tokens(tokens, mask))
    logp_y = _floor(torch.where(real, teacher_token_logprobs.to(logq.dtype), torch.zeros_like(mask))).detach()
    old = torch.where(real, old_logprobs.to(logq.dtype), torch.zeros_like(mask)).detach()
    reward = torch.where(real, logp_y - old, torch.zeros_like(old))
    if advantages is None:
        advantages = discounted_returns(reward, mask, discount)
    adv = torch.where(real, advantages.to(logq.dtype), torch.zeros_like(mask)).detach()
    rho = importance_ratio(logq_y, logp_y, old, alpha, real)
    loss = ppo_clipped_loss(adv, rho, clip_eps)
    return SampledTerms(loss * mask, reward * mask, rho.detach() * mask, (logq_y * mask).detach())
