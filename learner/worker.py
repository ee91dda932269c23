"""One learner worker: the update steps of every method (SFT, word-level KD, MiniLLM and its PPO schedule) on
the FSDP2 student of learner/fsdp_student.py. Plain class: Ray wraps it in learner/group.py.

Only what a loss needs is computed: one forward gives the final hidden states, and the LM head, the log-softmax
and every vocabulary-wide term run only at the positions that predict a target, by chunks (learner/chunked_head.py).
Each step reports this rank's statistics (learner/update_stats.py).

Normalisation: every loss is a weighted sum of per-token terms whose weights use the whole mini-batch's totals
(tokens, sequences), summed over ranks first; FSDP averages gradients over the N ranks, so each rank scales its
sum by N. The update is then the same for any number of workers, whatever the response lengths.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from common.config import LearnerConfig, ObjectiveConfig
from common.data import LMBatch
from common.logprobs import TeacherHidden, TopKLogprobs
from common.memory import peak_mb, reset_peak
from common.rollout import (
    ScoredShard,
    concat_shards,
    gather_positions,
    row_widths,
    select_rows,
    token_micro_batches,
    trim_shard,
    wire_bytes,
)
from common.teacher_head import TeacherHead, expand_teacher
from learner.chunked_head import ChunkedLMHead
from learner.fsdp_student import FSDPStudent
from learner.objectives import (
    reverse_kl_per_token,
    token_nll,
    token_weights,
    word_kd_token_losses,
)
from learner.onpolicy_loss import sequence_signal, token_terms, update_weights
from learner.update_stats import RankUpdate


class LearnerWorker(FSDPStudent):
    """A learner rank's update steps: one public method per kind of update or evaluation the driver asks for (SFT,
    KD, a MiniLLM collection, validation NLL, reverse KL); FSDP set-up and weights out live in FSDPStudent."""

    def __init__(
        self,
        student_dir: str,
        learner: LearnerConfig,
        objective: ObjectiveConfig,
        vocab_size: int,
        rank: int,
        world_size: int,
        init_method: str,
        dtype: str = "float32",
        seed: int = 0,
        teacher_dir: str | None = None,
    ):
        super().__init__(student_dir, learner, rank, world_size, init_method, dtype, seed)
        self.obj, self.vocab_size = objective, vocab_size
        self.lm_head = ChunkedLMHead(self.head, vocab_size, learner.logit_chunk_tokens)
        # teacher.transport=hidden: the teacher's output layer, frozen, in the compute dtype, on every rank whole
        # (not sharded, no optimizer state): it turns each chunk of teacher hidden states into log-probs
        self.teacher_head = (
            TeacherHead.from_folder(teacher_dir, vocab_size, self.compute_dtype, self.device) if teacher_dir else None
        )

    # ----- the shared machinery ----------------------------------------------------------------------
    def _set_lr(self, lr: float | None) -> float:
        """The lr of the next optimizer step (the driver's schedule, learner/lr_schedule.py); None keeps it."""
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        return float(self.optimizer.param_groups[0]["lr"])

    def _totals(self, mask: torch.Tensor) -> tuple[float, float]:
        """(tokens, sequences with any token) of a mini-batch over all ranks (collective)."""
        return self._global_sum(float(mask.sum())), self._global_sum(float((mask.sum(-1) > 0).sum()))

    def _weights(self, mask: torch.Tensor, mode: str, totals: tuple[float, float] | None = None) -> torch.Tensor:
        """Per-token weights [B, T] of this rank's part, normalised by the whole mini-batch (all ranks and
        micro-batches: `totals`, else this call's mask counted across ranks)."""
        tokens, seqs = totals or self._totals(mask)
        return token_weights(mask.float(), mode, tokens, seqs).to(self.device)

    def _lm_terms(
        self,
        batch: LMBatch,
        mode: str,
        teacher: torch.Tensor | TeacherHidden | None = None,
        kd_ratio: float | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted NLL (and, with a KD teacher [N, V], the weighted forward KL, share `kd_ratio`, default
        objective.kd_ratio) at the target positions."""
        mask = batch.loss_mask
        where = mask.to(self.device) > 0
        hidden = self._hidden(batch.input_ids, batch.attention_mask)[:, :-1][where]
        targets = batch.input_ids[:, 1:].to(self.device)[where]
        weights = self._weights(mask, mode)[where]
        kd_teacher = teacher.to(self.device) if isinstance(teacher, torch.Tensor) else teacher
        r = self.obj.kd_ratio if kd_ratio is None else kd_ratio

        def fn(h: torch.Tensor, sl: slice) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            logits = self.lm_head.logits(h)
            ones = torch.ones(h.shape[0], device=self.device)
            nll = token_nll(logits, targets[sl], ones)
            if kd_teacher is None:
                return (weights[sl] * nll).sum(), {"nll": nll.detach()}
            kd = word_kd_token_losses(logits, expand_teacher(kd_teacher[sl], self.teacher_head), ones)
            return (weights[sl] * (r * kd + (1 - r) * nll)).sum(), {"nll": nll.detach(), "kd": kd.detach()}

        return self.lm_head.chunked(hidden, fn)

    # ----- steps -------------------------------------------------------------------------------------
    def sft_step(self, batch: LMBatch, lr: float | None = None) -> dict[str, float]:
        """NLL on ground-truth (or teacher-sampled, for SeqKD) responses, at `lr` (None: the optimizer's). Returns
        this rank's share of the global loss (ranks' shares add up) and its token count."""
        t0, c0 = time.perf_counter(), time.process_time()
        reset_peak(self.device)
        self.model.train()
        loss, m = self._lm_terms(batch, self.obj.reduction)
        before = self.skipped
        lr_used = self._set_lr(lr)
        norm = self._step(loss)
        return RankUpdate(
            loss=loss.item(),
            lr=lr_used,
            grad_norm=norm,
            skipped=float(self.skipped - before),
            tokens=float(m["nll"].numel()),
            peak_memory_mb=peak_mb(self.device),
            step_seconds=time.perf_counter() - t0,
            step_cpu_seconds=time.process_time() - c0,
        ).as_dict()

    def kd_step(
        self, batch: LMBatch, teacher_logprobs: torch.Tensor | TeacherHidden, lr: float | None = None
    ) -> dict[str, float]:
        """Word-level KD: kd_ratio * forward KL[p || q] + (1 - kd_ratio) * NLL on ground-truth responses, at `lr`.
        `teacher_logprobs` is [N, V] at this rank's target positions (row-major over `batch.loss_mask`)."""
        t0, c0 = time.perf_counter(), time.process_time()
        reset_peak(self.device)
        self.model.train()
        loss, m = self._lm_terms(batch, self.obj.reduction, teacher_logprobs)
        before = self.skipped
        lr_used = self._set_lr(lr)
        norm = self._step(loss)
        return RankUpdate(
            loss=loss.item(),
            lr=lr_used,
            skipped=float(self.skipped - before),
            kd_sum=m["kd"].sum().item(),
            nll_sum=m["nll"].sum().item(),
            tokens=float(m["nll"].numel()),
            grad_norm=norm,
            peak_memory_mb=peak_mb(self.device),
            step_seconds=time.perf_counter() - t0,
            step_cpu_seconds=time.process_time() - c0,
        ).as_dict()

    @torch.no_grad()
    def eval_nll(self, batch: LMBatch) -> tuple[float, float]:
        """Sum of token NLL and token count on this worker's slice (the caller adds across workers)."""
        self.model.eval()
        _, m = self._lm_terms(batch, "token")
        return m["nll"].sum().item(), float(m["nll"].numel())

    def _pt_loss(
        self, pt_ids: torch.Tensor | None, teacher: torch.Tensor | TeacherHidden | None = None
    ) -> torch.Tensor:
        """L_PT: NLL on the pre-training block, or with the teacher's log-probs on it (objective.pt_kd_ratio > 0)
        (1 - r) NLL + r KL[p || q] (the released code's teacher cross-entropy minus p's entropy: same gradient)."""
        if pt_ids is None or self.obj.pt_weight == 0:
            return torch.zeros((), device=self.device)
        ones = torch.ones_like(pt_ids)
        kd = teacher.to(self.device) if isinstance(teacher, torch.Tensor) else teacher
        ratio = self.obj.resolved_pt_kd_ratio if teacher is not None else 0.0
        return self._lm_terms(LMBatch(pt_ids, ones, ones[:, 1:].float()), "token", kd, ratio)[0]

    def _device_teacher(self, shard: ScoredShard) -> torch.Tensor | TopKLogprobs | TeacherHidden:
        """This micro-batch's teacher data on the device (hidden states: each chunk's go when it is expanded)."""
        t = shard.teacher
        if isinstance(t, TeacherHidden):
            return t
        if isinstance(t, torch.Tensor):
            return t.to(self.device)
        return TopKLogprobs(t.ids.to(self.device), t.logprobs.to(self.device), t.tail.to(self.device))

    def _response_hidden(self, shard: ScoredShard) -> torch.Tensor:
        """Final hidden states [N, H] at the positions predicting the shard's real response tokens (row-major)."""
        p = shard.packed
        hidden = self._hidden(p.input_ids, p.attention_mask)
        return gather_positions(hidden, p.predict_pos.to(self.device))[p.mask.to(self.device) > 0]

    @torch.no_grad()
    def _learner_logprobs(self, shard: ScoredShard) -> torch.Tensor:
        """The learner's log q(y_t) of every response token [b, T] (0 on padding), in eval mode, by chunks."""
        self.model.eval()
        p = shard.packed
        where = p.mask > 0
        tokens = p.tokens.to(self.device)[where.to(self.device)]

        def fn(h: torch.Tensor, sl: slice) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            lp = -token_nll(self.lm_head.logits(h), tokens[sl], torch.ones(h.shape[0], device=self.device))
            return lp.sum(), {"lp": lp}

        _, m = self.lm_head.chunked(self._response_hidden(shard), fn)
        out = torch.zeros(p.mask.shape)
        if "lp" in m:
            out[where] = m["lp"].float().cpu()
        return out

    def _minillm_loss(
        self, shard: ScoredShard, alpha: float, totals: tuple[float, float], parts: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This micro-batch's share of single + long for objective.kind (learner/onpolicy_loss.py; weights
        normalised by the mini-batch's `totals`, or lmops' mean of the `parts` micro-batch means)."""
        p, dev, o = shard.packed, self.device, self.obj
        where = p.mask.to(dev) > 0
        old = p.old_logprobs.to(dev)
        teacher_y = shard.teacher_token_logprobs.to(dev)
        # returns / advantages need whole sequences; they use no logits, so they are computed up front and the
        # rest goes by chunks (lmops' whitening sums over the ranks here: every rank calls it per micro-batch)
        signal = sequence_signal(o, teacher_y, old, where.to(old.dtype), self._global_sum)
        flat_signal = signal[where] if signal is not None else None
        weights = update_weights(o, p.mask, totals, parts).to(dev)[where]
        tokens, old, teacher_y = p.tokens.to(dev)[where], old[where], teacher_y[where]
        # GKD's data rows (on_policy_fraction < 1) have no sampling distribution: their tokens weigh 1
        sampled = None if p.from_data is None else (~p.from_data.to(dev)).unsqueeze(-1).expand_as(where)[where]
        teacher = self._device_teacher(shard)
        eps = o.clip_eps or 0.0

        def fn(h: torch.Tensor, sl: slice) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            terms = token_terms(
                o,
                self.lm_head.logits(h),
                expand_teacher(teacher[sl], self.teacher_head),
                tokens[sl],
                old[sl],
                teacher_y[sl],
                flat_signal[sl] if flat_signal is not None else None,
                alpha,
                sampled[sl] if sampled is not None else None,
                consume_logits=True,  # the head's output for this chunk, read by nothing else
            )
            w = weights[sl]
            loss = o.single_weight * (w * terms.single).sum() + o.long_weight * (w * terms.long).sum()
            clipped = ((terms.rho - 1).abs() > eps).float() if eps > 0 else torch.zeros_like(terms.rho)
            return loss, {
                "single": (w * terms.single).detach(),
                "long": (w * terms.long).detach(),
                "kl": terms.kl,
                "rho": terms.rho,
                "clipped": clipped,
                "gap": (terms.logq - old[sl]).abs(),
            }

        return self.lm_head.chunked(self._response_hidden(shard), fn)

    def minillm_collection(
        self,
        alpha: float,
        epochs: int,
        minibatch_rows: int,
        micro_rows: int,
        pt_batches: list[torch.Tensor | None],
        *shards: ScoredShard,
        lrs: list[float] | None = None,
        pt_teacher: list[torch.Tensor | TeacherHidden] | None = None,
    ) -> list[dict[str, float]]:
        """MiniLLM's Phase 2 on one collection (this rank's rows of every sampled batch in it): `epochs` passes in
        shuffled mini-batches of `minibatch_rows` sequences (the same on every rank), one optimizer step each,
        gradients accumulated over micro-batches of `micro_rows`; as many updates as `pt_batches` has entries (one
        pre-training batch or None per update), update i at lr `lrs[i]` (None: the optimizer's); `pt_teacher[i]`: the
        teacher's log-probs [N, V] on update i's pre-training block (objective.pt_kd_ratio > 0). Returns each
        update's metrics (this rank's shares).

        log q_old is the sampler's, or (objective.old_logprobs = learner) this learner's own before the first update,
        so rho = 1 there. The first update reports the sampler-vs-learner log-prob gap (numeric only at lag 0)."""
        collection = concat_shards(list(shards))
        n_rows = len(collection)
        if minibatch_rows <= 0 or n_rows % minibatch_rows or minibatch_rows % micro_rows:
            raise ValueError(
                f"{n_rows} rows cannot be cut into mini-batches of {minibatch_rows} and micro-batches of {micro_rows}"
            )
        gap: tuple[float, float, float] | None = None  # (sum, max, tokens) of the sampler-vs-learner gap
        if self.obj.old_logprobs == "learner":
            mine = self._learner_logprobs(collection)
            mask = collection.packed.mask > 0
            diff = (mine - collection.packed.old_logprobs).abs()[mask]
            gap = (diff.sum().item(), diff.max().item() if diff.numel() else 0.0, float(diff.numel()))
            collection.packed.old_logprobs = mine
        results: list[dict[str, float]] = []
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.steps)  # same order on every rank
        pts = iter(pt_batches)
        for _ in range(epochs):
            order = torch.randperm(n_rows, generator=gen) if n_rows > minibatch_rows else torch.arange(n_rows)
            for start in range(0, n_rows, minibatch_rows):
                rows = order[start : start + minibatch_rows]
                m = self._minillm_update(
                    self._micro_batches(collection, rows, micro_rows),
                    alpha,
                    next(pts, None),
                    lrs[len(results)] if lrs is not None else None,
                    pt_teacher[len(results)] if pt_teacher is not None else None,
                )
                if not results:  # the first update: weights = the sampling weights when the batch has lag 0
                    if gap is not None:
                        m.gap_sum, m.gap_max, m.gap_tokens = gap
                    else:  # the update's own gap (measured in its forward)
                        m.gap_tokens = m.tokens
                else:
                    m.gap_sum = m.gap_max = None
                results.append(m.as_dict())
                if len(results) == len(pt_batches):  # the run's last updates may end inside a collection
                    return results
        return results

    def _micro_batches(self, collection: ScoredShard, rows: torch.Tensor, micro_rows: int) -> list[ScoredShard]:
        """A mini-batch's micro-batches: `micro_rows` sequences each, and with learner.micro_batch_tokens at most
        that many padded tokens, each trimmed to its own width."""
        budget = self.cfg.micro_batch_tokens
        if budget is None:
            return [select_rows(collection, rows[i : i + micro_rows]) for i in range(0, len(rows), micro_rows)]
        widths = row_widths(select_rows(collection, rows).packed)
        out = []
        for sl in token_micro_batches(widths, micro_rows, budget):
            out.append(trim_shard(select_rows(collection, rows[sl])))
        return out

    def _minillm_update(
        self,
        micro: list[ScoredShard],
        alpha: float,
        pt_ids: torch.Tensor | None,
        lr: float | None = None,
        pt_teacher: torch.Tensor | TeacherHidden | None = None,
    ) -> RankUpdate:
        t0, c0 = time.perf_counter(), time.process_time()
        reset_peak(self.device)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        masks = [s.packed.mask for s in micro]
        tokens_all = self._global_sum(float(sum(m.sum() for m in masks)))
        seqs_all = self._global_sum(float(sum((m.sum(-1) > 0).sum() for m in masks)))
        totals = (tokens_all, seqs_all)
        sums: dict[str, float] = defaultdict(float)
        rho_min, rho_max, gap_max = float("inf"), float("-inf"), 0.0
        many = len(micro) > 1
        for i, shard in enumerate(micro):
            if many:  # reduce gradients across ranks once, after the last micro-batch
                self.model.set_requires_gradient_sync(i == len(micro) - 1)
            loss, m = self._minillm_loss(shard, alpha, totals, len(micro) * self.world_size)
            if i == len(micro) - 1 and pt_ids is not None and self.obj.pt_weight > 0:
                l_pt = self._pt_loss(pt_ids, pt_teacher)
                loss = loss + self.obj.pt_weight * l_pt
                sums["loss_pt"] += l_pt.item()
            self._backward(loss)
            sums["loss"] += loss.item()
            for key in ("single", "long", "kl", "rho", "clipped", "gap"):
                sums[key] += m[key].sum().item() if key in m else 0.0
            sums["tokens"] += float(m["rho"].numel()) if "rho" in m else 0.0
            if "rho" in m and m["rho"].numel():
                rho_min, rho_max = min(rho_min, m["rho"].min().item()), max(rho_max, m["rho"].max().item())
                gap_max = max(gap_max, m["gap"].max().item())
        if many:
            self.model.set_requires_gradient_sync(True)
        skipped_before = self.skipped
        lr_used = self._set_lr(lr)
        norm = self._step(loss_value=sums["loss"])
        has = sums["tokens"] > 0
        return RankUpdate(
            loss=sums["loss"],
            lr=lr_used,
            loss_single=sums["single"],
            loss_long=sums["long"],
            loss_pt=sums["loss_pt"],
            kl_sum=sums["kl"],
            rho_sum=sums["rho"],
            clip_sum=sums["clipped"],
            rho_min=rho_min if has else 1.0,
            rho_max=rho_max if has else 1.0,
            tokens=sums["tokens"],
            gap_sum=sums["gap"],  # kept for the collection's first update only
            gap_max=gap_max,
            grad_norm=norm,
            skipped=float(self.skipped - skipped_before),
            peak_memory_mb=peak_mb(self.device),
            step_seconds=time.perf_counter() - t0,
            step_cpu_seconds=time.process_time() - c0,
            pt_teacher_bytes=float(wire_bytes(pt_teacher)) if pt_teacher is not None else None,
        )

    def minillm_step(self, shard: ScoredShard, alpha: float, pt_ids: torch.Tensor | None = None) -> dict[str, float]:
        """One MiniLLM update on this rank's shard: single-step (reverse KL, importance-weighted) + PPO-clipped
        long-term + pre-training LM loss (a collection of one batch, one epoch, one mini-batch)."""
        return self.minillm_collection(alpha, 1, len(shard), len(shard), [pt_ids], shard)[0]

    @torch.no_grad()
    def reverse_kl(self, shard: ScoredShard) -> tuple[float, float, int]:
        """Per-position KL[q || p] (exact with a dense teacher) summed over this shard's response tokens: a
        Rao-Blackwellised estimate of the sequence-level reverse KL when the responses were sampled from q.
        Returns (sum, tokens, sequences)."""
        p, dev = shard.packed, self.device
        where = p.mask.to(dev) > 0
        teacher = self._device_teacher(shard)
        hidden = gather_positions(self._hidden(p.input_ids, p.attention_mask), p.predict_pos.to(dev))[where]

        def fn(h: torch.Tensor, sl: slice) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            piece = expand_teacher(teacher[sl], self.teacher_head)
            kl = reverse_kl_per_token(self.lm_head.logits(h), piece, torch.ones(h.shape[0], device=dev))
            return kl.sum(), {}

        total, _ = self.lm_head.chunked(hidden, fn)
        return total.item(), float(where.sum().item()), int((p.mask.sum(-1) > 0).sum().item())
