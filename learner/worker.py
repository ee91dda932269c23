"""One learner worker: the student under FSDP2 in a torch.distributed group, its optimiser, and the update steps
of every method (SFT, word-level KD, MiniLLM). Plain class: Ray wraps it in learner/group.py.

Only what a loss needs is computed: one forward gives the final hidden states, and the LM head, the log-softmax
and every vocabulary-wide term run only at the positions that predict a target, in chunks of
`learner.logit_chunk_tokens` positions. With more than one chunk each chunk is recomputed in the backward pass
(activation checkpointing), so no [tokens, V] tensor larger than one chunk is ever alive: memory is flat in the
response length. Metrics come from the same chunks (no second pass).

Normalisation: every loss is a weighted sum of per-token terms whose weights use the whole mini-batch's totals
(tokens, sequences), summed over ranks first; FSDP averages gradients over the N ranks, so each rank scales its
sum by N. The update is then the same for any number of workers, whatever the response lengths.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.utils.checkpoint import checkpoint

from common.config import LearnerConfig, ObjectiveConfig
from common.data import LMBatch
from common.logprobs import TopKLogprobs
from common.models import final_hidden_states, load_model
from common.rollout import ScoredShard, gather_positions
from learner.objectives import (
    minillm_token_losses,
    reverse_kl_per_token,
    sequence_future_reward,
    token_nll,
    token_weights,
    word_kd_token_losses,
)

# per chunk: (loss to differentiate, detached per-token values to keep as metrics)
ChunkFn = Callable[[torch.Tensor, slice], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class LearnerWorker:
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
    ):
        backend = learner.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else "cpu")
        if not dist.is_initialized():
            dist.init_process_group(
                backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timedelta(minutes=10)
            )
        self.rank, self.world_size = rank, world_size
        self.cfg, self.obj, self.vocab_size = learner, objective, vocab_size
        torch.manual_seed(seed)
        model = load_model(student_dir, dtype).to(self.device)
        # a CPU learner on a GPU node needs an explicit CPU mesh: FSDP2's default mesh moves shards to CUDA whenever
        # a GPU is visible. Elsewhere the default mesh is the same one.
        cpu_on_gpu_node = self.device.type == "cpu" and torch.cuda.is_available()
        mesh = init_device_mesh("cpu", (world_size,)) if cpu_on_gpu_node else None
        for layer in getattr(getattr(model, "model", model), "layers", []):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.model = model
        self.head = model.get_output_embeddings()
        self.weight_sender = None  # set by init_weight_sender on rank 0 (learner.weight_sync=collective)
        self.set_optimizer(learner.lr)
        self.steps = 0

    # ----- set-up ------------------------------------------------------------------------------------
    def set_optimizer(self, lr: float) -> None:
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=lr, weight_decay=self.cfg.weight_decay, betas=(0.9, 0.95)
        )

    def load_state(self, student_dir: str) -> None:
        """Reload weights from an HF folder (e.g. the best SFT checkpoint) and reset the optimiser."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        full = load_model(student_dir).state_dict()
        self._reshard()
        set_model_state_dict(self.model, full, options=StateDictOptions(full_state_dict=True))
        self.set_optimizer(self.optimizer.param_groups[0]["lr"])

    def _reshard(self) -> None:
        # a forward without backward (evaluation) leaves the root's parameters unsharded (plain tensors), and
        # loading or gathering full tensors from that mix fails for tied embeddings: reshard everything first
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    # ----- the shared machinery ----------------------------------------------------------------------
    def _global_sum(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return final_hidden_states(self.model, input_ids.to(self.device), attention_mask.to(self.device))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)[..., : self.vocab_size]

    def _chunked(self, hidden: torch.Tensor, fn: ChunkFn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Sum fn's loss over chunks of `hidden` [N, H] rows and concatenate its metrics. Several chunks are each
        recomputed in backward (checkpointed), so at most one chunk's logits are alive at a time."""
        n, size = hidden.shape[0], self.cfg.logit_chunk_tokens
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

    def _step(self, loss: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        (loss * self.world_size).backward()  # FSDP averages gradients over ranks; the loss is already global
        norm = 0.0
        if self.cfg.grad_clip is not None:
            total = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
        self.optimizer.step()
        self.steps += 1
        return norm

    def _weights(self, mask: torch.Tensor, mode: str) -> torch.Tensor:
        """Per-token weights [B, T] of this rank's part, normalised by the whole mini-batch (all ranks)."""
        tokens = self._global_sum(float(mask.sum()))
        seqs = self._global_sum(float((mask.sum(-1) > 0).sum()))
        return token_weights(mask.float(), mode, tokens, seqs).to(self.device)

    def _lm_terms(
        self, batch: LMBatch, mode: str, teacher: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted NLL (and, with a KD teacher [N, V], the weighted forward KL) at the target positions."""
        mask = batch.loss_mask
        where = mask.to(self.device) > 0
        hidden = self._hidden(batch.input_ids, batch.attention_mask)[:, :-1][where]
        targets = batch.input_ids[:, 1:].to(self.device)[where]
        weights = self._weights(mask, mode)[where]
        kd_teacher = teacher.to(self.device) if teacher is not None else None
        r = self.obj.kd_ratio

        def fn(h: torch.Tensor, sl: slice) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            logits = self._logits(h)
            ones = torch.ones(h.shape[0], device=self.device)
            nll = token_nll(logits, targets[sl], ones)
            if kd_teacher is None:
                return (weights[sl] * nll).sum(), {"nll": nll.detach()}
            kd = word_kd_token_losses(logits, kd_teacher[sl], ones)
            return (weights[sl] * (r * kd + (1 - r) * nll)).sum(), {"nll": nll.detach(), "kd": kd.detach()}

        return self._chunked(hidden, fn)

    # ----- steps -------------------------------------------------------------------------------------
    def sft_step(self, batch: LMBatch) -> dict[str, float]:
        """NLL on ground-truth (or teacher-sampled, for SeqKD) responses. Returns this rank's share of the global
        loss (ranks' shares add up) and its token count."""
        t0 = time.perf_counter()
        loss, m = self._lm_terms(batch, self.obj.reduction)
        norm = self._step(loss)
        return {
            "loss": loss.item(),
            "grad_norm": norm,
            "tokens": float(m["nll"].numel()),
            "step_seconds": time.perf_counter() - t0,
        }

    def kd_step(self, batch: LMBatch, teacher_logprobs: torch.Tensor) -> dict[str, float]:
        """Word-level KD: kd_ratio * forward KL[p || q] + (1 - kd_ratio) * NLL on ground-truth responses.
        `teacher_logprobs` is [N, V] at this rank's target positions (row-major over `batch.loss_mask`)."""
        t0 = time.perf_counter()
        loss, m = self._lm_terms(batch, self.obj.reduction, teacher_logprobs)
        norm = self._step(loss)
        return {
            "loss": loss.item(),
            "kd_sum": m["kd"].sum().item(),
            "nll_sum": m["nll"].sum().item(),
            "tokens": float(m["nll"].numel()),
            "grad_norm": norm,
            "step_seconds": time.perf_counter() - t0,
        }

    @torch.no_grad()
    def eval_nll(self, batch: LMBatch) -> tuple[float, float]:
        """Sum of token NLL and token count on this worker's slice (the caller adds across workers)."""
        _, m = self._lm_terms(batch, "token")
        return m["nll"].sum().item(), float(m["nll"].numel())

    def _pt_loss(self, pt_ids: torch.Tensor | None) -> torch.Tensor:
        if pt_ids is None or self.obj.pt_weight == 0:
            return torch.zeros((), device=self.device)
        ones = torch.ones_like(pt_ids)
        return self._lm_terms(LMBatch(pt_ids, ones, ones[:, 1:].float()), "token")[0]

    def minillm_step(self, shard: ScoredShard, alpha: float, pt_ids: torch.Tensor | None = None) -> dict[str, float]:
        """One MiniLLM update: single-step (reverse KL, importance-weighted) + PPO-clipped long-term + pre-training
        LM loss, on this rank's shard of the scored batch."""
        t0 = time.perf_counter()
        p, dev = shard.packed, self.device
        where = p.mask.to(dev) > 0
        old = p.old_logprobs.to(dev)
        teacher_y = shard.teacher_token_logprobs.to(dev)
        # R_{t+1} needs whole sequences; it uses no logits, so it is computed up front and the rest goes by chunks
        reward = torch.where(where, teacher_y - old, torch.zeros_like(old))
        future = sequence_future_reward(reward, where.float(), self.obj.length_norm)[where]
        weights = self._weights(p.mask, self.obj.reduction)[where]
        tokens, old, teacher_y = p.tokens.to(dev)[where], old[where], teacher_y[where]
        teacher = shard.teacher
        teacher = (
            teacher.to(dev)
            if isinstance(teacher, torch.Tensor)
            else TopKLogprobs(teacher.ids.to(dev), teacher.logprobs.to(dev), teacher.tail.to(dev))
        )
        hidden = gather_positions(self._hidden(p.input_ids, p.attention_mask), p.predict_pos.to(dev))[where]
        o = self.obj

        def fn(h: torch.Tensor, sl: slice) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            ones = torch.ones(h.shape[0], device=dev)
            terms = minillm_token_losses(
                self._logits(h),
                teacher[sl],
                tokens[sl],
                ones,
                old[sl],
                alpha,
                o.clip_eps,
                teacher_token_logprobs=teacher_y[sl],
                future_reward=future[sl],
            )
            w = weights[sl]
            loss = o.single_weight * (w * terms.single).sum() + o.long_weight * (w * terms.long).sum()
            return loss, {
                "single": (w * terms.single).detach(),
                "long": (w * terms.long).detach(),
                "kl": terms.kl,
                "rho": terms.rho,
            }

        loss, m = self._chunked(hidden, fn)
        l_pt = self._pt_loss(pt_ids)
        total = loss + o.pt_weight * l_pt
        norm = self._step(total)
        n_tok = int(where.sum().item())
        rho = m["rho"] if n_tok else torch.ones(1)
        return {
            "loss": total.item(),
            "loss_single": m["single"].sum().item(),
            "loss_long": m["long"].sum().item(),
            "loss_pt": l_pt.item(),
            "kl_sum": m["kl"].sum().item(),
            "rho_min": rho.min().item(),
            "rho_max": rho.max().item(),
            "rho_sum": m["rho"].sum().item(),
            "tokens": float(n_tok),
            "grad_norm": norm,
            "step_seconds": time.perf_counter() - t0,
        }

    @torch.no_grad()
    def reverse_kl(self, shard: ScoredShard) -> tuple[float, float, int]:
        """Per-position KL[q || p] (exact with a dense teacher) summed over this shard's response tokens: a
        Rao-Blackwellised estimate of the sequence-level reverse KL when the responses were sampled from q.
        Returns (sum, tokens, sequences)."""
        p, dev = shard.packed, self.device
        where = p.mask.to(dev) > 0
        teacher = shard.teacher
        teacher = (
            teacher.to(dev)
            if isinstance(teacher, torch.Tensor)
            else TopKLogprobs(teacher.ids.to(dev), teacher.logprobs.to(dev), teacher.tail.to(dev))
        )
        hidden = gather_positions(self._hidden(p.input_ids, p.attention_mask), p.predict_pos.to(dev))[where]

        def fn(h: torch.Tensor, sl: slice) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            kl = reverse_kl_per_token(self._logits(h), teacher[sl], torch.ones(h.shape[0], device=dev))
            return kl.sum(), {}

        total, _ = self._chunked(hidden, fn)
        return total.item(), float(where.sum().item()), int((p.mask.sum(-1) > 0).sum().item())

    # ----- weights -----------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Collective: every worker must call it; rank 0 gets the full CPU state dict, the others None."""
        self._reshard()
        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if self.rank == 0 else None

    def init_weight_sender(self, host: str, port: int, world_size: int, backend: str) -> bool:
        """Rank 0 joins the weight group (itself + the samplers) as its sender; collective with the samplers."""
        from common.weight_sync import WeightGroup, WeightSender

        self.weight_sender = WeightSender(WeightGroup(host, port, 0, world_size, backend))
        return True

    def push_weights(self, version: int) -> bool:
        """Collective over the learner workers (they gather the full state dict); rank 0 broadcasts it packed to
        the samplers on a background thread, so the next update can start while it transfers."""
        self._reshard()
        options = StateDictOptions(full_state_dict=True, cpu_offload=self.device.type == "cpu")
        sd = get_model_state_dict(self.model, options=options)
        if self.rank == 0:
            assert self.weight_sender is not None, "init_weight_sender first"
            self.weight_sender.send(sd.items(), version, background=True)
        return True

    def wait_push(self) -> bool:
        if self.weight_sender is not None:
            self.weight_sender.wait()
        return True

    def save(self, out_dir: str, tokenizer_dir: str | None = None) -> str | None:
        """Collective. Rank 0 writes an HF folder (atomically) that transformers and vLLM load as they are."""
        from transformers import AutoModelForCausalLM

        from common.models import load_tokenizer, save_hf

        sd = self.full_state_dict()
        if self.rank != 0 or sd is None:
            return None
        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(self.model.config)
        fresh = fresh.to_empty(device="cpu")
        fresh.load_state_dict(sd, assign=True)
        tok = load_tokenizer(tokenizer_dir) if tokenizer_dir else None
        save_hf(fresh, tok, out_dir)
        return out_dir

    def close(self) -> None:
        if self.weight_sender is not None:
            self.weight_sender.group.close()
        if dist.is_initialized():
            dist.destroy_process_group()
