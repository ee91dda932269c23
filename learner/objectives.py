"""The MiniLLM objective and its companions as small, fully specified pure torch functions (no Ray).

Shapes: any leading dims [...] (the learner passes flat response tokens [N], tests pass [B, T]), V vocabulary.
Position t's logits predict `tokens[..., t]`; `mask` is 1 on real response tokens and 0 on padding (anywhere:
nothing assumes contiguity). Padding positions may hold garbage (NaN logits, -inf teacher log-probs,
out-of-range token ids); it never reaches an output or a gradient.

The teacher is either dense log-probs [..., V] or `TopKLogprobs` (top-k ids and log-probs + the exact tail
mass). With top-k the single-step term is the KL between the two distributions coarsened to the teacher's top-k
tokens plus one tail bucket; by the log-sum inequality it is a lower bound of the full KL, with gap
sum_{v in tail} q_v log(q_v / p_v) - q_tail log(q_tail / p_tail) >= 0. The rewards and importance weights always
use the teacher's exact log-prob of the sampled token (`teacher_token_logprobs`), whatever the transport.

    minillm_token_losses   the paper's single-step and PPO-clipped long-term terms per token (+ KL and rho)
    sequence_future_reward R_{t+1}: mean (or sum) of the rewards of a sequence's later tokens
    mixture_logprob        log p~(y) for the teacher-mixed sampling distribution
    single_step_kl         KL[q || p] per position: exact (dense) or coarsened (top-k)
    token_nll              next-token NLL (SFT and the pre-training loss L_PT)
    word_kd_token_losses   word-level KD: forward KL[p || q] per position (the KD baseline)
    token_weights          per-token weights of a reduction ("token" mean, or "seq": per-sequence means)
    reduce_losses          per-token -> scalar with those weights
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from common.logprobs import TopKLogprobs, tail_logprob, vocab_log_softmax
from learner.vocab_picks import topk_picks

# A teacher log-prob of -inf (probability exactly 0) would make KL[q || p] infinite and its gradient NaN,
# and 0 * -inf = NaN where q underflows to 0. Floor teacher log-probs at a finite value far below anything
# a real float32 log-softmax produces; only pathological inputs are changed by it.
LOGP_FLOOR = -1e4

Teacher = Tensor | TopKLogprobs


def _masked_log_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    # Padding may hold anything (even NaN/inf): replace it before normalising so no NaN reaches a gradient
    # (torch.where routes a zero gradient to the discarded branch). Without padding (the learner passes real
    # tokens only) the where would be an identity costing one [..., V] copy in forward and one in backward.
    keep = mask.unsqueeze(-1) > 0
    if bool(keep.all()):
        return vocab_log_softmax(logits, logits.shape[-1])
    return vocab_log_softmax(torch.where(keep, logits, 0.0), logits.shape[-1])


def _floor(logprobs: Tensor) -> Tensor:
    return logprobs.nan_to_num(nan=LOGP_FLOOR, neginf=LOGP_FLOOR).clamp_min(LOGP_FLOOR)


def _clean_teacher(teacher: Teacher, mask: Tensor, dtype: torch.dtype) -> Teacher:
    keep = mask > 0
    if isinstance(teacher, TopKLogprobs):
        lp = torch.where(keep.unsqueeze(-1), teacher.logprobs.to(dtype), torch.zeros((), dtype=dtype))
        tail = torch.where(keep, teacher.tail.to(dtype), torch.zeros((), dtype=dtype))
        ids = torch.where(keep.unsqueeze(-1), teacher.ids, torch.zeros_like(teacher.ids)).long()
        return TopKLogprobs(ids, _floor(lp).detach(), _floor(tail).detach())
    clean = torch.where(keep.unsqueeze(-1), teacher.to(dtype), torch.zeros((), dtype=dtype))
    return _floor(clean).detach()


def _safe_tokens(tokens: Tensor, mask: Tensor) -> Tensor:
    # pad ids (-100, or an id beyond a truncated vocabulary) must not break gather on padding
    return torch.where(mask > 0, tokens, torch.zeros_like(tokens)).long()


def _token_logprob(logprobs: Tensor, tokens: Tensor) -> Tensor:
    return logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _kl_terms(logq: Tensor, logp: Tensor) -> Tensor:
    # sum q (log q - log p); q = 0 entries give 0 * finite = 0 because logp is floored
    return (logq.exp() * (logq - logp)).sum(-1)


def single_step_kl(logq: Tensor, teacher: Teacher) -> Tensor:
    """KL[q || p] per position from the student's log-probs [..., V] (with grad) and a cleaned teacher.

    Dense: exact over the vocabulary. Top-k: the KL of both distributions coarsened to the teacher's top-k tokens
    plus one tail bucket (student tail = 1 - sum of its top-k mass, from a log-sum-exp): a lower bound of the
    full KL (log-sum inequality), exact when the tail distributions are proportional."""
    if not isinstance(teacher, TopKLogprobs):
        return _kl_terms(logq, teacher)
    head = _kl_terms(logq.gather(-1, teacher.ids), teacher.logprobs)
    logq_tail = tail_logprob(logq, teacher.ids).clamp_min(LOGP_FLOOR)  # exp(floor) = 0: an empty tail adds 0
    return head + logq_tail.exp() * (logq_tail - teacher.tail)


def _logprob_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32  # as vocab_log_softmax


def token_logprob_and_kl(
    logits: Tensor, clean: Teacher, tokens: Tensor, mask: Tensor, consume_logits: bool = False
) -> tuple[Tensor, Tensor]:
    """(log q(tokens), single_step_kl(q, clean)) per position, unmasked, for safe `tokens` and a cleaned teacher.
    Without padding and with a top-k teacher the log-probs go through learner/vocab_picks.py: the same numbers at
    one [..., V] tensor of memory (`consume_logits`: the caller never reads `logits` again)."""
    if isinstance(clean, TopKLogprobs) and logits.dtype != torch.float64 and bool((mask > 0).all()):
        head, tail, logq_y = topk_picks(logits, clean.ids, tokens, consume=consume_logits)
        logq_tail = tail.clamp_min(LOGP_FLOOR)  # as single_step_kl
        return logq_y, _kl_terms(head, clean.logprobs) + logq_tail.exp() * (logq_tail - clean.tail)
    logq = _masked_log_softmax(logits, mask)
    return _token_logprob(logq, tokens), single_step_kl(logq, clean)


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


def importance_ratio(logq_y: Tensor, logp_y: Tensor, old: Tensor, alpha: float, real: Tensor) -> Tensor:
    """rho_t = q_theta(y_t) / p~(y_t), p~ = alpha p + (1 - alpha) q_old; exactly 1 at padding (real False)."""
    log_rho = logq_y - mixture_logprob(logp_y, old, alpha)
    return torch.exp(torch.where(real, log_rho, torch.zeros_like(log_rho)))


def ppo_clipped_loss(advantage: Tensor, rho: Tensor, clip_eps: float | None) -> Tensor:
    """PPO's pessimistic bound max(-A rho, -A clip(rho, 1 - eps, 1 + eps)): the ratio cannot profit from leaving
    [1 - eps, 1 + eps]; clip_eps None (or <= 0) gives -A rho."""
    unclipped = -advantage * rho
    if clip_eps is None or clip_eps <= 0:
        return unclipped
    return torch.maximum(unclipped, -advantage * rho.clamp(1.0 - clip_eps, 1.0 + clip_eps))


class MiniLLMTerms(NamedTuple):
    """Per-token terms, each shaped like `mask` and exactly 0 where it is 0."""

    single: Tensor  # w_t * KL[q_theta || p] (with grad through q_theta)
    long: Tensor  # PPO-clipped -R_{t+1} rho_t (with grad through rho_t)
    kl: Tensor  # the single-step KL itself, detached (a metric: the reverse KL per token)
    rho: Tensor  # q_theta(y_t) / p~(y_t), detached
    logq: Tensor  # log q_theta(y_t), detached


def minillm_token_losses(
    student_logits: Tensor,
    teacher: Teacher,
    tokens: Tensor,
    mask: Tensor,
    old_logprobs: Tensor,
    alpha: float,
    clip_eps: float | None,
    length_norm: bool = True,
    *,
    teacher_token_logprobs: Tensor | None = None,
    future_reward: Tensor | None = None,
    consume_logits: bool = False,
) -> MiniLLMTerms:
    """MiniLLM's per-token (single, long) terms, with the KL and rho they used.

    student_logits [..., V] (with grad); teacher: log-softmaxed dense [..., V] or TopKLogprobs; tokens [...] the
    sampled responses; old_logprobs [...] the student's log-prob of each token when it was sampled;
    teacher_token_logprobs [...] the teacher's exact log p(y_t) (required for top-k; gathered from dense when None).

    r_t = log p(y_t) - log q_old(y_t) (no gradient); R_{t+1} = sequence_future_reward(r) over the last dim, or
    `future_reward` when given (the learner computes it per sequence, then evaluates the rest in chunks of tokens);
    rho_t = q_theta(y_t) / p~(y_t) with p~ = alpha p + (1 - alpha) q_old; w_t = rho_t detached;
    single_t = w_t * single_step_kl(q_theta, p); long_t = max(-R_{t+1} rho_t, -R_{t+1} clip(rho_t, 1 - eps, 1 + eps));
    clip_eps None (or <= 0) disables the clipping.
    `consume_logits`: the caller never reads `student_logits` again (see token_logprob_and_kl).
    """
    mask = mask.to(student_logits.dtype)
    real = mask > 0
    tokens = _safe_tokens(tokens, mask)
    clean = _clean_teacher(teacher, mask, _logprob_dtype(student_logits))
    logq_y, kl_full = token_logprob_and_kl(student_logits, clean, tokens, mask, consume_logits)
    if teacher_token_logprobs is None:
        if isinstance(clean, TopKLogprobs):
            raise ValueError("top-k teacher log-probs need teacher_token_logprobs (the exact log p of each token)")
        logp_y = _token_logprob(clean, tokens)
    else:
        logp_y = _floor(torch.where(real, teacher_token_logprobs.to(logq_y.dtype), torch.zeros_like(mask))).detach()
    old = torch.where(real, old_logprobs.to(logq_y.dtype), torch.zeros_like(mask)).detach()

    if future_reward is None:
        reward = torch.where(real, logp_y - old, torch.zeros_like(old))
        future_reward = sequence_future_reward(reward, mask, length_norm)
    future = torch.where(real, future_reward.to(logq_y.dtype), torch.zeros_like(mask)).detach()

    rho = importance_ratio(logq_y, logp_y, old, alpha, real)
    kl = kl_full * mask
    single = rho.detach() * kl
    long = ppo_clipped_loss(future, rho, clip_eps)
    return MiniLLMTerms(single, long * mask, kl.detach(), rho.detach() * mask, (logq_y * mask).detach())


def token_nll(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """-log q(target) per position, [...]; 0 on padding. logits[..., t, :] predict targets[..., t]; log-probs
    are accepted too (log_softmax is idempotent)."""
    mask = mask.to(logits.dtype)
    logq = _masked_log_softmax(logits, mask)
    return -_token_logprob(logq, _safe_tokens(targets, mask)) * mask


def word_kd_token_losses(student_logits: Tensor, teacher_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Forward KL[p || q_theta] per position, [...]; 0 on padding. Tokens the teacher gives probability 0 (-inf,
    or underflow) contribute 0, the limit of p log p."""
    mask = mask.to(student_logits.dtype)
    logq = _masked_log_softmax(student_logits, mask)
    keep = mask.unsqueeze(-1) > 0
    raw = torch.where(keep, teacher_logprobs.to(logq.dtype), torch.zeros_like(logq)).detach()
    p = raw.exp()
    term = torch.where(p > 0, p * (raw.clamp_min(LOGP_FLOOR) - logq), torch.zeros_like(logq))
    return term.sum(-1) * mask


