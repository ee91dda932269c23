"""Data contracts between samplers, teachers, the replay queue and the learner (plain dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from common.logprobs import TeacherHidden, TopKLogprobs, cat_teacher

TeacherWire = torch.Tensor | TopKLogprobs | TeacherHidden


def wire_bytes(t: TeacherWire) -> int:
    """Payload bytes of a teacher's wire data (dense log-probs, top-k or hidden states)."""
    return t.nbytes if isinstance(t, TopKLogprobs | TeacherHidden) else t.numel() * t.element_size()


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
    cpu_seconds: float = 0.0  # the sampler process's CPU time on it (every thread): wall / CPU tells waiting from work
    # per row: the data set's response, not a sample (GKD's 1 - on_policy_fraction share); empty: all sampled
    from_data: list[bool] = field(default_factory=list)

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
            self.cpu_seconds,
            pick(self.from_data),
        )


@dataclass
class ScoredShard:
    """One learner rank's part of a scored batch: its rollouts packed for a forward pass, and the teacher's
    log-probs at their response positions. The teacher builds one per rank, so each rank fetches only its own.

    `teacher` holds one row per real response token, in row-major order of `packed.mask` (no padding rows):
    dense [N, V] log-probs in the transport dtype, TopKLogprobs ([N, k] ids and log-probs, [N] exact tail), or
    TeacherHidden ([N, d] final hidden states; the learner applies the teacher's output layer chunk by chunk).
    `teacher_token_logprobs` [b, T] is the teacher's exact log p(y_t) of each sampled token, whatever the transport.
    """

    packed: PackedRollouts
    teacher_token_logprobs: torch.Tensor
    teacher: TeacherWire

    def __len__(self) -> int:
        return self.packed.tokens.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.packed.mask.sum().item())

    @property
    def teacher_bytes(self) -> int:
        return wire_bytes(self.teacher)


@dataclass
class BatchInfo:
    """What the driver learns about a scored batch: numbers only, never tensors (the shards go to the learner by
    reference)."""

    batch_id: int  # the driver's id of the sampled batch (the ledger: each is consumed once)
    weight_version: int
    sequences: int
    response_tokens: int
    teacher_tokens: int  # tokens sampled by the teacher (alpha > 0)
    finished: int  # responses that ended with EOS
    sample_seconds: float
    score_seconds: float
    teacher_bytes: int  # payload of the teacher's log-probs, all shards
    sample_cpu_seconds: float = 0.0  # process CPU time of the sampler / teacher on this batch
    score_cpu_seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        n = max(self.response_tokens, 1)
        return {
            "mean_response_tokens": self.response_tokens / max(self.sequences, 1),
            "teacher_token_share": self.teacher_tokens / n,
            "finished_share": self.finished / max(self.sequences, 1),
            "sampler_tokens_per_s": self.response_tokens / max(self.sample_seconds, 1e-9),
            "teacher_tokens_per_s": self.response_tokens / max(self.score_seconds, 1e-9),
            "teacher_bytes_per_token": self.teacher_bytes / n,
            "sample_seconds": self.sample_seconds,
            "score_seconds": self.score_seconds,
            "sample_cpu_seconds": self.sample_cpu_seconds,
            "score_cpu_seconds": self.score_cpu_seconds,
        }


def merge_infos(infos: list[BatchInfo]) -> BatchInfo:
    """A collection's info: sums of its batches' counts and times, the oldest weight version."""
    return BatchInfo(
        batch_id=infos[0].batch_id,
        weight_version=min(i.weight_version for i in infos),
        sequences=sum(i.sequences for i in infos),
        response_tokens=sum(i.response_tokens for i in infos),
        teacher_tokens=sum(i.teacher_tokens for i in infos),
        finished=sum(i.finished for i in infos),
        sample_seconds=sum(i.sample_seconds for i in infos),
        score_seconds=sum(i.score_seconds for i in infos),
        teacher_bytes=sum(i.teacher_bytes for i in infos),
        sample_cpu_seconds=sum(i.sample_cpu_seconds for i in infos),
        score_cpu_seconds=sum(i.score_cpu_seconds for i in infos),
    )


