"""The MiniLLM objectives against brute force, on CPU (float64)."""

import itertools
import math

import pytest
import torch

from learner.objectives import (
    minillm_token_losses,
    reduce_losses,
    reverse_kl_per_token,
    sequence_future_reward,
    token_nll,
    word_kd_token_losses,
)

torch.set_default_dtype(torch.float64)


def _random_case(b=3, t=5, v=7, seed=0, lengths=(5, 3, 1)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g) * 2
    teacher = torch.log_softmax(torch.randn(b, t, v, generator=g) * 2, -1)
    tokens = torch.randint(0, v, (b, t), generator=g)
    mask = torch.zeros(b, t)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    # old log-probs near the current ones so some rho fall inside and some outside the clip range
    cur = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    old = cur + torch.randn(b, t, generator=g) * 0.4
    return logits, teacher, tokens, mask, old


def _brute_force(logits, teacher, tokens, mask, old, alpha, eps, length_norm):
    """Explicit loops over b, t, v: an independent implementation of DESIGN.md's formulas."""
    b_, t_, v_ = logits.shape
    single = [[None] * t_ for _ in range(b_)]
    long = [[None] * t_ for _ in range(b_)]
    for b in range(b_):
        real = [t for t in range(t_) if mask[b, t] > 0]
        r = {t: teacher[b, t, tokens[b, t]].item() - old[b, t].item() for t in real}
        for t in range(t_):
            if mask[b, t] == 0:
                single[b][t] = logits[b, t, 0] * 0
                long[b][t] = logits[b, t, 0] * 0
                continue
            later = [r[u] for u in real if u > t]
            big_r = (sum(later) / len(later) if length_norm else sum(later)) if later else 0.0
            z = torch.logsumexp(logits[b, t], 0)
            q = [torch.exp(logits[b, t, v] - z) for v in range(v_)]
            kl = sum(q[v] * (torch.log(q[v]) - teacher[b, t, v]) for v in range(v_))
            y = tokens[b, t].item()
            p_mix = alpha * math.exp(teacher[b, t, y].item()) + (1 - alpha) * math.exp(old[b, t].item())
            rho = q[y] / p_mix
            single[b][t] = rho.detach() * kl
            clipped = rho if eps is None else torch.clamp(rho, 1 - eps, 1 + eps)
            long[b][t] = torch.maximum(-big_r * rho, -big_r * clipped)
    return torch.stack([torch.stack(row) for row in single]), torch.stack([torch.stack(row) for row in long])


@pytest.mark.parametrize("alpha,eps,length_norm", [(0.2, 0.2, True), (0.0, None, False), (1.0, 0.1, True),
                                                   (0.5, 0.05, False)])
