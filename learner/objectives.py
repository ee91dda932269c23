"""The MiniLLM objective and its companions as small, fully specified pure torch functions (no Ray).

Shapes: B sequences, T response positions, V vocabulary. Position t's logits predict `tokens[:, t]`;
`mask` is 1 on real response tokens and 0 on padding (left, right or anywhere: nothing assumes contiguity).
Padding positions may hold garbage (NaN logits, -inf teacher log-probs, out-of-range token ids); it never
reaches an output or a gradient.

    minillm_token_losses   the paper's single-step and PPO-clipped long-term terms per token
    sequence_future_reward R_{t+1}: mean (or sum) of the rewards of a sequence's later tokens
    mixture_logprob        log p~(y) for the teacher-mixed sampling distribution
    token_nll              next-token NLL (SFT and the pre-training loss L_PT)
    word_kd_token_losses   word-level KD: forward KL[p || q] per position (the KD baseline)
    reverse_kl_per_token   exact KL[q || p] per position (a metric)
    reduce_losses          per-token -> scalar, per sequence ("seq", the default) or per token
    truncate_vocab         drop padded embedding rows beyond the tokenizer's vocabulary
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# A teacher log-prob of -inf (probability exactly 0) would make KL[q || p] infinite and its gradient NaN,
# and 0 * -inf = NaN where q underflows to 0. Floor teacher log-probs at a finite value far below anything
# a real float32 log-softmax produces; only pathological inputs are changed by it.
LOGP_FLOOR = -1e4


def _masked_log_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    # Padding may hold anything (even NaN/inf): replace it before normalising so no NaN reaches a gradient
    # (torch.where routes a zero gradient to the discarded branch).
    keep = mask.unsqueeze(-1) > 0
    return torch.log_softmax(torch.where(keep, logits, torch.zeros_like(logits)), dim=-1)


def _clean_teacher(teacher_logprobs: Tensor, mask: Tensor) -> Tensor:
    keep = mask.unsqueeze(-1) > 0
    clean = torch.where(keep, teacher_logprobs, torch.zeros_like(teacher_logprobs))
    return clean.nan_to_num(nan=LOGP_FLOOR, neginf=LOGP_FLOOR).clamp_min(LOGP_FLOOR).detach()


def _safe_tokens(tokens: Tensor, mask: Tensor) -> Tensor:
    # pad ids (-100, or an id beyond a truncated vocabulary) must not break gather on padding
    return torch.where(mask > 0, tokens, torch.zeros_like(tokens)).long()


def _token_logprob(logprobs: Tensor, tokens: Tensor) -> Tensor:
    return logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _exact_reverse_kl(logq: Tensor, logp: Tensor) -> Tensor:
    # sum_v q (log q - log p); q = 0 entries give 0 * finite = 0 because logp is floored
    return (logq.exp() * (logq - logp)).sum(-1)


def sequence_future_reward(r: Tensor, mask: Tensor, length_norm: bool = True) -> Tensor:
    """R_{t+1} [B, T]: the mean (or, without length_norm, the sum) of r over the sequence's LATER real tokens
    t' > t. 0 where there is none (the last real token) and on padding.

    Later tokens only: r_t itself is covered, exactly and with lower variance, by the single-step term's
    full-vocabulary KL at t (see the enumeration test)."""
    mask = mask.to(r.dtype)
    r = torch.where(mask > 0, r, torch.zeros_like(r))
    suffix_sum = r.flip(-1).cumsum(-1).flip(-1) - r  # sum over t' > t
    if not length_norm:
        return suffix_sum * mask
    suffix_count = mask.flip(-1).cumsum(-1).flip(-1) - mask  # number of real t' > t
    mean = suffix_sum / suffix_count.clamp_min(1.0)
    return torch.where(suffix_count > 0, mean, torch.zeros_like(mean)) * mask


def mixture_logprob(teacher_token_logprobs: Tensor, old_logprobs: Tensor, alpha: float) -> Tensor:
    """log p~(y) = log(alpha * p(y) + (1 - alpha) * q_old(y)), computed in log space (logaddexp) and exact
    at alpha = 0 and alpha = 1, where the other term would be log(0)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 0.0:
        return old_logprobs
    if alpha == 1.0:
        return teacher_token_logprobs
    return torch.logaddexp(teacher_token_logprobs + math.log(alpha), old_logprobs + math.log1p(-alpha))


