"""GKD's JSD(beta), DistiLLM's skew KLs and the sampled-token reverse KL against brute force and enumeration (CPU,
float64)."""

import itertools
import math

import pytest
import torch

from common.logprobs import topk_logprobs
from learner.objectives import reverse_kl_per_token, word_kd_token_losses
from learner.objectives_onpolicy import (
    discounted_returns,
    divergence_token_losses,
    generalized_jsd,
    paired_logprobs,
    sampled_rkl_token_losses,
)
from tests.unit.test_objectives import _prefix_index, _random_case

DT = torch.float64


def _divergence_by_hand(kind, param, q, p):
    """One position's divergence from probability lists (plain Python floats / 0-d tensors), written from the papers'
    definitions."""
    v = range(len(q))

    def kl(a, b):
        return sum(a[i] * torch.log(a[i] / b[i]) for i in v)

    if kind == "gkd":
        if param == 0:
            return kl(p, q)
        if param == 1:
            return kl(q, p)
        m = [param * p[i] + (1 - param) * q[i] for i in v]
        return param * kl(p, m) + (1 - param) * kl(q, m)
    if kind == "skew_kl":
        return kl(p, [param * p[i] + (1 - param) * q[i] for i in v])
    return kl(q, [param * q[i] + (1 - param) * p[i] for i in v])


def _brute_force(kind, param, logits, teacher, tokens, mask, old, alpha):
    b_, t_, v_ = logits.shape
    out = [[None] * t_ for _ in range(b_)]
    for b in range(b_):
        for t in range(t_):
            if mask[b, t] == 0:
                out[b][t] = logits[b, t, 0] * 0
                continue
            z = torch.logsumexp(logits[b, t], 0)
            q = [torch.exp(logits[b, t, i] - z) for i in range(v_)]
            p = [torch.exp(teacher[b, t, i]) for i in range(v_)]
            y = tokens[b, t].item()
            mix = alpha * p[y].item() + (1 - alpha) * math.exp(old[b, t].item())
            w = q[y].detach() / mix
            out[b][t] = w * _divergence_by_hand(kind, param, q, p)
    return torch.stack([torch.stack(row) for row in out])


CASES = [("gkd", 0.0), ("gkd", 0.5), ("gkd", 0.9), ("gkd", 1.0), ("skew_kl", 0.1), ("skew_kl", 0.0), ("skew_rkl", 0.1)]


@pytest.mark.parametrize("kind,param", CASES)
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_divergences_and_gradients_match_brute_force(kind, param, alpha):
    logits, teacher, tokens, mask, old = _random_case(seed=2)
    logits[mask == 0] = float("nan")  # garbage on padding must not leak
    exact_y = teacher.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    a = logits.clone().requires_grad_(True)
    terms = divergence_token_losses(
        kind, param, a, teacher, mask, tokens=tokens, old_logprobs=old, teacher_token_logprobs=exact_y, alpha=alpha
    )
    b = torch.nan_to_num(logits).requires_grad_(True)
    ref = _brute_force(kind, param, b, teacher, tokens, mask, old, alpha)
    torch.testing.assert_close(terms.loss, ref, atol=1e-10, rtol=1e-9)
    assert (terms.rho[mask > 0] - 1).abs().max() > 1e-2  # the weights are not all 1: rho != 1 is exercised
    weights = torch.randn(*mask.shape, generator=torch.Generator().manual_seed(1), dtype=DT)
    (g,) = torch.autograd.grad((terms.loss * weights).sum(), a)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), b)
    assert torch.isfinite(g).all() and (g[mask == 0] == 0).all()
    torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=1e-8)


def test_data_responses_weigh_one():
    logits, teacher, tokens, mask, old = _random_case(seed=4)
    terms = divergence_token_losses("gkd", 0.5, logits, teacher, mask)
    torch.testing.assert_close(terms.rho, mask)
    torch.testing.assert_close(terms.loss, terms.divergence)


