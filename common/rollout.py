"""Data contracts between samplers, teachers, the replay queue and the learner (plain dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Rollouts:
    """Responses sampled for a batch of prompts, as the sampler saw them."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    old_logprobs: list[list[float]]  # student log-prob of each response token under the sampling weights
    owners: list[list[int]]  # per token: 0 = sampled by the student, 1 = by the teacher
    weight_version: int
    prompt_index: list[int] = field(default_factory=list)  # rows of the prompt set (for references)
    finished: list[bool] = field(default_factory=list)  # ended with EOS (not cut at the length limit)
    seconds: float = 0.0  # wall time the sampler spent on this batch

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return sum(len(r) for r in self.response_ids)

    def select(self, rows: list[int]) -> Rollouts:
        pick = lambda xs: [xs[i] for i in rows] if xs else []  # noqa: E731
        return Rollouts(
            pick(self.prompt_ids),
            pick(self.response_ids),
            pick(self.old_logprobs),
            pick(self.owners),
            self.weight_version,
            pick(self.prompt_index),
            pick(self.finished),
            self.seconds,
        )


@dataclass
class TeacherScores:
    """Teacher log-probs at every response position, right-padded to the longest response.

    Dense: `logprobs` is [B, T, V] (log-softmaxed over the tokenizer's vocabulary).
    Sparse (top-k): `topk_ids`/`topk_logprobs` are [B, T, k] and `rest_logprob` [B, T] is the log of the mass
    outside the top-k, so the distribution's total mass is kept.
    """

    token_logprobs: torch.Tensor  # [B, T] teacher log-prob of each sampled token (0 on padding)
    mask: torch.Tensor  # [B, T] 1 on real response tokens
    logprobs: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    rest_logprob: torch.Tensor | None = None
    seconds: float = 0.0  # wall time the teacher spent scoring

    def dense(self, vocab_size: int) -> torch.Tensor:
        """Full [B, T, V] log-probs; for top-k, the remaining mass is spread evenly over the other tokens."""
        if self.logprobs is not None:
            return self.logprobs
        assert self.topk_ids is not None and self.topk_logprobs is not None and self.rest_logprob is not None
        k = self.topk_ids.shape[-1]
        fill = self.rest_logprob - torch.log(torch.tensor(float(max(vocab_size - k, 1))))
        out = fill.unsqueeze(-1).expand(*fill.shape, vocab_size).clone()
        out.scatter_(-1, self.topk_ids, self.topk_logprobs)
        return out


@dataclass
class PackedRollouts:
    """prompt+response right-padded for one forward pass, with where each response token is predicted."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    predict_pos: torch.Tensor  # [B, T] index into L of the logits that predict response token t
    tokens: torch.Tensor  # [B, T] response tokens (pad where mask is 0)
    mask: torch.Tensor  # [B, T] float, 1 on real response tokens
    old_logprobs: torch.Tensor  # [B, T] float


def pack_sequences(
    prompts: list[list[int]], responses: list[list[int]], pad_id: int, old_logprobs: list[list[float]] | None = None
) -> PackedRollouts:
    batch = len(prompts)
    width = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    resp_len = max(1, max(len(r) for r in responses))
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    predict = torch.zeros((batch, resp_len), dtype=torch.long)
    tokens = torch.full((batch, resp_len), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, resp_len))
    old = torch.zeros((batch, resp_len))
    for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        seq = p + r
        input_ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[b, : len(seq)] = 1
        n = len(r)
        if n:
            predict[b, :n] = torch.arange(len(p) - 1, len(p) - 1 + n)
            tokens[b, :n] = torch.tensor(r, dtype=torch.long)
            mask[b, :n] = 1.0
            if old_logprobs is not None:
                old[b, :n] = torch.tensor(old_logprobs[b], dtype=torch.float32)
    return PackedRollouts(input_ids, attention, predict, tokens, mask, old)


def pack_rollouts(rollouts: Rollouts, pad_id: int) -> PackedRollouts:
    return pack_sequences(rollouts.prompt_ids, rollouts.response_ids, pad_id, rollouts.old_logprobs)


def gather_positions(logits: torch.Tensor, predict_pos: torch.Tensor) -> torch.Tensor:
    """[B, L, V] logits -> [B, T, V] at the positions that predict each response token."""
    index = predict_pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
    return torch.gather(logits, 1, index)
