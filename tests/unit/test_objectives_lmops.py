"""`objective.variant: lmops` against a line-by-line re-derivation of the released MiniLLM code's formulas
(microsoft/LMOps, minillm/minillm/{sampler,losses,utils}.py), on a fixed batch in float32: values and gradients to
1e-6 relative."""

import pytest
import torch

from learner.objectives import minillm_token_losses, reduce_losses
from learner.objectives_lmops import (
    lmops_minillm_token_losses,
    lmops_returns,
    lmops_rewards,
    micro_batch_mean_weights,
    whiten_local,
)

F32 = torch.float32


def _batch(seed, b=4, t=6, v=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g) * 2
    teacher_logits = torch.randn(b, t, v, generator=g) * 2
    tokens = torch.randint(0, v, (b, t), generator=g)
    lengths = [6, 4, 1, 5][:b]
    mask = torch.zeros(b, t)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    # the sampling student: log-probs near the current ones, so some ratios fall outside the clip range
    cur = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    old = (cur + torch.randn(b, t, generator=g) * 0.3) * mask
    return logits, teacher_logits, tokens, mask, old


def _released(logits, teacher_logits, tokens, mask, old, alpha, cliprange, gamma):
    """One micro-batch's rl_loss as the released code computes it, written step by step from its sources."""
    # --- sampler.py / reward.py: teacher rewards (logits centred, selected logit minus log-sum-exp), masked
    t_logits = teacher_logits - teacher_logits.mean(-1, keepdim=True)
    t_logits = t_logits * mask.unsqueeze(-1)
    selection = t_logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    next_state = torch.logsumexp(t_logits, -1) * mask
    t_rewards = selection - next_state
    logprobs = old  # rollout log-probs of the sampling student, 0 on padding
    t_rollout_logprobs = torch.log_softmax(teacher_logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * mask
    mix_probs = (1 - alpha) * torch.exp(logprobs) + alpha * torch.exp(t_rollout_logprobs)
    w = torch.exp(logprobs - torch.log(mix_probs))
    rewards = t_rewards + (-logprobs)
    rewards = rewards / 0.5  # --reward-scaling 0.5
    rewards = torch.clip(rewards, -100, 100)  # --cliprange-reward 100
    # --- losses.py: _get_advantages_and_returns
    lens = torch.cumsum(mask, dim=-1)
    lens = mask - lens + lens[:, -1:None]
    lens = torch.masked_fill(lens, lens == 0, 1)
    last_rw = 0
    rw_reversed = []
    for t in reversed(range(rewards.shape[1])):
        last_rw = rewards[:, t] + gamma * last_rw
        rw_reversed.append(last_rw)
    rw = torch.stack(rw_reversed[::-1], dim=1) / lens
    # utils.whiten with get_global_statistics (torch.distributed is initialised under deepspeed): biased variance
    mean = rw.sum() / rw.numel()
    var = torch.sum((rw - mean) ** 2) / rw.numel()
    advantages = ((rw - mean) * torch.rsqrt(var + 1e-8)).detach()
    # --- _pg_loss
    new_logprobs = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    new_logprobs = new_logprobs.masked_fill(~mask.bool(), 0)
    n = mask.sum()
    ratio = torch.exp((new_logprobs - logprobs) * mask) * w
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = torch.sum(torch.max(pg1, pg2) * mask) / n
    # --- _reg_loss: cross-entropy minus entropy, token mean, no importance weight
    probs = torch.softmax(logits, -1)
    xent = -torch.sum(probs * torch.log_softmax(teacher_logits, -1), -1) * mask
    s_ent = -torch.sum(probs * torch.log_softmax(logits, -1), -1) * mask
    reg_loss = torch.sum((xent - s_ent) * mask) / mask.sum()
    return pg_loss + reg_loss


def _ours(logits, teacher_logits, tokens, mask, old, alpha, eps, gamma, parts):
    teacher = torch.log_softmax(teacher_logits, -1)
    teacher_y = teacher.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    advantages = whiten_local(lmops_returns(lmops_rewards(teacher_y, old, mask), mask, gamma))
    terms = lmops_minillm_token_losses(
        logits, teacher, tokens, mask, old, alpha, eps, advantages, teacher_token_logprobs=teacher_y
    )
    return (micro_batch_mean_weights(mask, parts) * (terms.pg + terms.reg)).sum()


@pytest.mark.parametrize("alpha,gamma", [(0.2, 0.95), (0.0, 0.95), (0.5, 1.0)])
def test_lmops_equals_the_released_formulas(alpha, gamma):
    """Two micro-batches of one update: the mean of their token means, values and gradients."""
    micro = [_batch(seed) for seed in (0, 1)]
    ours_in = [m[0].clone().requires_grad_(True) for m in micro]
    ref_in = [m[0].clone().requires_grad_(True) for m in micro]
    ours = sum(_ours(x, *m[1:], alpha, 0.2, gamma, len(micro)) for x, m in zip(ours_in, micro, strict=True))
    ref = sum(_released(x, *m[1:], alpha, 0.2, gamma) for x, m in zip(ref_in, micro, strict=True)) / len(micro)
    assert ours.dtype == F32
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6 * ref.abs().item())
    grads = torch.autograd.grad(ours, ours_in)
    ref_grads = torch.autograd.grad(ref, ref_in)
    for g, r in zip(grads, ref_grads, strict=True):
        assert r.abs().max() > 1e-3
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6 * r.abs().max().item())


def test_lmops_clipping_and_weights_are_exercised_and_differ_from_the_paper():
    logits, teacher_logits, tokens, mask, old = _batch(0)
    teacher = torch.log_softmax(teacher_logits, -1)
    teacher_y = teacher.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    adv = whiten_local(lmops_returns(lmops_rewards(teacher_y, old, mask), mask, 0.95))
    terms = lmops_minillm_token_losses(logits, teacher, tokens, mask, old, 0.2, 0.2, adv)
    real = mask > 0
    outside = ((terms.rho - 1).abs() > 0.2) & real
    assert 0 < outside.sum() < real.sum()
    lmops = _ours(logits, teacher_logits, tokens, mask, old, 0.2, 0.2, 0.95, 1)
    paper = minillm_token_losses(logits, teacher, tokens, mask, old, 0.2, 0.2)
    assert not torch.allclose(lmops, reduce_losses(paper.single + paper.long, mask), rtol=1e-3)


def test_lmops_returns_by_hand():
    r = torch.tensor([[1.0, 2.0, 4.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    g = 0.5
    # R_t includes r_t; divided by the undiscounted count of real tokens from t on
    expected = torch.tensor([[(1 + g * 2 + g * g * 4) / 3, (2 + g * 4) / 2, 4 / 1, 0.0]])
    torch.testing.assert_close(lmops_returns(r, mask, g), expected)
    rewards = lmops_rewards(torch.tensor([[-1.0, -300.0, 0.0, 5.0]]), torch.tensor([[-2.0, 0.0, -1.0, 9.0]]), mask)
    torch.testing.assert_close(rewards, torch.tensor([[2.0, -100.0, 2.0, 0.0]]))