def test_jsd_end_points_are_forward_and_reverse_kl_exactly():
    logits, teacher, tokens, mask, old = _random_case(seed=5)
    forward = word_kd_token_losses(logits, teacher, mask)
    reverse = reverse_kl_per_token(logits, teacher, mask)
    assert torch.equal(divergence_token_losses("gkd", 0.0, logits, teacher, mask).loss, forward)
    assert torch.equal(divergence_token_losses("gkd", 1.0, logits, teacher, mask).loss, reverse)
    # skew divergences at a = 0 are the plain KLs
    torch.testing.assert_close(divergence_token_losses("skew_kl", 0.0, logits, teacher, mask).loss, forward)
    torch.testing.assert_close(divergence_token_losses("skew_rkl", 0.0, logits, teacher, mask).loss, reverse)
    # and at a = 1 the mixture is the first argument itself: 0
    assert divergence_token_losses("skew_kl", 1.0, logits, teacher, mask).loss.abs().max() < 1e-12
    # TRL's end points are conventions: the formula itself tends to 0 there
    assert divergence_token_losses("gkd", 1e-9, logits, teacher, mask).loss.abs().max() < 1e-6


def test_jsd_half_is_symmetric():
    logq = torch.log_softmax(torch.randn(6, 11, dtype=DT), -1)
    logp = torch.log_softmax(torch.randn(6, 11, dtype=DT), -1)
    torch.testing.assert_close(generalized_jsd(logq, logp, 0.5), generalized_jsd(logp, logq, 0.5))
    assert (generalized_jsd(logq, logp, 0.5) <= math.log(2) + 1e-12).all()
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(logq, logp, 1.5)


@pytest.mark.parametrize("kind,param", [("gkd", 0.5), ("gkd", 0.0), ("skew_kl", 0.1), ("skew_rkl", 0.1)])
def test_topk_is_the_coarsened_divergence_a_lower_bound_and_exact_at_full_vocabulary(kind, param):
    logits, teacher, tokens, mask, old = _random_case(v=9, seed=6)
    full = divergence_token_losses(kind, param, logits, teacher, mask).loss
    coarse = divergence_token_losses(kind, param, logits, topk_logprobs(teacher, 3), mask).loss
    assert (coarse <= full + 1e-12).all() and (full - coarse)[mask > 0].max() > 1e-4
    everything = divergence_token_losses(kind, param, logits, topk_logprobs(teacher, 9), mask).loss
    torch.testing.assert_close(everything, full, atol=1e-10, rtol=1e-8)
    # the coarsened pair is a distribution over k + 1 outcomes on both sides
    q, p = paired_logprobs(torch.log_softmax(logits, -1), topk_logprobs(teacher, 3))
    torch.testing.assert_close(q.exp().sum(-1), torch.ones_like(mask))
    torch.testing.assert_close(p.exp().sum(-1), torch.ones_like(mask))


# ---- sampled_rkl ----


def test_discounted_returns_by_hand():
    r = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]], dtype=DT)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=DT)
    g = 0.5
    expected = torch.tensor([[1 + g * 2 + g * g * 3, 2 + g * 3, 3, 0], [4, 0, 0, 0]], dtype=DT)
    torch.testing.assert_close(discounted_returns(r, mask, g), expected)
    torch.testing.assert_close(discounted_returns(r, mask, 0.0), r * mask)


def _sampled_by_hand(logits, tokens, mask, old, teacher_y, alpha, eps, gamma):
    b_, t_, _ = logits.shape
    out = [[None] * t_ for _ in range(b_)]
    for b in range(b_):
        real = [t for t in range(t_) if mask[b, t] > 0]
        r = {t: teacher_y[b, t].item() - old[b, t].item() for t in real}
        for t in range(t_):
            if mask[b, t] == 0:
                out[b][t] = logits[b, t, 0] * 0
                continue
            adv = sum(gamma ** (u - t) * r[u] for u in real if u >= t)
            logq_y = logits[b, t, tokens[b, t]] - torch.logsumexp(logits[b, t], 0)
            mix = alpha * math.exp(teacher_y[b, t].item()) + (1 - alpha) * math.exp(old[b, t].item())
            rho = torch.exp(logq_y) / mix
            clipped = rho if eps is None else torch.clamp(rho, 1 - eps, 1 + eps)
            out[b][t] = torch.maximum(-adv * rho, -adv * clipped)
    return torch.stack([torch.stack(row) for row in out])


