"""Teacher scorer: the teacher in plain torch, returning its log-probs at the response positions only, split into
one shard per learner rank so each rank fetches just its own part.

Transports (`teacher.transport`): `dense` full-vocabulary log-probs in the compute dtype, `topk` (top-k ids and
log-probs plus the exact tail mass), or `hidden` (the final hidden states after the final norm, in the compute dtype:
the learner recomputes the full-vocabulary log-probs with its copy of the output layer, common/teacher_head.py);
with each, the exact log-prob of every sampled token. `token` (per call, for objectives that use only the sampled
token, objective.kind=sampled_rkl) sends that log-prob alone: no per-token vocabulary rows at all. The head and the
log-softmax run only where a response token is predicted, in chunks of `chunk_tokens` positions, and each chunk
leaves in its wire format as soon as it is computed: no float32 copy of a whole shard exists."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from common.data import LMBatch
from common.logprobs import TeacherHidden, TopKLogprobs, cat_teacher, topk_logprobs
from common.models import DTYPES, final_hidden_states, load_model
from common.rollout import BatchInfo, Rollouts, ScoredShard, gather_positions, pack_rollouts, shard_rows, slice_packed
from common.teacher_head import TeacherHead, check_head_matches

TRANSPORTS = ("dense", "topk", "hidden")  # an actor's; a call may also ask for "token"
Wire = torch.Tensor | TopKLogprobs | TeacherHidden


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
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown teacher transport {transport!r} (use one of {', '.join(TRANSPORTS)})")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(teacher_dir, dtype).to(self.device).eval()
        config = json.loads((Path(teacher_dir) / "config.json").read_text(encoding="utf-8"))
        # the same head (and soft-capping / scaling) the learner applies to hidden states: dense == hidden
        self.head = TeacherHead.from_model(self.model, config, vocab_size)
        if transport == "hidden":  # a family whose output layer the learner would not reproduce stops here
            check_head_matches(self.model, self.head)
        self.vocab_size, self.pad_id = vocab_size, pad_id
        self.batch_size, self.transport, self.top_k = batch_size, transport, top_k
        self.wire_dtype = DTYPES[dtype]  # dense log-probs and hidden states travel in the compute dtype
        self.chunk_tokens = chunk_tokens
        self.stats = {"scored_tokens": 0, "score_seconds": 0.0}

    def _positions_hidden(
        self, input_ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor, where: torch.Tensor
    ) -> torch.Tensor:
        """Final hidden states [N, d] of the positions that predict real targets (`where` [B, T] picks them)."""
        hidden = final_hidden_states(self.model, input_ids.to(self.device), attention.to(self.device))
        return gather_positions(hidden, positions.to(self.device))[where.to(self.device) > 0]

    def _chunks(self, flat: torch.Tensor):
        """(hidden chunk, its float32 log-probs [n, V]) for chunks of `chunk_tokens` rows."""
        for i in range(0, flat.shape[0], self.chunk_tokens):
            h = flat[i : i + self.chunk_tokens]
            yield h, self.head.log_probs(h)

    def _wire(self, hidden: torch.Tensor, logp: torch.Tensor, transport: str | None = None) -> Wire:
        """One chunk in the transport's format, on the CPU (the float32 log-probs are dropped right after)."""
        transport = transport or self.transport
        if transport == "token":  # [n, 0]: every row/concat operation on shards still works, and 0 bytes travel
            return torch.zeros(hidden.shape[0], 0, dtype=self.wire_dtype)
        if transport == "hidden":
            return TeacherHidden(hidden.to(self.wire_dtype).cpu())
        return self._pack_logprobs(logp, transport)

    def _pack_logprobs(self, logp: torch.Tensor, transport: str | None = None) -> torch.Tensor | TopKLogprobs:
        """Float32 log-probs [n, V] in the dense / top-k wire format, on the CPU (also the transport benchmark's
        packing of one set of log-probs into every format)."""
        if (transport or self.transport) == "topk":
            top = topk_logprobs(logp, min(self.top_k, logp.shape[-1]))
            return TopKLogprobs(top.ids.cpu(), top.logprobs.cpu(), top.tail.cpu())
        return logp.to(self.wire_dtype).cpu()

    def _empty(self, transport: str | None = None) -> Wire:
        transport = transport or self.transport
        if transport == "token":
            return torch.zeros(0, 0, dtype=self.wire_dtype)
        if transport == "hidden":
            return TeacherHidden(torch.zeros(0, self.head.hidden_size, dtype=self.wire_dtype))
        if transport == "topk":
            k = min(self.top_k, self.vocab_size)
            return TopKLogprobs(torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k), torch.zeros(0))
        return torch.zeros(0, self.vocab_size, dtype=self.wire_dtype)

    def _concat(self, pieces: list[Wire], transport: str | None = None) -> Wire:
        return cat_teacher(pieces) if pieces else self._empty(transport)

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
        if transport not in (*TRANSPORTS, "token"):
            raise ValueError(f"unknown teacher transport {transport!r} (use one of {', '.join(TRANSPORTS)}, token)")
        t0, c0 = time.perf_counter(), time.process_time()
        if rows is not None:
            rollouts = rollouts.select(rows)
        packed = pack_rollouts(rollouts, self.pad_id)
        shards = []
        for sl in shard_rows(len(rollouts), num_shards):
            part = slice_packed(packed, sl)
            token_lp = torch.zeros_like(part.mask)
            pieces: list[Wire] = []
            for start in range(0, len(part.tokens), self.batch_size):
                b = slice(start, start + self.batch_size)
                rows = (part.input_ids[b], part.attention_mask[b], part.predict_pos[b], part.mask[b])
                flat = self._positions_hidden(*rows)
                real = part.mask[b] > 0
                sampled = part.tokens[b][real].to(self.device)
                lps = []
                for i, (h, logp) in zip(range(0, flat.shape[0], self.chunk_tokens), self._chunks(flat), strict=True):
                    ids = sampled[i : i + h.shape[0]].unsqueeze(-1)
                    lps.append(logp.gather(-1, ids).squeeze(-1).cpu())
                    pieces.append(self._wire(h, logp, transport))
                if lps:
                    token_lp[b][real] = torch.cat(lps)
            shards.append(ScoredShard(part, token_lp, self._concat(pieces, transport)))
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
    def score_lm(self, *batches: LMBatch) -> list[torch.Tensor | TeacherHidden]:
        """Word-level KD targets at the response positions of each learner rank's ground-truth batch (rows where
        `loss_mask` is 1, row-major): dense log-probs [N_r, V] in the compute dtype, or with transport `hidden` the
        final hidden states [N_r, d] (the KD loss sums over the whole vocabulary, so `topk` sends dense here).
        Call with `.options(num_returns=len(batches))`."""
        out: list[torch.Tensor | TeacherHidden] = []
        wire = self.transport
        self.transport = "hidden" if wire == "hidden" else "dense"
        try:
            for batch in batches:
                pieces: list[Wire] = []
                for flat in self._lm_hidden(batch):
                    pieces += [self._wire(h, logp) for h, logp in self._chunks(flat)]
                out.append(self._concat(pieces))  # type: ignore[arg-type]
        finally:
            self.transport = wire
        return out if len(out) > 1 else out[0]  # type: ignore[return-value]

    def _lm_hidden(self, batch: LMBatch):
        """Final hidden states [N_b, d] at a ground-truth batch's target positions, one sub-batch at a time."""
        n, length = batch.input_ids.shape
        positions = torch.arange(length - 1).expand(n, -1)
        for start in range(0, n, self.batch_size):
            b = slice(start, start + self.batch_size)
            yield self._positions_hidden(batch.input_ids[b], batch.attention_mask[b], positions[b], batch.loss_mask[b])

    @torch.no_grad()
    def lm_nll(self, batch: LMBatch) -> tuple[float, float]:
        """The teacher's summed NLL of a ground-truth batch's targets and their count: the held-out loss the
        student's is compared with (`method: heal`). Only two numbers leave the actor."""
        targets = batch.input_ids[:, 1:][batch.loss_mask > 0].to(self.device)
        total, done = 0.0, 0
        for flat in self._lm_hidden(batch):
            for h, logp in self._chunks(flat):
                ids = targets[done : done + h.shape[0]].unsqueeze(-1)
                total -= logp.gather(-1, ids).sum().item()
                done += h.shape[0]
        return total, float(done)

    def get_stats(self) -> dict[str, float]:
        return dict(self.stats)
