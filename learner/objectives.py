"""The MiniLLM objective and its companions as small, fully specified pure torch functions.

Shapes: B sequences, T response positions, V vocabulary. Position t's logits predict `tokens[:, t]`;
`mask` is 1 on real response tokens and 0 on padding (left, right or both).

    minillm_token_losses  the paper's single-step and PPO-clipped long-term terms per token
    token_nll             next-token NLL (SFT and the pre-training loss L_PT)
    word_kd_token_losses  word-level KD: forward KL[p || q] per position (the KD baseline)
    reverse_kl_per_token  exact KL[q || p] per position (a metric)
    reduce_losses         per-token -> scalar, per sequence ("seq", the default) or per token
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# A teacher log-prob of -inf (probability exactly 0) would make KL[q || p] infinite and its gradient NaN;
# floor it at a finite value far below anything a float32 softmax resolves.
LOGP_FLOOR = -1e4


def _masked_log_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    # padding positions may hold anything (even NaN/inf); zero them so no NaN leaks into gradients
    keep = mask.unsqueeze(-1) > 0
    return torch.log_softmax(torch.where(keep, logits, torch.zeros_like(logits)), dim=-1)


def _clean_teacher(teacher_logprobs: Tensor, mask: Tensor) -> Tensor:
    keep = mask.unsqueeze(-1) > 0
    clean = torch.where(keep, teacher_logprobs, torch.zeros_like(teacher_logprobs))
    return clean.nan_to_num(nan=LOGP_FLOOR, neginf=LOGP_FLOOR).clamp_min(LOGP_FLOOR).detach()


def _token_logprob(logprobs: Tensor, tokens: Tensor) -> Tensor:
    return logprobs.gather(-1, tokens.clamp_min(0).unsqueeze(-1)).squeeze(-1)


def sequence_future_reward(r: Tensor, mask: Tensor, length_norm: bool = True) -> Tensor:
    """R_{t+1}: the mean (or, without length_norm, the sum) of r over the sequence's LATER real tokens
    t' > t; 0 where there is none (the last real token) and on padding."""
    r = r * mask
    suffix_sum = r.flip(-1).cumsum(-1).flip(-1) - r  # sum over t' > t
    if not length_norm:
        return suffix_sum * mask
    suffix_count = mask.flip(-1).cumsum(-1).flip(-1) - mask
    return torch.where(suffix_count > 0, suffix_sum / suffix_count.clamp_min(1), torch.zeros_like(r)) * mask


def mixture_logprob(teacher_token_logprobs: Tensor, old_logprobs: Tensor, alpha: float) -> Tensor:
    """log p~(y) = log(alpha * p(y) + (1 - alpha) * q_old(y)), exact at alpha = 0 and alpha = 1."""
    if alpha <= 0.0:
        return old_logprobs
    if alpha >= 1.0:
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
    """(single, long), each [B, T], 0 where mask is 0.

    r_t = log p(y_t) - log q_old(y_t); R_{t+1} = mean (sum without length_norm) of r over later tokens;
    rho_t = q_theta(y_t) / p~(y_t) with p~ = alpha p + (1 - alpha) q_old; w_t = rho_t detached.
    single_t = w_t * KL[q_theta(.|t) || p(.|t)] over the whole vocabulary (exact, through q_theta);
    long_t = max(-R_{t+1} rho_t, -R_{t+1} clip(rho_t, 1 - eps, 1 + eps)) (no clipping when clip_eps is None).
    """
    mask = mask.to(student_logits.dtype)
    logq = _masked_log_softmax(student_logits, mask)
    logp = _clean_teacher(teacher_logprobs.to(logq.dtype), mask)
    old = torch.where(mask > 0, old_logprobs.to(logq.dtype), torch.zeros_like(mask)).detach()

    logq_y = _token_logprob(logq, tokens)
    logp_y = _token_logprob(logp, tokens)
    reward = ((logp_y - old) * mask).detach()
    future = sequence_future_reward(reward, mask, length_norm)

    log_rho = logq_y - mixture_logprob(logp_y, old, alpha)
    rho = torch.exp(torch.where(mask > 0, log_rho, torch.zeros_like(log_rho)))
    kl = (logq.exp() * (logq - logp)).sum(-1)
    single = rho.detach() * kl * mask

    advantage = -future
    unclipped = advantage * rho
    if clip_eps is None:
        long = unclipped
    else:
        long = torch.maximum(unclipped, advantage * rho.clamp(1.0 - clip_eps, 1.0 + clip_eps))
    return single, long * mask


def token_nll(logprobs_or_logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """-log q(target) per position, [B, T]; 0 on padding. Accepts logits or log-probs (normalised here)."""
    mask = mask.to(logprobs_or_logits.dtype)
    logq = _masked_log_softmax(logprobs_or_logits, mask)
    return -_token_logprob(logq, targets) * mask


def word_kd_token_losses(student_logits: Tensor, teacher_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Forward KL[p || q_theta] per position, [B, T]: sum_v p (log p - log q). Tokens the teacher gives
    probability 0 (-inf) contribute 0."""
    mask = mask.to(student_logits.dtype)
    logq = _masked_log_softmax(student_logits, mask)
    keep = mask.unsqueeze(-1) > 0
    raw = torch.where(keep, teacher_logprobs.to(logq.dtype), torch.zeros_like(logq)).detach()
    p = raw.exp()
    term = torch.where(p > 0, p * (raw.clamp_min(LOGP_FLOOR) - logq), torch.zeros_like(logq))
    return term.sum(-1) * mask


def reverse_kl_per_token(student_logits: Tensor, teacher_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Exact KL[q || p] per position, [B, T]; 0 on padding."""
    mask = mask.to(student_logits.dtype)
    logq = _masked_log_softmax(student_logits, mask)
    logp = _clean_teacher(teacher_logprobs.to(logq.dtype), mask)
    return (logq.exp() * (logq - logp)).sum(-1) * mask


def reduce_losses(per_token: Tensor, mask: Tensor, mode: str = "seq") -> Tensor:
    """Per-token losses [B, T] -> scalar.

    "seq" (default, as Algorithm 1): each sequence's mean over its real tokens, then the mean over sequences
    that have any. Every response counts equally whatever its length, so long responses do not dominate
    the update and the objective matches the paper's length-normalised per-sequence loss.
    "token": sum over all real tokens / their number (long responses weigh more).
    An all-masked batch gives 0 (still differentiable), never NaN.
    """
    mask = mask.to(per_token.dtype)
    per_token = per_token * mask
    if mode == "token":
        return per_token.sum() / mask.sum().clamp_min(1.0)
    if mode != "seq":
        raise ValueError(f"unknown reduction {mode!r} (use 'seq' or 'token')")
    counts = mask.sum(-1)
    per_seq = per_token.sum(-1) / counts.clamp_min(1.0)
    present = (counts > 0).to(per_token.dtype)
    return (per_seq * present).sum() / present.sum().clamp_min(1.0)


def truncate_vocab(logits: Tensor, vocab_size: int) -> Tensor:
    """Drop padded embedding rows beyond the tokenizer's vocabulary (callers re-normalise)."""
    return logits[..., :vocab_size]
