"""The MiniLLM objectives against brute force and an exactly enumerable toy, on CPU (float64)."""

import itertools
import math

import pytest
import torch

from common.logprobs import topk_logprobs, vocab_log_softmax
from learner.objectives import (
    minillm_token_losses,
    reduce_losses,
    reverse_kl_per_token,
    sequence_future_reward,
    token_nll,
    token_weights,
    word_kd_token_losses,
)

DT = torch.float64


def _random_case(b=4, t=5, v=7, seed=0, spans=((0, 5), (0, 3), (0, 1), (2, 5))):
    """Random logits/teacher/tokens; row i is real on positions spans[i] (right and left padding)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g, dtype=DT) * 2
    teacher = torch.log_softmax(torch.randn(b, t, v, generator=g, dtype=DT) * 2, -1)
    tokens = torch.randint(0, v, (b, t), generator=g)
    mask = torch.zeros(b, t, dtype=DT)
    for i, (lo, hi) in enumerate(spans):
        mask[i, lo:hi] = 1
    # old log-probs near the current ones so some rho fall inside and some outside the clip range
    cur = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    old = cur + torch.randn(b, t, generator=g, dtype=DT) * 0.4
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


@pytest.mark.parametrize(
    "alpha,eps,length_norm",
    [(0.2, 0.2, True), (0.0, None, False), (1.0, 0.1, True), (0.5, 0.05, False), (0.0, 0.2, True)],
)
def test_terms_and_gradients_match_brute_force(alpha, eps, length_norm):
    logits, teacher, tokens, mask, old = _random_case()
    a = logits.clone().requires_grad_(True)
    single, long, *_ = minillm_token_losses(a, teacher, tokens, mask, old, alpha, eps, length_norm)
    b = logits.clone().requires_grad_(True)
    ref_single, ref_long = _brute_force(b, teacher, tokens, mask, old, alpha, eps, length_norm)
    torch.testing.assert_close(single, ref_single, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(long, ref_long, atol=1e-10, rtol=1e-9)
    weights = torch.randn(*single.shape, generator=torch.Generator().manual_seed(5), dtype=DT)

    def grad(out, wrt):
        return torch.autograd.grad((out * weights).sum(), wrt, retain_graph=True)[0]

    ga_s, ga_l, gb_s, gb_l = grad(single, a), grad(long, a), grad(ref_single, b), grad(ref_long, b)
    torch.testing.assert_close(ga_s, gb_s, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(ga_l, gb_l, atol=1e-10, rtol=1e-9)
    assert ga_l.abs().max() > 1e-3  # the long-term gradient is not trivially zero


@pytest.mark.parametrize("alpha,eps", [(0.2, 0.2), (0.5, 0.05)])
def test_clipping_is_active_for_some_tokens_and_not_others(alpha, eps):
    """The brute-force cases above exercise both branches of the clipped max."""
    logits, teacher, tokens, mask, old = _random_case()
    _, long_clip, *_ = minillm_token_losses(logits, teacher, tokens, mask, old, alpha, eps)
    _, long_free, *_ = minillm_token_losses(logits, teacher, tokens, mask, old, alpha, None)
    differs = (long_clip - long_free).abs() > 1e-12
    assert 0 < differs[mask > 0].sum() < (mask > 0).sum() - 1


def test_future_reward_by_hand():
    r = torch.tensor([[1.0, 2.0, 3.0, 9.0], [9.0, 1.0, 2.0, 4.0]], dtype=DT)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]], dtype=DT)  # right and left padding
    torch.testing.assert_close(
        sequence_future_reward(r, mask, True), torch.tensor([[2.5, 3.0, 0.0, 0.0], [0.0, 3.0, 4.0, 0.0]], dtype=DT)
    )
    torch.testing.assert_close(
        sequence_future_reward(r, mask, False), torch.tensor([[5.0, 3.0, 0.0, 0.0], [0.0, 6.0, 4.0, 0.0]], dtype=DT)
    )
    # a general (non-contiguous) mask: only real later tokens count
    r2, m2 = torch.tensor([[1.0, 5.0, 2.0, 4.0]], dtype=DT), torch.tensor([[1.0, 0.0, 1.0, 1.0]], dtype=DT)
    expected = torch.tensor([[3.0, 0.0, 4.0, 0.0]], dtype=DT)
    torch.testing.assert_close(sequence_future_reward(r2, m2, True), expected)


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
    x = logits.clone().requires_grad_(True)
    single, long, *_ = minillm_token_losses(x, teacher, tokens, mask, old, 0.2, 0.2)
    # garbage on padding must not leak: NaN logits, -inf teacher entries, out-of-range token ids
    xp = _pad(logits, left, right, float("nan")).requires_grad_(True)
    p_single, p_long, *_ = minillm_token_losses(
        xp,
        _pad(teacher, left, right, float("-inf")),
        _pad(tokens, left, right, -100),
        _pad(mask, left, right),
        _pad(old, left, right, float("nan")),
        0.2,
        0.2,
    )
    t = logits.shape[1]
    torch.testing.assert_close(p_single[:, left : left + t], single)
    torch.testing.assert_close(p_long[:, left : left + t], long)
    assert torch.isfinite(p_single).all() and torch.isfinite(p_long).all()
    full = reduce_losses(single + long, mask)
    padded = reduce_losses(p_single + p_long, _pad(mask, left, right))
    torch.testing.assert_close(padded, full)
    (g,) = torch.autograd.grad(full, x)
    (gp,) = torch.autograd.grad(padded, xp)
    assert torch.isfinite(gp).all()
    torch.testing.assert_close(gp[:, left : left + t], g)
    assert gp[:, :left].abs().sum() == 0 and gp[:, left + t :].abs().sum() == 0


def test_batch_composition_does_not_change_a_sequence():
    logits, teacher, tokens, mask, old = _random_case()
    single, long, *_ = minillm_token_losses(logits, teacher, tokens, mask, old, 0.2, 0.2)
    for i in range(logits.shape[0]):
        sl = slice(i, i + 1)
        s1, l1, *_ = minillm_token_losses(logits[sl], teacher[sl], tokens[sl], mask[sl], old[sl], 0.2, 0.2)
        torch.testing.assert_close(s1[0], single[i])
        torch.testing.assert_close(l1[0], long[i])
    # in a batch with other sequences: the same rows, duplicated and reordered
    order = torch.tensor([3, 0, 3, 1, 2])
    s2, l2, *_ = minillm_token_losses(logits[order], teacher[order], tokens[order], mask[order], old[order], 0.2, 0.2)
    torch.testing.assert_close(s2, single[order])
    torch.testing.assert_close(l2, long[order])


def test_all_masked_gives_zero_not_nan():
    logits, teacher, tokens, _, old = _random_case()
    mask = torch.zeros(tokens.shape, dtype=DT)
    logits[0, 0, 0], teacher[0, 1, 2], old[1, 1] = float("nan"), float("-inf"), float("nan")
    x = logits.clone().requires_grad_(True)
    single, long, *_ = minillm_token_losses(x, teacher, tokens, mask, old, 0.2, 0.2)
    assert (single == 0).all() and (long == 0).all()
    per_token_fns = (
        single + long,
        token_nll(x, tokens, mask),
        word_kd_token_losses(x, teacher, mask),
        reverse_kl_per_token(x, teacher, mask),
    )
    for per_token in per_token_fns:
        assert (per_token == 0).all()
        for mode in ("seq", "token"):
            loss = reduce_losses(per_token, mask, mode)
            assert loss.item() == 0.0
            (g,) = torch.autograd.grad(loss, x, retain_graph=True)
            assert torch.isfinite(g).all() and (g == 0).all()


def test_very_negative_teacher_logprobs_stay_finite():
    logits, teacher, tokens, mask, old = _random_case()
    teacher = teacher.clone()
    teacher[0, 0, :3] = -1e30  # effectively probability 0 but finite
    teacher[0, 1, 1] = float("-inf")
    teacher[0, 1, tokens[0, 1]] = float("-inf")  # the sampled token itself: r_t = -inf must not produce NaN
    x = logits.clone().requires_grad_(True)
    single, long, *_ = minillm_token_losses(x, teacher, tokens, mask, old, 0.2, 0.2)
    loss = reduce_losses(single + long, mask) + reduce_losses(reverse_kl_per_token(x, teacher, mask), mask)
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(single).all() and torch.isfinite(long).all() and torch.isfinite(g).all()


def test_reductions_by_hand():
    per_token = torch.tensor([[1.0, 3.0, 100.0], [4.0, 0.0, 0.0], [7.0, 7.0, 7.0], [float("nan"), 2.0, 6.0]], dtype=DT)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0]], dtype=DT)
    # per sequence: means 2, 4, (none), 4 -> 10 / 3; per token: (1 + 3 + 4 + 2 + 6) / 5
    assert reduce_losses(per_token, mask).item() == pytest.approx(16.0 / 5)  # token mean: the default
    assert reduce_losses(per_token, mask, "seq").item() == pytest.approx(10.0 / 3)
    assert reduce_losses(per_token, mask, "token").item() == pytest.approx(16.0 / 5)
    with pytest.raises(ValueError, match="reduction"):
        reduce_losses(per_token, mask, "mean")


def test_nll_word_kd_and_reverse_kl_against_brute_force():
    logits, teacher, tokens, mask, _ = _random_case()
    teacher = teacher.clone()
    teacher[0, 0, 3] = float("-inf")  # zero-probability teacher tokens: forward KL term 0, not NaN
    teacher[1, 1, 0] = float("-inf")
    teacher[0, 0] = torch.log_softmax(teacher[0, 0], -1)
    teacher[1, 1] = torch.log_softmax(teacher[1, 1], -1)
    x = logits.clone().requires_grad_(True)
    nll = token_nll(x, tokens, mask)
    kd = word_kd_token_losses(x, teacher, mask)
    rkl = reverse_kl_per_token(x, teacher, mask)
    (g,) = torch.autograd.grad((nll + kd + rkl).sum(), x)
    assert torch.isfinite(kd).all() and torch.isfinite(rkl).all() and torch.isfinite(g).all()
    v_ = logits.shape[2]
    for b, t in itertools.product(range(logits.shape[0]), range(logits.shape[1])):
        if mask[b, t] == 0:
            assert nll[b, t] == 0 and kd[b, t] == 0 and rkl[b, t] == 0
            continue
        z = math.log(sum(math.exp(logits[b, t, v].item()) for v in range(v_)))
        logq = [logits[b, t, v].item() - z for v in range(v_)]
        logp = [teacher[b, t, v].item() for v in range(v_)]
        assert nll[b, t].item() == pytest.approx(-logq[tokens[b, t]], rel=1e-10)
        fwd = sum(math.exp(lp) * (lp - lq) for lp, lq in zip(logp, logq, strict=True) if lp > -math.inf)
        assert kd[b, t].item() == pytest.approx(fwd, rel=1e-10)
        if all(lp > -math.inf for lp in logp):
            rev = sum(math.exp(lq) * (lq - lp) for lp, lq in zip(logp, logq, strict=True))
            assert rkl[b, t].item() == pytest.approx(rev, rel=1e-10)


def test_word_kd_gradient_is_q_minus_p():
    """d KL[p || q] / d logits = q - p, per position (a closed form independent of the implementation)."""
    logits, teacher, _, mask, _ = _random_case()
    x = logits.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(word_kd_token_losses(x, teacher, mask).sum(), x)
    expected = (torch.softmax(logits, -1) - teacher.exp()) * mask.unsqueeze(-1)
    torch.testing.assert_close(g, expected, atol=1e-12, rtol=1e-10)


def test_vocab_log_softmax_drops_padded_rows():
    logits = torch.randn(2, 3, 10, dtype=DT)
    cut = vocab_log_softmax(logits, 7)
    assert cut.shape == (2, 3, 7)
    torch.testing.assert_close(cut, torch.log_softmax(logits[..., :7], -1))
    with pytest.raises(ValueError):
        vocab_log_softmax(logits, 11)


# ---- the key test: on an enumerable toy, E_{y~q}[grad(single + long)] equals grad KL[q || p] exactly ----


def _prefix_index(prefix: tuple[int, ...], v: int) -> int:
    """Index of a prefix among all prefixes of length 0..T-1 (breadth first)."""
    offset = sum(v**k for k in range(len(prefix)))
    return offset + sum(tok * v ** (len(prefix) - 1 - i) for i, tok in enumerate(prefix))


@pytest.mark.parametrize("v,t,seed", [(3, 3, 3), (4, 3, 1), (5, 2, 2)])
def test_expected_gradient_equals_exact_reverse_kl_gradient(v, t, seed):
    g = torch.Generator().manual_seed(seed)
    n_prefixes = sum(v**k for k in range(t))
    # the student's logits per prefix (a free table) and the teacher's fixed log-probs per prefix
    theta = (torch.randn(n_prefixes, v, generator=g, dtype=DT) * 1.5).requires_grad_(True)
    teacher = torch.log_softmax(torch.randn(n_prefixes, v, generator=g, dtype=DT) * 1.5, -1)
    sequences = list(itertools.product(range(v), repeat=t))  # fixed length, no EOS: all V^T sequences
    rows = torch.tensor([[_prefix_index(y[:i], v) for i in range(t)] for y in sequences])
    tokens = torch.tensor(sequences)

    # exact sequence-level KL[q || p] = sum_y q(y) log(q(y) / p(y)) by enumeration, differentiated by autograd
    logq_table = torch.log_softmax(theta, -1)
    seq_logq = logq_table[rows].gather(-1, tokens.unsqueeze(-1)).squeeze(-1).sum(-1)
    seq_logp = teacher[rows].gather(-1, tokens.unsqueeze(-1)).squeeze(-1).sum(-1)
    assert seq_logq.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    kl = (seq_logq.exp() * (seq_logq - seq_logp)).sum()
    (exact_grad,) = torch.autograd.grad(kl, theta)

    # E_{y~q}[grad sum_t (single_t + long_t)]: alpha = 0, no clipping, no length norm, theta = theta_old
    student_logits = theta[rows]  # [N, T, V]
    mask = torch.ones(len(sequences), t, dtype=DT)
    old = torch.log_softmax(student_logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1).detach()
    single, long, *_ = minillm_token_losses(
        student_logits, teacher[rows], tokens, mask, old, alpha=0.0, clip_eps=None, length_norm=False
    )
    q_y = old.sum(-1).exp()  # q(y) of each enumerated sequence: the exact expectation's weights
    surrogate = (q_y.unsqueeze(-1) * (single + long)).sum()
    (expected_grad,) = torch.autograd.grad(surrogate, theta, retain_graph=True)
    assert exact_grad.abs().max() > 1e-2
    torch.testing.assert_close(expected_grad, exact_grad, atol=1e-10, rtol=1e-8)

    # the test can fail: counting r_t in its own return (t' >= t) double-counts what the exact per-token KL
    # already covers, and the gradient moves off the exact one
    r = (teacher[rows].gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - old).detach()
    rho = torch.exp(torch.log_softmax(student_logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - old)
    (wrong_grad,) = torch.autograd.grad(surrogate - (q_y.unsqueeze(-1) * r * rho).sum(), theta)
    assert (wrong_grad - exact_grad).abs().max() > 1e-3


# ---- top-k teacher transport: exact token log-probs, coarsened single-step KL, never a uniform fill ----


def _topk_case(k, seed=0):
    logits, teacher, tokens, mask, old = _random_case(v=9, seed=seed)
    top = topk_logprobs(teacher, k)
    exact_token = teacher.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return logits, teacher, top, tokens, mask, old, exact_token


def test_topk_tail_is_exact_mass_outside():
    _, teacher, top, *_ = _topk_case(3)
    inside = top.logprobs.exp().sum(-1)
    torch.testing.assert_close(top.tail.exp(), 1 - inside, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("k", [1, 3, 7])  # V = 9: the tail always holds >= 2 tokens
def test_topk_single_step_kl_is_the_coarsened_kl_and_a_lower_bound(k):
    logits, teacher, top, tokens, mask, old, exact_token = _topk_case(k)
    coarse = reverse_kl_per_token(logits, top, mask)
    full = reverse_kl_per_token(logits, teacher, mask)
    # brute force: bucket the vocabulary into the top-k tokens + one tail bucket, KL of the bucketed distributions
    q = torch.softmax(logits, -1)
    p = teacher.exp()
    in_top = torch.zeros_like(q, dtype=torch.bool).scatter(-1, top.ids, True)
    q_tail, p_tail = (q * ~in_top).sum(-1), (p * ~in_top).sum(-1)
    q_k, p_k = q.gather(-1, top.ids), p.gather(-1, top.ids)
    expected = (q_k * (q_k / p_k).log()).sum(-1) + q_tail * (q_tail / p_tail).log()
    torch.testing.assert_close(coarse, expected * mask, atol=1e-10, rtol=1e-8)
    assert (coarse <= full + 1e-12).all() and (full - coarse)[mask > 0].max() > 1e-4


def test_topk_uses_exact_token_logprobs_for_rewards_and_rho():
    """Tokens outside the top-k (every teacher-sampled tail token) get the teacher's exact log p(y_t): the long-term
    term and rho equal the dense computation's. A uniform fill of the tail would not."""
    logits, teacher, top, tokens, mask, old, exact_token = _topk_case(2, seed=3)
    outside = ~(top.ids == tokens.unsqueeze(-1)).any(-1) & (mask > 0)
    assert outside.sum() >= 3  # the case exercises tail tokens
    dense = minillm_token_losses(logits, teacher, tokens, mask, old, 0.2, 0.2)
    sparse = minillm_token_losses(logits, top, tokens, mask, old, 0.2, 0.2, teacher_token_logprobs=exact_token)
    torch.testing.assert_close(sparse.long, dense.long, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(sparse.rho, dense.rho, atol=1e-12, rtol=1e-10)
    # today's reconstruction (tail mass spread evenly) gives other rewards on tail tokens
    v = teacher.shape[-1]
    fill = (top.tail - math.log(v - 2)).unsqueeze(-1).expand(*top.tail.shape, v).clone()
    uniform = fill.scatter(-1, top.ids, top.logprobs)
    wrong = minillm_token_losses(logits, uniform, tokens, mask, old, 0.2, 0.2)
    assert not torch.allclose(wrong.rho[outside], dense.rho[outside])
    with pytest.raises(ValueError, match="teacher_token_logprobs"):
        minillm_token_losses(logits, top, tokens, mask, old, 0.2, 0.2)


def test_topk_with_full_vocabulary_equals_dense():
    logits, teacher, top, tokens, mask, old, exact_token = _topk_case(9)
    x = logits.clone().requires_grad_(True)
    dense = minillm_token_losses(x, teacher, tokens, mask, old, 0.2, 0.2)
    sparse = minillm_token_losses(x, top, tokens, mask, old, 0.2, 0.2, teacher_token_logprobs=exact_token)
    torch.testing.assert_close(sparse.single, dense.single, atol=1e-10, rtol=1e-8)
    (g1,) = torch.autograd.grad(dense.single.sum(), x, retain_graph=True)
    (g2,) = torch.autograd.grad(sparse.single.sum(), x)
    torch.testing.assert_close(g1, g2, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("mode", ["token", "seq"])
def test_token_weights_of_parts_add_up_to_the_whole(mode):
    """Split a mini-batch with unequal response lengths into parts (workers, micro-batches): each part weighted with
    the whole's totals sums to the whole's loss exactly."""
    per_token = torch.randn(6, 5, dtype=DT)
    mask = torch.tensor(
        [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=DT
    )
    whole = reduce_losses(per_token, mask, mode)
    tokens, seqs = mask.sum().item(), (mask.sum(-1) > 0).sum().item()
    parts = sum(
        (per_token[sl] * token_weights(mask[sl], mode, tokens, seqs)).sum()
        for sl in (slice(0, 2), slice(2, 3), slice(3, 6))
    )
    torch.testing.assert_close(parts, whole)
    # a plain mean of the parts' own reductions is what the old per-worker mean did: not the same
    means = torch.stack([reduce_losses(per_token[sl], mask[sl], mode) for sl in (slice(0, 3), slice(3, 6))]).mean()
    assert not torch.allclose(means, whole)


@pytest.mark.parametrize("alpha,seed", [(0.2, 5), (0.5, 6), (1.0, 7)])
def test_expected_gradient_with_teacher_mixed_sampling(alpha, seed):
    """alpha > 0: sequences come from p~ = alpha p + (1 - alpha) q_old token by token, and the token-level weight
    rho_t = q_theta(y_t) / p~(y_t) corrects only the token it weighs. So, exactly, by enumeration of every sequence,
    E_{y~p~}[grad (single + long)] = grad of
      sum_t E_{prefix~p~} KL_t(prefix) - sum_t E_{prefix~p~} sum_v q_theta(v | prefix) E_{y>t~p~}[R_{t+1} | prefix, v]
    computed here prefix by prefix (an independent construction, not the per-token formulas)."""
    v, t = 3, 3
    g = torch.Generator().manual_seed(seed)
    n_prefixes = sum(v**k for k in range(t))
    theta = (torch.randn(n_prefixes, v, generator=g, dtype=DT) * 1.5).requires_grad_(True)
    teacher = torch.log_softmax(torch.randn(n_prefixes, v, generator=g, dtype=DT) * 1.5, -1)
    sequences = list(itertools.product(range(v), repeat=t))
    rows = torch.tensor([[_prefix_index(y[:i], v) for i in range(t)] for y in sequences])
    tokens = torch.tensor(sequences)
    logq_old = torch.log_softmax(theta, -1).detach()
    mix = alpha * teacher.exp() + (1 - alpha) * logq_old.exp()  # p~ per prefix row

    # the estimator, weighted by the exact probability of each sequence under p~
    seq_mix = mix[rows].gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [N, T]
    old = logq_old[rows].gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    terms = minillm_token_losses(
        theta[rows],
        teacher[rows],
        tokens,
        torch.ones(len(sequences), t, dtype=DT),
        old,
        alpha=alpha,
        clip_eps=None,
        length_norm=False,
    )
    surrogate = (seq_mix.prod(-1).unsqueeze(-1) * (terms.single + terms.long)).sum()
    (estimated,) = torch.autograd.grad(surrogate, theta)

    # independently: prefix probabilities under p~, conditional future rewards by enumerating completions
    reward = {
        y: [
            teacher[_prefix_index(y[:i], v), y[i]].item() - logq_old[_prefix_index(y[:i], v), y[i]].item()
            for i in range(t)
        ]
        for y in sequences
    }
    prob = {y: math.prod(mix[_prefix_index(y[:i], v), y[i]].item() for i in range(t)) for y in sequences}
    logq = torch.log_softmax(theta, -1)
    objective = theta.sum() * 0
    for length in range(t):
        for prefix in itertools.product(range(v), repeat=length):
            row = _prefix_index(prefix, v)
            p_prefix = math.prod(mix[_prefix_index(prefix[:i], v), prefix[i]].item() for i in range(length))
            kl = (logq[row].exp() * (logq[row] - teacher[row])).sum()
            objective = objective + p_prefix * kl
            for tok in range(v):
                done = [y for y in sequences if y[: length + 1] == (*prefix, tok)]
                z = sum(prob[y] for y in done)
                future = sum(prob[y] * sum(reward[y][length + 1 :]) for y in done) / z
                objective = objective - p_prefix * logq[row, tok].exp() * future
    (independent,) = torch.autograd.grad(objective, theta)
    assert independent.abs().max() > 1e-2
    torch.testing.assert_close(estimated, independent, atol=1e-10, rtol=1e-8)