def test_terms_and_gradients_match_brute_force(alpha, eps, length_norm):
    logits, teacher, tokens, mask, old = _random_case()
    a = logits.clone().requires_grad_(True)
    single, long = minillm_token_losses(a, teacher, tokens, mask, old, alpha, eps, length_norm)
    b = logits.clone().requires_grad_(True)
    ref_single, ref_long = _brute_force(b, teacher, tokens, mask, old, alpha, eps, length_norm)
    torch.testing.assert_close(single, ref_single, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(long, ref_long, atol=1e-10, rtol=1e-9)
    weights = torch.randn(*single.shape, generator=torch.Generator().manual_seed(5))
    (ga,) = torch.autograd.grad(((single + long) * weights).sum(), a)
    (gb,) = torch.autograd.grad(((ref_single + ref_long) * weights).sum(), b)
    torch.testing.assert_close(ga, gb, atol=1e-10, rtol=1e-9)


def test_clipping_is_active_in_the_test_case():
    logits, teacher, tokens, mask, old = _random_case()
    single, long_clip = minillm_token_losses(logits, teacher, tokens, mask, old, 0.2, 0.05)
    _, long_free = minillm_token_losses(logits, teacher, tokens, mask, old, 0.2, None)
    assert not torch.allclose(long_clip, long_free)


def test_future_reward_by_hand():
    r = torch.tensor([[1.0, 2.0, 3.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    torch.testing.assert_close(sequence_future_reward(r, mask, True), torch.tensor([[2.5, 3.0, 0.0, 0.0]]))
    torch.testing.assert_close(sequence_future_reward(r, mask, False), torch.tensor([[5.0, 3.0, 0.0, 0.0]]))


def _pad(x, left, right, value=0.0):
    shape = list(x.shape)
    pads = []
    for n in (left, right):
        shape[1] = n
        pads.append(torch.full(shape, value, dtype=x.dtype))
    return torch.cat([pads[0], x, pads[1]], 1)


@pytest.mark.parametrize("left,right", [(0, 3), (2, 0), (2, 2)])
def test_padding_does_not_change_results(left, right):
    logits, teacher, tokens, mask, old = _random_case()
    single, long = minillm_token_losses(logits, teacher, tokens, mask, old, 0.2, 0.2)
    # garbage on padding must not leak: NaN logits, -inf teacher entries
    p_single, p_long = minillm_token_losses(
        _pad(logits, left, right, float("nan")), _pad(teacher, left, right, float("-inf")),
        _pad(tokens, left, right, 0), _pad(mask, left, right), _pad(old, left, right, float("nan")), 0.2, 0.2)
    t = logits.shape[1]
    torch.testing.assert_close(p_single[:, left : left + t], single)
    torch.testing.assert_close(p_long[:, left : left + t], long)
    assert torch.isfinite(p_single).all() and torch.isfinite(p_long).all()
    full = reduce_losses(single + long, mask)
    torch.testing.assert_close(reduce_losses(p_single + p_long, _pad(mask, left, right)), full)


def test_batch_composition_does_not_change_a_sequence():
    logits, teacher, tokens, mask, old = _random_case()
    single, long = minillm_token_losses(logits, teacher, tokens, mask, old, 0.2, 0.2)
    for i in range(logits.shape[0]):
        s1, l1 = minillm_token_losses(logits[i : i + 1], teacher[i : i + 1], tokens[i : i + 1], mask[i : i + 1],
                                      old[i : i + 1], 0.2, 0.2)
        torch.testing.assert_close(s1[0], single[i])
        torch.testing.assert_close(l1[0], long[i])


def test_all_masked_gives_zero_not_nan():
    logits, teacher, tokens, _, old = _random_case()
    mask = torch.zeros(tokens.shape)
    x = logits.clone().requires_grad_(True)
    single, long = minillm_token_losses(x, teacher, tokens, mask, old, 0.2, 0.2)
    assert single.abs().sum() == 0 and long.abs().sum() == 0
    for mode in ("seq", "token"):
        loss = reduce_losses(single + long, mask, mode)
        assert loss.item() == 0.0
        (g,) = torch.autograd.grad(loss, x, retain_graph=True)
        assert torch.isfinite(g).all() and g.abs().sum() == 0


def test_reductions_by_hand():
    per_token = torch.tensor([[1.0, 3.0, 100.0], [4.0, 0.0, 0.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert reduce_losses(per_token, mask, "seq").item() == pytest.approx((2.0 + 4.0) / 2)
    assert reduce_losses(per_token, mask, "token").item() == pytest.approx(8.0 / 3)
    with pytest.raises(ValueError, match="reduction"):
        reduce_losses(per_token, mask, "mean")


def test_nll_word_kd_and_reverse_kl_against_brute_force():
    logits, teacher, tokens, mask, _ = _random_case()
    teacher = teacher.clone()
    teacher[0, 0, 3] = float("-inf")  # a zero-probability teacher token: forward KL term 0, not NaN
    teacher[0, 0] = torch.log_softmax(teacher[0, 0], -1)
    logq = torch.log_softmax(logits, -1)
    nll = token_nll(logits, tokens, mask)
    kd = word_kd_token_losses(logits, teacher, mask)
    rkl = reverse_kl_per_token(logits, torch.log_softmax(torch.randn_like(logits), -1), mask)
    assert torch.isfinite(kd).all() and torch.isfinite(rkl).all()
    for b, t in itertools.product(range(logits.shape[0]), range(logits.shape[1])):
        if mask[b, t] == 0:
            assert nll[b, t] == 0 and kd[b, t] == 0
            continue
        assert nll[b, t].item() == pytest.approx(-logq[b, t, tokens[b, t]].item())
        p = teacher[b, t].exp()
        ref = sum(p[v] * (teacher[b, t, v] - logq[b, t, v]) for v in range(logits.shape[2]) if p[v] > 0)
        assert kd[b, t].item() == pytest.approx(ref.item())


# ---- the key test: on an enumerable toy, E_{y~q}[grad(single + long)] equals grad KL[q || p] exactly ----

V, T = 3, 3


def _prefix_index(prefix: tuple[int, ...]) -> int:
    """Index of a prefix among all prefixes of length 0..T-1 (breadth first)."""
    offset = sum(V**k for k in range(len(prefix)))
    return offset + sum(tok * V ** (len(prefix) - 1 - i) for i, tok in enumerate(prefix))


def test_expected_gradient_equals_exact_reverse_kl_gradient():
    g = torch.Generator().manual_seed(3)
    n_prefixes = sum(V**k for k in range(T))
    theta = (torch.randn(n_prefixes, V, generator=g) * 1.5).requires_grad_(True)  # student logits per prefix
    teacher = torch.log_softmax(torch.randn(n_prefixes, V, generator=g) * 1.5, -1)
    sequences = list(itertools.product(range(V), repeat=T))

    def seq_logprob(logits_table, y):
        lp = torch.log_softmax(logits_table, -1)
        return sum(lp[_prefix_index(y[:t]), y[t]] for t in range(T))

    # exact KL[q || p] over whole sequences, by enumeration
    kl = 0.0
    for y in sequences:
        log_q = seq_logprob(theta, y)
        log_p = sum(teacher[_prefix_index(y[:t]), y[t]] for t in range(T))
        kl = kl + log_q.exp() * (log_q - log_p)
    (exact_grad,) = torch.autograd.grad(kl, theta)

    # E_{y~q}[grad(sum_t single_t + long_t)], alpha = 0, no clipping, no length norm, at theta = theta_old
    rows = torch.tensor([[_prefix_index(y[:t]) for t in range(T)] for y in sequences])
    tokens = torch.tensor(sequences)
    student_logits = theta[rows]  # [N, T, V]
    teacher_lp = teacher[rows]
    mask = torch.ones(len(sequences), T)
    old = torch.log_softmax(student_logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1).detach()
    single, long = minillm_token_losses(student_logits, teacher_lp, tokens, mask, old, alpha=0.0, clip_eps=None,
                                        length_norm=False)
    weight = old.sum(-1).exp()  # q(y) for each enumerated sequence
    surrogate = (weight.unsqueeze(-1) * (single + long)).sum()
    (expected_grad,) = torch.autograd.grad(surrogate, theta)
    assert exact_grad.abs().max() > 1e-3
    torch.testing.assert_close(expected_grad, exact_grad, atol=1e-10, rtol=1e-8)