def shard_rows(n: int, parts: int) -> list[slice]:
    """Equal contiguous row slices, one per learner rank (every rank takes an equal part of each batch)."""
    if n % parts:
        raise ValueError(f"a batch of {n} cannot be split evenly over {parts} learner workers")
    size = n // parts
    return [slice(i * size, (i + 1) * size) for i in range(parts)]


@dataclass
class PackedRollouts:
    """prompt+response right-padded for one forward pass, with where each response token is predicted."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    predict_pos: torch.Tensor  # [B, T] index into L of the logits that predict response token t
    tokens: torch.Tensor  # [B, T] response tokens (pad where mask is 0)
    mask: torch.Tensor  # [B, T] float, 1 on real response tokens
    old_logprobs: torch.Tensor  # [B, T] float
    from_data: torch.Tensor | None = None  # [B] bool: the data set's response (no sampling distribution); None: none


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
    packed = pack_sequences(rollouts.prompt_ids, rollouts.response_ids, pad_id, rollouts.old_logprobs)
    if any(rollouts.from_data):
        packed.from_data = torch.tensor(rollouts.from_data, dtype=torch.bool)
    return packed


def data_rollouts(prompts: list[list[int]], responses: list[list[int]], index: list[int], version: int) -> Rollouts:
    """The data set's responses to `prompts` as rollouts (GKD's off-policy share): no sampler, no q_old."""
    return Rollouts(
        [list(p) for p in prompts],
        [list(r) for r in responses],
        [[0.0] * len(r) for r in responses],
        [[0] * len(r) for r in responses],
        version,
        list(index),
        [True] * len(prompts),
        from_data=[True] * len(prompts),
    )


def with_data_responses(sampled: Rollouts, data: Rollouts) -> Rollouts:
    """One batch: the sampled rows, then the data set's rows (flagged), at the sampled rows' weight version."""
    flags = (sampled.from_data or [False] * len(sampled)) + (data.from_data or [True] * len(data))
    return Rollouts(
        sampled.prompt_ids + data.prompt_ids,
        sampled.response_ids + data.response_ids,
        sampled.old_logprobs + data.old_logprobs,
        sampled.owners + data.owners,
        sampled.weight_version,
        sampled.prompt_index + data.prompt_index,
        sampled.finished + data.finished,
        sampled.seconds,
        sampled.cpu_seconds,
        flags,
    )


def gather_positions(states: torch.Tensor, predict_pos: torch.Tensor) -> torch.Tensor:
    """[B, L, D] (hidden states or logits) -> [B, T, D] at the positions that predict each response token."""
    index = predict_pos.unsqueeze(-1).expand(-1, -1, states.shape[-1])
    return torch.gather(states, 1, index)


def slice_packed(p: PackedRollouts, rows: slice | torch.Tensor) -> PackedRollouts:
    """The rows of a packed batch: a slice (a learner rank's part) or index tensor (a mini-batch, any order)."""
    return PackedRollouts(
        p.input_ids[rows],
        p.attention_mask[rows],
        p.predict_pos[rows],
        p.tokens[rows],
        p.mask[rows],
        p.old_logprobs[rows],
        p.from_data[rows] if p.from_data is not None else None,
    )


def _pad_to(t: torch.Tensor, width: int, value: float) -> torch.Tensor:
    if t.shape[1] == width:
        return t
    pad = torch.full((t.shape[0], width - t.shape[1], *t.shape[2:]), value, dtype=t.dtype)
    return torch.cat([t, pad], dim=1)


def _flat_rows(mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Indices into a shard's flat per-token teacher rows for the sequences `rows`, in order."""
    counts = (mask > 0).sum(-1)
    starts = counts.cumsum(0) - counts
    return torch.cat(
        [torch.arange(int(starts[r]), int(starts[r] + counts[r])) for r in rows.tolist()]
        or [torch.zeros(0, dtype=torch.long)]
    )


def select_rows(shard: ScoredShard, rows: torch.Tensor) -> ScoredShard:
    """The sequences `rows` of a shard (any order), with their teacher rows (a mini-batch of a collection)."""
    p = shard.packed
    rows = rows.long()
    packed = slice_packed(p, rows)
    flat = _flat_rows(p.mask, rows)
    teacher = shard.teacher[flat]  # TopKLogprobs indexes all three fields, TeacherHidden its states
    return ScoredShard(packed, shard.teacher_token_logprobs[rows], teacher)


def concat_shards(shards: list[ScoredShard], pad_id: int = 0) -> ScoredShard:
    """One shard holding every sequence of `shards` (a collection), right-padded to the widest."""
    if len(shards) == 1:
        return shards[0]
    width = max(s.packed.input_ids.shape[1] for s in shards)
    resp = max(s.packed.tokens.shape[1] for s in shards)
    ps = [s.packed for s in shards]
    packed = PackedRollouts(
        torch.cat([_pad_to(p.input_ids, width, pad_id) for p in ps]),
        torch.cat([_pad_to(p.attention_mask, width, 0) for p in ps]),
        torch.cat([_pad_to(p.predict_pos, resp, 0) for p in ps]),
        torch.cat([_pad_to(p.tokens, resp, pad_id) for p in ps]),
        torch.cat([_pad_to(p.mask, resp, 0.0) for p in ps]),
        torch.cat([_pad_to(p.old_logprobs, resp, 0.0) for p in ps]),
        None
        if all(p.from_data is None for p in ps)
        else torch.cat(
            [p.from_data if p.from_data is not None else torch.zeros(len(p.tokens), dtype=torch.bool) for p in ps]
        ),
    )
    token_lp = torch.cat([_pad_to(s.teacher_token_logprobs, resp, 0.0) for s in shards])
    teacher = cat_teacher([s.teacher for s in shards])
    return ScoredShard(packed, token_lp, teacher)


def row_widths(p: PackedRollouts) -> list[int]:
    """Each row's forward width: its real prompt + response tokens (what a trimmed micro-batch pads to)."""
    return [int(n) for n in p.attention_mask.sum(-1).tolist()]


def token_micro_batches(widths: list[int], max_rows: int, max_tokens: int | None) -> list[slice]:
    """Consecutive micro-batches of at most `max_rows` rows and, with `max_tokens`, at most that many padded tokens
    (rows x the widest row's width); a row wider than the budget goes alone. The order is kept, so the gradient sum
    is the rows-only split's up to summation order."""
    out, start = [], 0
    while start < len(widths):
        end, widest = start + 1, widths[start]
        while end < len(widths) and end - start < max_rows:
            wider = max(widest, widths[end])
            if max_tokens is not None and (end - start + 1) * wider > max_tokens:
                break
            end, widest = end + 1, wider
        out.append(slice(start, end))
        start = end
    return out


def trim_packed(p: PackedRollouts) -> PackedRollouts:
    """Drop the columns no row of `p` uses (right padding left over from a wider collection): a micro-batch then
    costs its own width, not the collection's. Real positions are unchanged (causal attention, right padding)."""
    width = max(1, int(p.attention_mask.sum(-1).max().item())) if len(p.input_ids) else 1
    resp = max(1, int(p.mask.sum(-1).max().item())) if len(p.mask) else 1
    return PackedRollouts(
        p.input_ids[:, :width],
        p.attention_mask[:, :width],
        p.predict_pos[:, :resp],
        p.tokens[:, :resp],
        p.mask[:, :resp],
        p.old_logprobs[:, :resp],
    )


def trim_shard(shard: ScoredShard) -> ScoredShard:
    """trim_packed of a shard, its teacher token log-probs cut alike (the flat teacher rows are unchanged)."""
    packed = trim_packed(shard.packed)
    return ScoredShard(packed, shard.teacher_token_logprobs[:, : packed.tokens.shape[1]], shard.teacher)
