"""The LM head run by chunks of positions, so that no [tokens, V] tensor larger than one chunk is alive.

Only the positions that predict a target go through the head; with more than one chunk each chunk is recomputed
in the backward pass (activation checkpointing): memory is flat in the response length. A loss function gives,
per chunk, the loss to differentiate and the detached per-token values to keep as metrics (no second pass).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

# per chunk: (loss to differentiate, detached per-token values to keep as metrics)
ChunkFn = Callable[[torch.Tensor, slice], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class ChunkedLMHead:
    """The student's output layer (`head`) cut to `vocab_size` rows, run over at most `chunk_tokens` positions at
    a time."""

    def __init__(self, head: torch.nn.Module, vocab_size: int, chunk_tokens: int) -> None:
        self.head, self.vocab_size, self.chunk_tokens = head, vocab_size, chunk_tokens

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.head(hidden)
        # a slice, even a whole one, costs a zero-filled [chunk, V] copy in backward: only cut padded rows
        return out[..., : self.vocab_size] if out.shape[-1] != self.vocab_size else out

    def chunked(self, hidden: torch.Tensor, fn: ChunkFn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Sum fn's loss over chunks of `hidden` [N, H] rows and concatenate its metrics. Several chunks are each
        recomputed in backward (checkpointed), so at most one chunk's logits are alive at a time."""
        n, size = hidden.shape[0], self.chunk_tokens
        if n <= size:
            return fn(hidden, slice(0, n))
        total = hidden.new_zeros((), dtype=torch.float32)
        parts: dict[str, list[torch.Tensor]] = {}
        for start in range(0, n, size):
            sl = slice(start, min(start + size, n))
            if torch.is_grad_enabled():
                loss, metrics = checkpoint(fn, hidden[sl], sl, use_reentrant=False)
            else:
                loss, metrics = fn(hidden[sl], sl)
            total = total + loss
            for k, v in metrics.items():
                parts.setdefault(k, []).append(v)
        return total, {k: torch.cat(v) for k, v in parts.items()}
