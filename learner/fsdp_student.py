"""The student of one learner rank under FSDP2 in a torch.distributed group: set-up, optimizer, optimizer steps,
and its weights (gather, push to the samplers, save). Base of `LearnerWorker` (learner/worker.py), which adds
the update steps of every method."""

from __future__ import annotations

import math
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from common.config import LearnerConfig
from common.models import DTYPES, final_hidden_states, load_model


class FSDPStudent:
    def __init__(
        self,
        student_dir: str,
        learner: LearnerConfig,
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
        self.cfg = learner
        torch.manual_seed(seed)
        self.seed = seed
        compute = DTYPES[dtype]
        # fp32 master weights and optimizer state, compute in `dtype`, gradients reduced in fp32 (FSDP2 mixed
        # precision); master_weights=compute is plain low-precision training
        master = torch.float32 if learner.master_weights == "float32" else compute
        mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32) if compute != master else None
        model = load_model(student_dir, "float32").to(device=self.device, dtype=master)
        if learner.activation_checkpointing:  # each layer's inside recomputed in backward; before FSDP wraps it
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # a CPU learner on a GPU node needs an explicit CPU mesh: FSDP2's default mesh moves shards to CUDA whenever
        # a GPU is visible. Elsewhere the default mesh is the same one.
        cpu_on_gpu_node = self.device.type == "cpu" and torch.cuda.is_available()
        mesh = init_device_mesh("cpu", (world_size,)) if cpu_on_gpu_node else None
        for layer in getattr(getattr(model, "model", model), "layers", []):
            fully_shard(layer, mesh=mesh, mp_policy=mp or MixedPrecisionPolicy())
        fully_shard(model, mesh=mesh, mp_policy=mp or MixedPrecisionPolicy())
        self.model = model
        self.master_dtype, self.compute_dtype = master, compute
        self.head = model.get_output_embeddings()
        self.weight_sender = None  # set by init_weight_sender on rank 0 (learner.weight_sync=collective)
        self.reset_optimizer(learner.lr)
        self.steps = 0  # optimizer steps taken
        self.skipped = 0  # steps skipped for a non-finite loss or gradient

    # ----- set-up ------------------------------------------------------------------------------------
    def reset_optimizer(self, lr: float) -> None:
        """A fresh AdamW at `lr` (its state, Adam's moments, starts from zero): each training phase starts one."""
        # after an evaluation forward the root's parameters are unsharded tensors: the optimizer must hold the
        # sharded ones, or its state matches no parameter when a checkpoint maps it to names
        self._reshard()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=lr, weight_decay=self.cfg.weight_decay, betas=(0.9, 0.95)
        )

    def load_state(self, student_dir: str) -> None:
        """Reload weights from an HF folder in storage (e.g. the best SFT checkpoint) and reset the optimiser."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        from common import storage

        with storage.local_copy(student_dir) as folder:  # read from storage, never from another node's disk
            full = load_model(folder).state_dict()
        self._reshard()
        set_model_state_dict(self.model, full, options=StateDictOptions(full_state_dict=True))
        self.reset_optimizer(self.optimizer.param_groups[0]["lr"])

    def _reshard(self) -> None:
        # a forward without backward (evaluation) leaves the root's parameters unsharded (plain tensors), and
        # loading or gathering full tensors from that mix fails for tied embeddings: reshard everything first
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    # ----- collectives and optimizer steps -----------------------------------------------------------
    def _global_sum(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def _hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return final_hidden_states(self.model, input_ids.to(self.device), attention_mask.to(self.device))

    def _backward(self, loss: torch.Tensor) -> None:
        (loss * self.world_size).backward()  # FSDP averages gradients over ranks; the loss is already global

    def _step(self, loss: torch.Tensor | None = None, loss_value: float = 0.0) -> float:
        """Optimizer step on the accumulated gradients (after backward of `loss` when given); returns the gradient
        norm. A non-finite loss (any rank's `loss_value`) or norm skips the step: gradients dropped, weights and
        optimizer state untouched, `self.skipped` counts it (the caller reports it and does not push)."""
        if loss is not None:
            self.optimizer.zero_grad(set_to_none=True)
            self._backward(loss)
            loss_value = loss.item()
        clip = self.cfg.grad_clip if self.cfg.grad_clip is not None else float("inf")
        total = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)  # global over ranks (DTensors)
        norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
        finite = math.isfinite(norm) and math.isfinite(self._global_sum(loss_value))
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            return norm
        self.optimizer.step()
        self.steps += 1
        return norm

    # ----- weights -----------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Collective: every worker must call it; rank 0 gets the full CPU state dict, the others None."""
        self._reshard()
        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if self.rank == 0 else None

    def _to_compute(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Floating tensors in the compute dtype: the samplers' engines run in it, so fp32 masters would only double
        the bytes of a push (bf16: half)."""
        return {k: v.to(self.compute_dtype) if v.is_floating_point() else v for k, v in sd.items()}

    def push_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Collective: full_state_dict in the compute dtype (what an object-store weight push sends)."""
        sd = self.full_state_dict()
        return self._to_compute(sd) if sd is not None else None

    def init_weight_sender(
        self, host: str, port: int, world_size: int, backend: str, name: str = "minillm-weights"
    ) -> bool:
        """Rank 0 joins the weight group (itself + the samplers) as its sender; collective with the samplers. A
        group formed before (a sampler restarted since) is left first: its push under way, if any, is dropped."""
        from common.weight_sync import WeightGroup, WeightSender

        if self.weight_sender is not None:
            self.weight_sender.abandon()
            self.weight_sender = None
        self.weight_sender = WeightSender(WeightGroup(host, port, 0, world_size, backend, name=name))
        return True

    def push_weights(self, version: int) -> bool:
        """Collective over the learner workers (they gather the full state dict); rank 0 broadcasts it packed to
        the samplers on a background thread, so the next update can start while it transfers."""
        self._reshard()
        options = StateDictOptions(full_state_dict=True, cpu_offload=self.device.type == "cpu")
        sd = get_model_state_dict(self.model, options=options)
        if self.rank == 0:
            assert self.weight_sender is not None, "init_weight_sender first"
            self.weight_sender.send(self._to_compute(sd).items(), version, background=True)
        return True

    def wait_push(self) -> bool:
        if self.weight_sender is not None:
            self.weight_sender.wait()
        return True

    def save(self, out_dir: str, tokenizer_dir: str | None = None, dtype: str | None = None) -> str | None:
        """Collective. Rank 0 writes an HF folder (atomically, `out_dir` in durable storage: a path or a URL) that
        transformers and vLLM load as they are: the master weights, or cast to `dtype` (checkpoint.save_dtype)."""
        from transformers import AutoModelForCausalLM

        from common.models import load_tokenizer, save_hf_to

        sd = self.full_state_dict()
        if self.rank != 0 or sd is None:
            return None
        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(self.model.config)
        fresh = fresh.to_empty(device="cpu")
        fresh.load_state_dict(sd, assign=True)
        if dtype is not None:
            fresh = fresh.to(DTYPES[dtype])
        tok = load_tokenizer(tokenizer_dir) if tokenizer_dir else None
        save_hf_to(fresh, tok, out_dir)  # straight into durable storage, by the rank that has the weights
        return out_dir

    def close(self) -> None:
        if self.weight_sender is not None:
            self.weight_sender.group.close()
        if dist.is_initialized():
            dist.destroy_process_group()
