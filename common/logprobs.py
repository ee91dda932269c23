"""Vocabulary log-probabilities and the teacher's wire formats (pure torch, no Ray).

vocab_log_softmax   the one place logits become log-probs: padded embedding rows dropped, float32
TopKLogprobs        top-k ids and log-probs + the exact log of the mass outside them (a teacher transport)
topk_logprobs       full log-probs -> TopKLogprobs, exactly (the tail is a log-sum-exp, not 1 - sum)
tail_logprob        log of the mass outside given ids, for any distribution (student side of top-k)
TeacherHidden       the teacher's final hidden states (transport `hidden`; common/teacher_head.py expands them)
cat_teacher         pieces of one wire format joined along the tokens
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def vocab_log_softmax(logits: Tensor, vocab_size: int) -> Tensor:
    """log-softmax over the tokenizer's vocabulary, in float32 (or float64 when given float64).

    Padded embedding rows beyond the tokenizer (OPT has 50,272 rows for 50,265 tokens) are not tokens: they are
    dropped before normalising, so no probability mass goes to them."""
    if vocab_size > logits.shape[-1]:
        raise ValueError(f"vocab_size {vocab_size} exceeds the logits' last dim {logits.shape[-1]}")
    # no slice when there is nothing to cut: its backward would build a zero-filled copy of the gradient
    sliced = logits[..., :vocab_size] if vocab_size < logits.shape[-1] else logits
    if sliced.dtype != torch.float64:
        sliced = sliced.float()
    return torch.log_softmax(sliced, dim=-1)


@dataclass
class TopKLogprobs:
    """A distribution over V tokens coarsened to its top-k tokens plus one "tail" bucket; leading dims [...]."""

    ids: Tensor  # [..., k] long
    logprobs: Tensor  # [..., k] log p of those tokens (exact)
    tail: Tensor  # [...] log of the mass of every other token (exact; very negative when it is ~0)

    def __getitem__(self, index: slice | Tensor) -> TopKLogprobs:
        return TopKLogprobs(self.ids[index], self.logprobs[index], self.tail[index])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.ids, self.logprobs, self.tail))


def tail_logprob(logprobs: Tensor, ids: Tensor) -> Tensor:
    """log of the total probability of every token NOT in `ids` (per row), by log-sum-exp over the rest: exact
    even when the tail is tiny, where log1p(-sum(top-k)) would lose it to rounding."""
    masked = logprobs.scatter(-1, ids, float("-inf"))
    return torch.logsumexp(masked, dim=-1)


def topk_logprobs(logprobs: Tensor, k: int) -> TopKLogprobs:
    """Coarsen full log-probs [..., V] to the top-k tokens and the exact tail mass."""
    if not 0 < k <= logprobs.shape[-1]:
        raise ValueError(f"top-k needs 0 < k <= vocabulary ({logprobs.shape[-1]}), got k={k}")
    vals, ids = logprobs.topk(k, dim=-1)
    return TopKLogprobs(ids, vals, tail_logprob(logprobs, ids))


@dataclass
class TeacherHidden:
    """The teacher's final hidden states [N, d] (after the final norm) at N response positions, in the wire dtype."""

    hidden: Tensor

    def __getitem__(self, index: slice | Tensor) -> TeacherHidden:
        return TeacherHidden(self.hidden[index])

    def __len__(self) -> int:
        return self.hidden.shape[0]

    @property
    def nbytes(self) -> int:
        return self.hidden.numel() * self.hidden.element_size()

    def to(self, device: torch.device | str) -> TeacherHidden:
        return TeacherHidden(self.hidden.to(device))


def cat_teacher(pieces: list) -> Tensor | TopKLogprobs | TeacherHidden:
    """Concatenate pieces of one teacher wire format along the token dimension (non-empty list, one format)."""
    first = pieces[0]
    if isinstance(first, TeacherHidden):
        return TeacherHidden(torch.cat([p.hidden for p in pieces]))
    if isinstance(first, TopKLogprobs):
        ids, logprobs, tail = (torch.cat([getattr(p, f) for p in pieces]) for f in ("ids", "logprobs", "tail"))
        return TopKLogprobs(ids, logprobs, tail)
    return torch.cat(pieces)
