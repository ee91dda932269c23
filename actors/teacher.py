"""Teacher scorer: the teacher in plain torch, returning its log-probs at the response positions only, split into
one shard per learner rank so each rank fetches just its own part.

Transports (`teacher.transport`): `dense` full-vocabulary log-probs in the compute dtype, or `topk` (top-k ids and
log-probs plus the exact tail mass); with either, the exact log-prob of every sampled token. `token` (per call, for
objectives that use only the sampled token, objective.kind=sampled_rkl) sends that log-prob alone: no per-token
vocabulary rows at all. The head and the log-softmax run only where a response token is predicted, in chunks of
`chunk_tokens` positions."""

from __future__ import annotations

import time

import torch

from common.data import LMBatch
from common.logprobs import TopKLogprobs, topk_logprobs, vocab_log_softmax
from common.models import DTYPES, final_hidden_states, load_model
from common.rollout import BatchInfo, Rollouts, ScoredShard, gather_positions, pack_rollouts, shard_rows, slice_packed


def _check_transport(transport: str) -> None:
    if transport not in ("dense", "topk", "token"):
        raise ValueError(f"unknown teacher transport {transport!r} (use 'dense', 'topk' or 'token')")


class Teacher:
    def __init__(
        self,
        teacher_dir: str,
        vocab_size: int,
        pad_id: int,
        batch_size: int = 16,
        transport: str = "dense",
        top_k: int = 64,
        dtype: str = "float32",
        chunk_tokens: int = 1024,
    ):
        _check_transport(transport)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(teacher_dir, dtype).to(self.device).eval()
        self.head = self.model.get_output_embeddings()
        self.vocab_size, self.pad_id = vocab_size, pad_id
        self.batch_size, self.transport, self.top_k = batch_size, transport, top_k
        self.wire_dtype = DTYPES[dtype]  # dense log-probs travel in the compute dtype (bf16 on GPU)
        self.chunk_tokens = chunk_tokens
        self.stats = {"scored_tokens": 0, "score_seconds": 0.0}

    @torch.no_grad()
    def _flat_logprobs(
        self, input_ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor, where: torch.Tensor
    ) -> torch.Tensor:
        """float32 log-probs [N, V] of the positions that predict real targets (`where` [B, T] picks them)."""
        hidden = final_hidden_states(self.model, input_ids.to(self.device), attention.to(self.device))
        flat = gather_positions(hidden, positions.to(self.device))[where.to(self.device) > 0]
        return torch.cat(
            [
                vocab_log_softmax(self.head(flat[i : i + self.chunk_tokens]), self.vocab_size)
                for i in range(0, max(flat.shape[0], 1), self.chunk_tokens)
            ]
        )

    def _pack_teacher(self, logp: torch.Tensor, transport: str) -> torch.Tensor | TopKLogprobs:
        if transport == "token":  # [N, 0]: every row/concat operation on shards still works, and 0 bytes travel
            return torch.zeros(logp.shape[0], 0, dtype=self.wire_dtype)
        if transport == "topk":
            top = topk_logprobs(logp, min(self.top_k, logp.shape[-1]))
            return TopKLogprobs(top.ids.cpu(), top.logprobs.cpu(), top.tail.cpu())
        return logp.to(self.wire_dtype).cpu()

    @torch.no_grad()
    def score(
        self,
        rollouts: Rollouts,
        num_shards: int = 1,
        rows: list[int] | None = None,
        batch_id: int = -1,
        transport: str | None = None,
    ) -> list:
        """[BatchInfo, shard_0, ..., shard_{n-1}]: call with `.options(num_returns=1 + num_shards)` so the driver
        holds references only. `rows` scores a subset of the rollouts (the in-run evaluation's KL prompts);
        `transport` overrides the actor's (token: the sampled tokens' log-probs only)."""
        transport = transport or self.transport
        _check_transport(transport)
        t0, c0 = time.perf_counter(), time.process_time()
        if rows is not None:
            rollouts = rollouts.select(rows)
        packed = pack_rollouts(rollouts, self.pad_id)
        shards = []
        for sl in shard_rows(len(rollouts), num_shards):
            part = slice_packed(packed, sl)
            token_lp = torch.zeros_like(part.mask)
            pieces = []
            for start in range(0, len(part.tokens), self.batch_size):
                b = slice(start, start + self.batch_size)
                logp = self._flat_logprobs(part.input_ids[b], part.attention_mask[b], part.predict_pos[b], part.mask[b])
                real = part.mask[b] > 0
                sampled = part.tokens[b][real].to(logp.device).unsqueeze(-1)
                token_lp[b][real] = logp.gather(-1, sampled).squeeze(-1).cpu()
                pieces.append(logp)
            logp = torch.cat(pieces) if pieces else torch.zeros(0, self.vocab_size)
            shards.append(ScoredShard(part, token_lp, self._pack_teacher(logp, transport)))
        elapsed = time.perf_counter() - t0
        n_tok = rollouts.num_tokens
        self.stats["scored_tokens"] += n_tok
        self.stats["score_seconds"] += elapsed
        info = BatchInfo(
            batch_id=batch_id,
            weight_version=rollouts.weight_version,
            sequences=len(rollouts),
            response_tokens=n_tok,
            teacher_tokens=sum(sum(o) for o in rollouts.owners),
            finished=sum(rollouts.finished),
            sample_seconds=rollouts.seconds,
            score_seconds=elapsed,
            teacher_bytes=sum(s.teacher_bytes for s in shards),
            sample_cpu_seconds=rollouts.cpu_seconds,
            score_cpu_seconds=time.process_time() - c0,
        )
        return [info, *shards]

    @torch.no_grad()
    def score_lm(self, *batches: LMBatch) -> list[torch.Tensor]:
        """Word-level KD targets: dense log-probs [N_r, V] at the response positions of each learner rank's
        ground-truth batch (rows where `loss_mask` is 1, row-major), in the compute dtype. Call with
        `.options(num_returns=len(batches))`; always dense (the KD loss sums over the whole vocabulary)."""
        out = []
        for batch in batches:
            n, length = batch.input_ids.shape
            positions = torch.arange(length - 1).expand(n, -1)
            pieces = [
                self._flat_logprobs(batch.input_ids[b], batch.attention_mask[b], positions[b], batch.loss_mask[b])
                for b in (slice(s, s + self.batch_size) for s in range(0, n, self.batch_size))
            ]
            out.append(torch.cat(pieces).to(self.wire_dtype).cpu())
        return out if len(out) > 1 else out[0]  # type: ignore[return-value]

    @torch.no_grad()
    def lm_nll(self, batch: LMBatch) -> tuple[float, float]:
        """The teacher's summed NLL of a ground-truth batch's targets and their count: the held-out loss the
        student's is compared with (`method: heal`). Only two numbers leave the actor."""
        n, length = batch.input_ids.shape
        positions = torch.arange(length - 1).expand(n, -1)
        total, count = 0.0, 0.0
        for start in range(0, n, self.batch_size):
            b = slice(start, start + self.batch_size)
            logp = self._flat_logprobs(batch.input_ids[b], batch.attention_mask[b], positions[b], batch.loss_mask[b])
            targets = batch.input_ids[b, 1:][batch.loss_mask[b] > 0].to(logp.device)
            total -= logp.gather(-1, targets.unsqueeze(-1)).sum().item()
            count += float(targets.numel())
        return total, count

    def get_stats(self) -> dict[str, float]:
        return dict(self.stats)
