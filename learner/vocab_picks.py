"""The student's log-probs at a few vocabulary entries per position (the teacher's top-k ids, the sampled token)
and the log of the mass outside the top-k, from logits [N, V], holding at most one [N, V] tensor.

Autograd through `log_softmax -> gather, gather, scatter(-inf) -> logsumexp` (the plain top-k path of
learner/objectives.py) keeps the log-probs and the masked copy for backward and builds the gradient from three
dense [N, V] pieces (one per gather or scatter) before the log-softmax's backward makes a fifth: about 4.8 [N, V]
tensors alive at the peak of a chunk's backward (measured, docs/scale.md). Here the forward and the backward run
by blocks of rows, the backward writes the whole gradient into one buffer, and with `consume` the log-probs
overwrite the logits' own buffer and the gradient overwrites the log-probs': one [N, V] tensor in all.

Every number is the plain path's: the same kernels on each row (log_softmax, logsumexp, the log-softmax
backward), the same products, the same additions in an order that cannot change a sum (where the gradient pieces
overlap, one of them is exactly 0, or the two are added alone). tests/unit/test_vocab_picks.py checks the values
and the gradients bitwise against the plain path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

BLOCK_ROWS = 64  # rows per block: a block's temporaries are 64 x V floats (12.6 MB at V = 49,152)


def _blocks(n: int) -> list[slice]:
    return [slice(s, min(s + BLOCK_ROWS, n)) for s in range(0, n, BLOCK_ROWS)]


class _TopKPicks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: Tensor, ids: Tensor, tokens: Tensor, consume: bool) -> tuple[Tensor, Tensor, Tensor]:
        n = logits.shape[0]
        reuse = consume and logits.dtype == torch.float32 and logits.is_contiguous()
        # with `consume` the caller never reads the logits again: nothing else holds them (the head's matmul keeps
        # its inputs, not its output), so their buffer becomes the log-probs'
        logq = logits if reuse else torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        tail = torch.empty(n, dtype=torch.float32, device=logits.device)
        for b in _blocks(n):
            lq = torch.log_softmax(logits[b].float(), dim=-1)
            logq[b] = lq
            tail[b] = torch.logsumexp(lq.scatter(-1, ids[b], float("-inf")), dim=-1)
        head = logq.gather(-1, ids)
        picked = logq.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(logq, ids, tokens, tail)
        ctx.reuse, ctx.logits_dtype = reuse, logits.dtype
        return head, tail, picked

    @staticmethod
    def backward(ctx: Any, g_head: Tensor | None, g_tail: Tensor | None, g_picked: Tensor | None) -> Any:
        logq, ids, tokens, tail = ctx.saved_tensors
        grad = logq if ctx.reuse else torch.empty_like(logq)  # each block's rows are read before they are written
        for b in _blocks(logq.shape[0]):
            lq = logq[b]
            if g_tail is not None:
                # logsumexp's backward, g * exp(x - lse), on the masked copy: 0 at the top-k ids
                g = g_tail[b].unsqueeze(-1) * (lq - tail[b].unsqueeze(-1)).exp()
                g.scatter_(-1, ids[b], 0.0)
            else:
                g = torch.zeros_like(lq)
            if g_head is not None:
                g.scatter_add_(-1, ids[b], g_head[b])
            if g_picked is not None:
                g.scatter_add_(-1, tokens[b].unsqueeze(-1), g_picked[b].unsqueeze(-1))
            grad[b] = torch._log_softmax_backward_data(g, lq, -1, torch.float32)
        return grad.to(ctx.logits_dtype), None, None, None


def topk_picks(logits: Tensor, ids: Tensor, tokens: Tensor, consume: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(log q at `ids` [..., k], log of q's mass outside `ids` [...], log q at `tokens` [...]) with q the softmax of
    `logits` [..., V] (float32 maths, as common/logprobs.vocab_log_softmax; V is the whole last dim). `consume`:
    the caller hands the logits over and never reads them again (float32 ones are overwritten in place)."""
    v = logits.shape[-1]
    lead = logits.shape[:-1]
    head, tail, picked = _TopKPicks.apply(
        logits.reshape(-1, v), ids.reshape(-1, ids.shape[-1]).long(), tokens.reshape(-1).long(), consume
    )
    return head.reshape(*lead, -1), tail.reshape(lead), picked.reshape(lead)
