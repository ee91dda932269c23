"""learner/vocab_picks.py against plain autograd through the same ops: values and gradients bitwise equal."""

from __future__ import annotations

import pytest
import torch

import learner.objectives as objectives
from common.logprobs import TopKLogprobs, tail_logprob, vocab_log_softmax
from learner.objectives import minillm_token_losses
from learner.objectives_lmops import lmops_minillm_token_losses
from learner.vocab_picks import BLOCK_ROWS, topk_picks


def plain_picks(
    logits: torch.Tensor, ids: torch.Tensor, tokens: torch.Tensor, consume: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the top-k path computed before vocab_picks: autograd through log_softmax, gathers and the tail."""
    logq = vocab_log_softmax(logits, logits.shape[-1])
    return logq.gather(-1, ids), tail_logprob(logq, ids), logq.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _case(n: int, v: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g) * 3
    ids = torch.randint(0, v, (n, k), generator=g)  # repeats within a row included
    tokens = torch.randint(0, v, (n,), generator=g)
    tokens[::3] = ids[::3, 0]  # the sampled token often is one of the teacher's top-k
    return logits, ids, tokens


@pytest.mark.parametrize("consume", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_picks_match_plain_autograd_bitwise(consume: bool, threads: int) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n = 2 * BLOCK_ROWS + 5  # blocks of unequal size
        logits, ids, tokens = _case(n, 3000, 16, 0)
        g = torch.Generator().manual_seed(1)
        ups = (torch.randn(n, 16, generator=g), torch.randn(n, generator=g), torch.randn(n, generator=g))
        results = []
        for fn in (plain_picks, topk_picks):
            x = logits.clone().requires_grad_(True)
            # a non-leaf, as the head's output is: `consume` may reuse its buffer
            outs = fn(x * 1.0, ids, tokens, consume) if fn is topk_picks else fn(x * 1.0, ids, tokens)
            torch.autograd.backward(outs, ups)
            results.append(([o.detach() for o in outs], x.grad))
        (ref_out, ref_grad), (out, grad) = results
        for a, b in zip(ref_out, out, strict=True):
            assert torch.equal(a, b)
        assert torch.equal(ref_grad, grad)
    finally:
        torch.set_num_threads(before)


def test_picks_unused_outputs_and_bf16() -> None:
    logits, ids, tokens = _case(70, 500, 8, 2)
    for dtype in (torch.float32, torch.bfloat16):
        grads = []
        for fn in (plain_picks, topk_picks):
            x = logits.to(dtype).clone().requires_grad_(True)
            head, _, picked = fn(x * 1.0, ids, tokens)
            (head.sum() + 2 * picked.sum()).backward()  # the tail unused: no gradient through it
            grads.append(x.grad)
        assert grads[1].dtype == dtype
        assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("variant", ["paper", "lmops"])
@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_minillm_top_k_terms_and_gradient_unchanged(
    monkeypatch: pytest.MonkeyPatch, clip_eps: float | None, variant: str
) -> None:
    """minillm's terms (paper and lmops) through vocab_picks == through the plain ops, bitwise (terms, gradient)."""
    n, v, k = 150, 2000, 12
    logits, ids, tokens = _case(n, v, k, 3)
    g = torch.Generator().manual_seed(4)
    lp = torch.log_softmax(torch.randn(n, k + 1, generator=g), -1)
    teacher = TopKLogprobs(ids, lp[:, :k].contiguous(), lp[:, k].contiguous())
    old = -torch.rand(n, generator=g) * 4
    teacher_y = -torch.rand(n, generator=g) * 4
    future = torch.randn(n, generator=g)
    weights = torch.rand(n, generator=g)

    def run(consume: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = logits.clone().requires_grad_(True)
        ones = torch.ones(n)
        if variant == "lmops":
            lm = lmops_minillm_token_losses(
                x * 1.0, teacher, tokens, ones, old, 0.2, clip_eps, future, teacher_token_logprobs=teacher_y
            )
            terms = [lm.reg, lm.pg, lm.kl, lm.rho, lm.logq]
        else:
            t = minillm_token_losses(
                x * 1.0,
                teacher,
                tokens,
                ones,
                old,
                0.2,
                clip_eps,
                teacher_token_logprobs=teacher_y,
                future_reward=future,
                consume_logits=consume,
            )
            terms = [t.single, t.long, t.kl, t.rho, t.logq]
        ((weights * terms[0]).sum() + (weights * terms[1]).sum()).backward()
        assert x.grad is not None
        return [v.detach() for v in terms], x.grad

    lean = run(consume=True)
    monkeypatch.setattr(objectives, "topk_picks", plain_picks)
    plain = run(consume=False)
    for a, b in zip(plain[0], lean[0], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(plain[1], lean[1])