def minillm_token_losses(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    tokens: Tensor,
    mask: Tensor,
    old_logprobs: Tensor,
    alpha: float,
    clip_eps: float | None,
    length_norm: bool = True,
) -> tuple[Tensor, Tensor]:
    """MiniLLM's per-token (single, long) terms, each [B, T], exactly 0 where mask is 0.

    student_logits [B, T, V] (with grad); teacher_logprobs [B, T, V] log-softmaxed; tokens [B, T] the
    sampled responses; old_logprobs [B, T] the student's log-prob of each token when it was sampled.

    r_t = log p(y_t) - log q_old(y_t) (no gradient); R_{t+1} = sequence_future_reward(r) (later tokens);
    rho_t = q_theta(y_t) / p~(y_t) with p~ = alpha p + (1 - alpha) q_old; w_t = rho_t detached.
    single_t = w_t * KL[q_theta(.|t) || p(.|t)] over the whole vocabulary (exact, through q_theta);
    long_t = max(-R_{t+1} rho_t, -R_{t+1} clip(rho_t, 1 - eps, 1 + eps)); clip_eps None (or <= 0) disables
    the clipping.
    """
    mask = mask.to(student_logits.dtype)
    real = mask > 0
    tokens = _safe_tokens(tokens, mask)
    logq = _masked_log_softmax(student_logits, mask)
    logp = _clean_teacher(teacher_logprobs.to(logq.dtype), mask)
    old = torch.where(real, old_logprobs.to(logq.dtype), torch.zeros_like(mask)).detach()

    logq_y = _token_logprob(logq, tokens)
    logp_y = _token_logprob(logp, tokens)
    reward = torch.where(real, logp_y - old, torch.zeros_like(old))  # logp is detached already
    future = sequence_future_reward(reward, mask, length_norm)

    log_rho = logq_y - mixture_logprob(logp_y, old, alpha)
    rho = torch.exp(torch.where(real, log_rho, torch.zeros_like(log_rho)))
    single = rho.detach() * _exact_reverse_kl(logq, logp) * mask

    # PPO's pessimistic bound: the max of the two losses, so the ratio cannot profit from leaving [1-e, 1+e]
    unclipped = -future * rho
    if clip_eps is None or clip_eps <= 0:
        long = unclipped
    else:
        long = torch.maximum(unclipped, -future * rho.clamp(1.0 - clip_eps, 1.0 + clip_eps))
    return single, long * mask


def token_nll(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """-log q(target) per position, [B, T]; 0 on padding. logits[:, t] predict targets[:, t]; log-probs
    are accepted too (log_softmax is idempotent)."""
    mask = mask.to(logits.dtype)
    logq = _masked_log_softmax(logits, mask)
    return -_token_logprob(logq, _safe_tokens(targets, mask)) * mask


def word_kd_token_losses(student_logits: Tensor, teacher_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Forward KL[p || q_theta] per position, [B, T]: sum_v p (log p - log q); 0 on padding. Tokens the
    teacher gives probability 0 (-inf, or underflow) contribute 0, the limit of p log p."""
    mask = mask.to(student_logits.dtype)
    logq = _masked_log_softmax(student_logits, mask)
    keep = mask.unsqueeze(-1) > 0
    raw = torch.where(keep, teacher_logprobs.to(logq.dtype), torch.zeros_like(logq)).detach()
    p = raw.exp()
    term = torch.where(p > 0, p * (raw.clamp_min(LOGP_FLOOR) - logq), torch.zeros_like(logq))
    return term.sum(-1) * mask


def reverse_kl_per_token(student_logits: Tensor, teacher_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Exact KL[q || p] per position over the vocabulary, [B, T]; 0 on padding."""
    mask = mask.to(student_logits.dtype)
    logq = _masked_log_softmax(student_logits, mask)
    logp = _clean_teacher(teacher_logprobs.to(logq.dtype), mask)
    return _exact_reverse_kl(logq, logp) * mask


def reduce_losses(per_token: Tensor, mask: Tensor, mode: str = "seq") -> Tensor:
    """Per-token losses [B, T] -> scalar.

    "seq" (the default, as in Algorithm 1): each sequence's sum over its real tokens divided by its number
    of real tokens, then the mean over the sequences that have any. Every response counts equally whatever
    its length (the paper's code normalises each response's loss by its length), so long responses do not
    dominate the update.
    "token": the sum over all real tokens / their total number (long responses weigh more).
    An all-masked batch gives 0, still differentiable when per_token requires grad, never NaN.
    """
    mask = mask.to(per_token.dtype)
    # where, not multiply: a NaN/inf on padding must not leak (0 * inf = NaN)
    per_token = torch.where(mask > 0, per_token, torch.zeros_like(per_token))
    if mode == "token":
        return per_token.sum() / mask.sum().clamp_min(1.0)
    if mode != "seq":
        raise ValueError(f"unknown reduction {mode!r} (use 'seq' or 'token')")
    counts = mask.sum(-1)
    per_seq = per_token.sum(-1) / counts.clamp_min(1.0)
    present = (counts > 0).to(per_token.dtype)
    return (per_seq * present).sum() / present.sum().clamp_min(1.0)


def truncate_vocab(logits_or_logprobs: Tensor, vocab_size: int) -> Tensor:
    """Slice the last dim to the tokenizer's vocabulary, dropping padded embedding rows (callers then
    re-normalise with log_softmax)."""
    if vocab_size > logits_or_logprobs.shape[-1]:
        raise ValueError(f"vocab_size {vocab_size} exceeds the last dim {logits_or_logprobs.shape[-1]}")
    return logits_or_logprobs[..., :vocab_size]