def reverse_kl_per_token(student_logits: Tensor, teacher: Teacher, mask: Tensor) -> Tensor:
    """KL[q || p] per position, [...]; 0 on padding (exact for a dense teacher, coarsened for top-k)."""
    mask = mask.to(student_logits.dtype)
    logq = _masked_log_softmax(student_logits, mask)
    return single_step_kl(logq, _clean_teacher(teacher, mask, logq.dtype)) * mask


def token_weights(
    mask: Tensor, mode: str = "token", total_tokens: float | None = None, total_sequences: float | None = None
) -> Tensor:
    """The weight of each token's loss in a reduction, [B, T] (0 on padding); the loss is sum(weights * per_token).

    "token" (the default; Algorithm 1 and the reference code): 1 / (number of real tokens in the mini-batch).
    "seq": 1 / (T_i * number of sequences with any token): each response's mean, averaged over responses, so every
    response counts equally whatever its length.
    `total_tokens` / `total_sequences` are the mini-batch's totals when `mask` is only part of it (one worker's
    slice, one micro-batch): with them the parts' weighted sums add up to the whole mini-batch's loss exactly.
    """
    mask = mask.to(torch.float64 if mask.dtype == torch.float64 else torch.float32)
    if mode == "token":
        n = mask.sum() if total_tokens is None else torch.tensor(float(total_tokens), dtype=mask.dtype)
        return mask / n.clamp_min(1.0)
    if mode != "seq":
        raise ValueError(f"unknown reduction {mode!r} (use 'token' or 'seq')")
    counts = mask.sum(-1, keepdim=True)
    seqs = (counts > 0).sum() if total_sequences is None else torch.tensor(float(total_sequences))
    return mask / counts.clamp_min(1.0) / seqs.to(mask.dtype).clamp_min(1.0)


def reduce_losses(per_token: Tensor, mask: Tensor, mode: str = "token") -> Tensor:
    """Per-token losses [B, T] -> scalar, weighted by `token_weights` (see there for the modes).
    An all-masked batch gives 0, still differentiable when per_token requires grad, never NaN."""
    weights = token_weights(mask, mode).to(per_token.dtype)
    # where, not multiply: a NaN/inf on padding must not leak (0 * inf = NaN)
    per_token = torch.where(mask > 0, per_token, torch.zeros_like(per_token))
    return (per_token * weights).sum()