@pytest.mark.parametrize("alpha,eps,gamma", [(0.0, 0.2, 1.0), (0.2, 0.2, 0.0), (0.5, None, 0.9), (1.0, 0.1, 0.5)])
def test_sampled_rkl_matches_brute_force(alpha, eps, gamma):
    logits, teacher, tokens, mask, old = _random_case(seed=7)
    teacher_y = teacher.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    teacher_y[mask == 0] = float("-inf")
    a = logits.clone().requires_grad_(True)
    terms = sampled_rkl_token_losses(a, tokens, mask, old, teacher_y, alpha, eps, gamma)
    b = logits.clone().requires_grad_(True)
    ref = _sampled_by_hand(b, tokens, mask, old, teacher_y, alpha, eps, gamma)
    torch.testing.assert_close(terms.loss, ref, atol=1e-10, rtol=1e-9)
    assert (terms.rho[mask > 0] - 1).abs().max() > 1e-2
    (g,) = torch.autograd.grad(terms.loss.sum(), a)
    (g_ref,) = torch.autograd.grad(ref.sum(), b)
    torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(terms.reward, torch.where(mask > 0, teacher_y - old, torch.zeros_like(old)))


@pytest.mark.parametrize("v,t,seed", [(3, 3, 3), (4, 3, 1), (5, 2, 2)])
def test_sampled_rkl_expected_gradient_is_the_sequence_reverse_kl_gradient(v, t, seed):
    """Over every sequence of a tiny autoregressive model: E_{y~q}[grad sum_t loss_t] (discount 1, alpha 0, no clip,
    theta = theta_old) equals grad KL[q || p] of the sequence distributions, with no vocabulary-wide term at all."""
    g = torch.Generator().manual_seed(seed)
    n_prefixes = sum(v**k for k in range(t))
    theta = (torch.randn(n_prefixes, v, generator=g, dtype=DT) * 1.5).requires_grad_(True)
    teacher = torch.log_softmax(torch.randn(n_prefixes, v, generator=g, dtype=DT) * 1.5, -1)
    sequences = list(itertools.product(range(v), repeat=t))
    rows = torch.tensor([[_prefix_index(y[:i], v) for i in range(t)] for y in sequences])
    tokens = torch.tensor(sequences)
    seq_logq = torch.log_softmax(theta, -1)[rows].gather(-1, tokens.unsqueeze(-1)).squeeze(-1).sum(-1)
    seq_logp = teacher[rows].gather(-1, tokens.unsqueeze(-1)).squeeze(-1).sum(-1)
    (exact,) = torch.autograd.grad((seq_logq.exp() * (seq_logq - seq_logp)).sum(), theta)

    logits = theta[rows]
    mask = torch.ones(len(sequences), t, dtype=DT)
    old = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1).detach()
    teacher_y = teacher[rows].gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    q_y = old.sum(-1).exp()

    def expected_grad(discount):
        terms = sampled_rkl_token_losses(logits, tokens, mask, old, teacher_y, 0.0, None, discount)
        return torch.autograd.grad((q_y.unsqueeze(-1) * terms.loss).sum(), theta, retain_graph=True)[0]

    assert exact.abs().max() > 1e-2
    torch.testing.assert_close(expected_grad(1.0), exact, atol=1e-10, rtol=1e-8)
    # the test can fail: a discount < 1 (Thinking Machines use 0) is a biased gradient of the reverse KL
    assert (expected_grad(0.0) - exact).abs().max() > 1e-3


def test_data_rows_of_a_mixed_batch_weigh_one():
    """GKD with on_policy_fraction < 1: the data set's responses share a batch with sampled ones; only the sampled
    tokens carry the importance weight."""
    logits, teacher, tokens, mask, old = _random_case(seed=8)
    exact_y = teacher.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    sampled = torch.tensor([True, False, True, False]).unsqueeze(-1).expand_as(mask)
    kw = dict(tokens=tokens, old_logprobs=old, teacher_token_logprobs=exact_y, alpha=0.2)
    mixed = divergence_token_losses("gkd", 0.5, logits, teacher, mask, sampled=sampled, **kw)
    all_sampled = divergence_token_losses("gkd", 0.5, logits, teacher, mask, **kw)
    torch.testing.assert_close(mixed.loss[sampled], all_sampled.loss[sampled])
    torch.testing.assert_close(mixed.loss[~sampled], all_sampled.divergence[~sampled])
    torch.testing.assert_close(mixed.rho[~sampled], mask[~sampled])
