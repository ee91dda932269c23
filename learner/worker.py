"""One learner worker: the student under FSDP2 in a torch.distributed group, its optimiser, and the
update steps of every method (SFT, word-level KD, MiniLLM). Plain class: Ray wraps it in learner/group.py.

Every worker gets an equal slice of each batch; FSDP averages gradients across workers, so N workers on
a batch give the same step as one worker on the whole batch (the per-sequence reduction makes each
worker's loss a mean over its slice).
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from common.config import LearnerConfig, ObjectiveConfig
from common.data import LMBatch
from common.models import load_model
from common.rollout import PackedRollouts, gather_positions
from learner.objectives import (
    minillm_token_losses,
    mixture_logprob,
    reduce_losses,
    reverse_kl_per_token,
    token_nll,
    word_kd_token_losses,
)


def _log_softmax_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    # padded embedding rows beyond the tokenizer are not real tokens: drop them before normalising
    return torch.log_softmax(logits[..., :vocab_size].float(), dim=-1)


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
        lr: float | None = None,
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
        self.weight_sender = None  # set by init_weight_sender on rank 0 (learner.weight_sync=collective)
        self.set_optimizer(lr or learner.lr)
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
        # a forward without backward (evaluation) leaves the root's parameters unsharded (plain tensors), and
        # loading full tensors into that mix fails for tied embeddings: reshard everything first
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
        set_model_state_dict(self.model, full, options=StateDictOptions(full_state_dict=True))
        self.set_optimizer(self.optimizer.param_groups[0]["lr"])

    # ----- steps -------------------------------------------------------------------------------------
    def _logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
        return out.logits

    def _step(self, loss: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = 0.0
        if self.cfg.grad_clip is not None:
            total = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
        self.optimizer.step()
        self.steps += 1
        return norm

    def _lm_loss(self, batch: LMBatch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self._logits(batch.input_ids, batch.attention_mask)[:, :-1]
        logp = _log_softmax_vocab(logits, self.vocab_size)
        mask = batch.loss_mask.to(self.device)
        nll = token_nll(logp, batch.input_ids[:, 1:].to(self.device), mask)
        return reduce_losses(nll, mask, self.obj.reduction), (nll * mask).sum()

    def _pt_loss(self, pt_ids: torch.Tensor | None) -> torch.Tensor:
        if pt_ids is None or self.obj.pt_weight == 0:
            return torch.zeros((), device=self.device)
        ones = torch.ones_like(pt_ids)
        batch = LMBatch(pt_ids, ones, ones[:, 1:].float())
        return self._lm_loss(batch)[0]

    def sft_step(self, batch: LMBatch) -> dict[str, float]:
        t0 = time.perf_counter()
        loss, _ = self._lm_loss(batch)
        norm = self._step(loss)
        return {"loss": loss.item(), "grad_norm": norm, "step_seconds": time.perf_counter() - t0}

    @torch.no_grad()
    def eval_nll(self, batch: LMBatch) -> tuple[float, float]:
        """Sum of token NLL and token count on this worker's slice (the caller adds across workers)."""
        _, total = self._lm_loss(batch)
        return total.item(), batch.loss_mask.sum().item()

    def kd_step(self, batch: LMBatch, teacher_logprobs: torch.Tensor) -> dict[str, float]:
        """Word-level KD: kd_ratio * forward KL[p || q] + (1 - kd_ratio) * NLL on ground-truth responses.
        `teacher_logprobs` is [B, L-1, V] at the same (shifted) positions as `batch.loss_mask`."""
        t0 = time.perf_counter()
        logits = self._logits(batch.input_ids, batch.attention_mask)[:, :-1]
        logp = _log_softmax_vocab(logits, self.vocab_size)
        mask = batch.loss_mask.to(self.device)
        kd = word_kd_token_losses(logp, teacher_logprobs.to(self.device), mask)
        nll = token_nll(logp, batch.input_ids[:, 1:].to(self.device), mask)
        r = self.obj.kd_ratio
        loss = reduce_losses(r * kd + (1 - r) * nll, mask, self.obj.reduction)
        norm = self._step(loss)
        return {
            "loss": loss.item(),
            "kd": reduce_losses(kd, mask, self.obj.reduction).item(),
            "nll": reduce_losses(nll, mask, self.obj.reduction).item(),
            "grad_norm": norm,
            "step_seconds": time.perf_counter() - t0,
        }

    def minillm_step(
        self, packed: PackedRollouts, teacher_logprobs: torch.Tensor, alpha: float, pt_ids: torch.Tensor | None = None
    ) -> dict[str, float]:
        """One MiniLLM update: single-step (exact reverse KL, importance-weighted) + PPO-clipped long-term
        + pre-training LM loss. `teacher_logprobs` is [B, T, V] at the response positions."""
        t0 = time.perf_counter()
        logits = self._logits(packed.input_ids, packed.attention_mask)
        student = gather_positions(logits, packed.predict_pos.to(self.device))[..., : self.vocab_size]
        mask = packed.mask.to(self.device)
        teacher = teacher_logprobs.to(self.device)
        single, long = minillm_token_losses(
            student.float(),
            teacher,
            packed.tokens.to(self.device),
            mask,
            packed.old_logprobs.to(self.device),
            alpha,
            self.obj.clip_eps,
            length_norm=self.obj.length_norm,
        )
        l_single = reduce_losses(single, mask, self.obj.reduction)
        l_long = reduce_losses(long, mask, self.obj.reduction)
        l_pt = self._pt_loss(pt_ids)
        loss = self.obj.single_weight * l_single + self.obj.long_weight * l_long + self.obj.pt_weight * l_pt
        with torch.no_grad():
            logq = torch.log_softmax(student.float(), -1)
            logq_y = logq.gather(-1, packed.tokens.to(self.device).unsqueeze(-1)).squeeze(-1)
            logp_y = teacher.gather(-1, packed.tokens.to(self.device).unsqueeze(-1)).squeeze(-1)
            old = packed.old_logprobs.to(self.device)
            rho = torch.exp(logq_y - mixture_logprob(logp_y, old, alpha))[mask > 0]
            rkl = reduce_losses(reverse_kl_per_token(student.float(), teacher, mask), mask, "token")
        norm = self._step(loss)
        n_tok = mask.sum().item()
        return {
            "loss": loss.item(),
            "loss_single": l_single.item(),
            "loss_long": l_long.item(),
            "loss_pt": l_pt.item(),
            "reverse_kl": rkl.item(),
            "rho_min": rho.min().item() if n_tok else 1.0,
            "rho_max": rho.max().item() if n_tok else 1.0,
            "rho_mean": rho.mean().item() if n_tok else 1.0,
            "response_tokens": n_tok,
            "grad_norm": norm,
            "step_seconds": time.perf_counter() - t0,
        }

    @torch.no_grad()
    def reverse_kl(self, packed: PackedRollouts, teacher_logprobs: torch.Tensor) -> tuple[float, float, int]:
        """Exact per-position KL[q || p] summed over this slice's response tokens (a Rao-Blackwellised
        estimate of the sequence-level reverse KL when the responses were sampled from q): (sum, tokens, seqs)."""
        logits = self._logits(packed.input_ids, packed.attention_mask)
        student = gather_positions(logits, packed.predict_pos.to(self.device))[..., : self.vocab_size]
        mask = packed.mask.to(self.device)
        kl = reverse_kl_per_token(student.float(), teacher_logprobs.to(self.device), mask)
        return kl.sum().item(), mask.sum().item(), int((mask.sum(-1) > 0).sum().item())

    # ----- weights -----------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Collective: every worker must call it; rank 0 gets the full CPU state dict, the others None."""
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
        options = StateDictOptions(full_state_dict=True, cpu_offload=self.device.type == "cpu")
        sd = get_model_state_dict(self.model, options=options)
        if self.rank == 0:
            self.weight_sender.send(sd.items(), version, background=True)
        return True

    def wait_push(self) -> bool:
        if self.weight_sender is not None:
            self.weight_sender.wait()
        return True

    def save(self, out_dir: str, tokenizer_dir: str | None = None) -> str | None:
        """Collective. Rank 0 writes an HF folder (atomically) that transformers and vLLM load as they are."""
        from common.models import load_tokenizer, save_hf

        sd = self.full_state_dict()
        if self.rank != 0 or sd is None:
            return None
        inner = self.model
        config = inner.config
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(config)
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


def local_init_method() -> str:
    """A TCP rendezvous on this host (a free port picked by the OS)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    host = os.environ.get("MINILLM_MASTER_ADDR", "127.0.0.1")
    return f"tcp://{host}:{port}"
