"""MiniLLM as the paper's released code (microsoft/LMOps, minillm/) computes it: `objective.variant: lmops`.

Pure torch, no Ray. Each convention below is where the released code differs from the paper's formulas (which
`learner.objectives.minillm_token_losses` implements); docs/objectives.md says which one the formulas support.

1. Rewards (minillm/sampler.py): r_t = (log p(y_t) - log q_old(y_t)) / reward_scaling, reward_scaling = 0.5 in the
   scripts (so x2), then clipped to [-100, 100] (cliprange_reward).
2. Returns (losses.py, _get_advantages_and_returns): R_t = sum_{t' >= t} gamma^(t'-t) r_t', the CURRENT token's
   reward included (the paper: R_{t+1}, later tokens only), gamma = 0.95 by default (the paper: undiscounted),
   divided by the UNdiscounted count of real tokens from t to the end (length_norm).
3. Whitening (utils.whiten): the advantages are shifted and scaled by the mean and variance of every entry of the
   micro-batch's [B, T] tensor, padding zeros included, over all data-parallel ranks (biased variance, + 1e-8).
4. The PPO term (_pg_loss): ratio = q_theta / q_old * w with w = q_old / p~ (the teacher-mixed importance weight),
   clipped to [1 - eps, 1 + eps] as one number, loss max(-A ratio, -A clip(ratio)).
5. The single-step term (_reg_loss): the plain reverse KL[q_theta || p] per token, NOT weighted by the importance
   weight (the paper weights it by w_t).
6. Reduction: each loss is its micro-batch's token mean on its rank; gradient accumulation and data parallelism then
   average those means (a mean of micro-batch means, not a mean over the mini-batch's tokens).
7. L_PT (pt_loss): (1 - kd_ratio) NLL + kd_ratio * (-sum_v p_v log q_v) on the pre-training text, kd_ratio = 0.5 in
   the scripts (objective.pt_kd_ratio here; the teacher cross-entropy has the forward KL's gradient).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from learner.objectives import (
    Teacher,
    _clean_teacher,
    _floor,
    _logprob_dtype,
    _safe_tokens,
    _token_logprob,
    importance_ratio,
    ppo_clipped_loss,
    token_logprob_and_kl,
)

REWARD_SCALING = 0.5  # the scripts' --reward-scaling: rewards are divided by it
REWARD_CLIP = 100.0  # the scripts' --cliprange-reward
WHITEN_EPS = 1e-8
DEFAULT_DISCOUNT = 0.95  # arguments.py's --gamma default (the scripts do not set it)


def lmops_rewards(teacher_token_logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """clip((log p(y_t) - log q_old(y_t)) / REWARD_SCALING, +-REWARD_CLIP), 0 on padding."""
    real = mask > 0
    r = torch.where(real, teacher_token_logprobs - old_logprobs, torch.zeros_like(old_logprobs))
    return (r / REWARD_SCALING).clamp(-REWARD_CLIP, REWARD_CLIP) * mask


def lmops_returns(rewards: Tensor, mask: Tensor, discount: float) -> Tensor:
    """R_t / n_t over the last dim: R_t = sum_{t' >= t} discount^(t' - t) r_t' (t' over every position, rewards 0 on
    padding), n_t = the number of real tokens at positions >= t (1 where there is none). Padding keeps whatever
    this gives (0 after a right-padded response), as the released code does: it enters the whitening statistics."""
    mask = mask.to(rewards.dtype)
    r = torch.where(mask > 0, rewards, torch.zeros_like(rewards))
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[..., 0])
    for t in range(r.shape[-1] - 1, -1, -1):
        running = r[..., t] + discount * running
        out[..., t] = running
    count = mask.flip(-1).cumsum(-1).flip(-1)
    return out / torch.where(count > 0, count, torch.ones_like(count))


def whiten(x: Tensor, mean: Tensor | float, var: Tensor | float) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8), the released code's utils.whiten with shift_mean."""
    return (x - mean) * torch.rsqrt(torch.as_tensor(var, dtype=x.dtype) + WHITEN_EPS)


def whiten_local(x: Tensor) -> Tensor:
    """Whitening by the statistics of every entry of x (one rank's view of get_global_statistics: biased variance)."""
    mean = x.mean()
    var = ((x - mean) ** 2).mean()
    return whiten(x, mean, var)


class LmopsTerms(NamedTuple):
    """Per-token terms, each shaped like `mask` and exactly 0 where it is 0."""

    pg: Tensor  # max(-A ratio, -A clip(ratio)) (with grad through ratio)
    reg: Tensor  # KL[q_theta || p] per token, unweighted (with grad)
    kl: Tensor  # the same KL, detached (a metric)
    rho: Tensor  # ratio = q_theta(y_t) / p~(y_t), detached
    logq: Tensor  # log q_theta(y_t), detached


def lmops_minillm_token_losses(
    student_logits: Tensor,
    teacher: Teacher,
    tokens: Tensor,
    mask: Tensor,
    old_logprobs: Tensor,
    alpha: float,
    clip_eps: float | None,
    advantages: Tensor,
    *,
    teacher_token_logprobs: Tensor | None = None,
    consume_logits: bool = False,
) -> LmopsTerms:
    """The released code's per-token PPO and single-step terms given its whitened advantages (see the module
    docstring: lmops_rewards -> lmops_returns -> whiten). ratio = q_theta(y_t) / p~(y_t) with p~ = alpha p +
    (1 - alpha) q_old, which is its exp(log q_theta - log q_old) * w. Reduce each with micro_batch_mean_weights."""
    mask = mask.to(student_logits.dtype)
    real = mask > 0
    clean = _clean_teacher(teacher, mask, _logprob_dtype(student_logits))
    safe = _safe_tokens(tokens, mask)
    logq_y, kl_full = token_logprob_and_kl(student_logits, clean, safe, mask, consume_logits)
    if teacher_token_logprobs is None:
        if not isinstance(clean, Tensor):
            raise ValueError("top-k teacher log-probs need teacher_token_logprobs (the exact log p of each token)")
        logp_y = _token_logprob(clean, safe)
    else:
        logp_y = _floor(torch.where(real, teacher_token_logprobs.to(logq_y.dtype), torch.zeros_like(mask))).detach()
    old = torch.where(real, old_logprobs.to(logq_y.dtype), torch.zeros_like(mask)).detach()
    adv = torch.where(real, advantages.to(logq_y.dtype), torch.zeros_like(mask)).detach()
    rho = importance_ratio(logq_y, logp_y, old, alpha, real)
    pg = ppo_clipped_loss(adv, rho, clip_eps)
    kl = kl_full * mask
    return LmopsTerms(pg * mask, kl, kl.detach(), rho.detach() * mask, (logq_y * mask).detach())


def micro_batch_mean_weights(mask: Tensor, parts: int) -> Tensor:
    """Per-token weights of the released reduction: this micro-batch's token mean (mask / its token count), divided
    by `parts` = micro-batches per update x data-parallel ranks, whose means are averaged."""
    mask = mask.to(torch.float64 if mask.dtype == torch.float64 else torch.float32)
    return mask / mask.sum().clamp_min(1.0) / max(parts, 1)
