"""The learner as 1..N Ray actors forming one torch.distributed group (FSDP2; gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import socket
from typing import Any

import ray
import torch

from common.data import LMBatch
from common.rollout import PackedRollouts
from learner.worker import LearnerWorker


class LearnerActor:
    """Ray-side shell: finds its rendezvous address, then builds the plain LearnerWorker."""

    def __init__(self) -> None:
        self.worker: LearnerWorker | None = None

    def rendezvous(self) -> str:
        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{host}:{port}"

    def setup(self, *args: Any, **kwargs: Any) -> bool:
        self.worker = LearnerWorker(*args, **kwargs)
        return True

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        assert self.worker is not None, "setup() first"
        result = getattr(self.worker, method)(*args, **kwargs)
        if method.endswith("_step") and self.worker.rank == 0:
            from actors import telemetry

            telemetry.record_update(result)
        return result


def _split(n: int, parts: int) -> list[slice]:
    if n % parts:
        raise ValueError(f"a batch of {n} cannot be split evenly over {parts} learner workers")
    size = n // parts
    return [slice(i * size, (i + 1) * size) for i in range(parts)]


def _slice_lm(batch: LMBatch, sl: slice) -> LMBatch:
    return LMBatch(batch.input_ids[sl], batch.attention_mask[sl], batch.loss_mask[sl])


def _slice_packed(p: PackedRollouts, sl: slice) -> PackedRollouts:
    return PackedRollouts(
        p.input_ids[sl], p.attention_mask[sl], p.predict_pos[sl], p.tokens[sl], p.mask[sl], p.old_logprobs[sl]
    )


def _mean_metrics(results: list[dict[str, float]]) -> dict[str, float]:
    out = {k: sum(r[k] for r in results) / len(results) for k in results[0]}
    for k in ("rho_min",):
        if k in out:
            out[k] = min(r[k] for r in results)
    for k in ("rho_max", "step_seconds"):
        if k in out:
            out[k] = max(r[k] for r in results)
    if "response_tokens" in out:
        out["response_tokens"] = sum(r["response_tokens"] for r in results)
    return out


class LearnerGroup:
    """Driver-side handle: splits each batch evenly over the workers and calls them together."""

    def __init__(
        self,
        num_workers: int,
        cpus: float,
        gpus: float,
        student_dir: str,
        learner_cfg,
        objective_cfg,
        vocab_size: int,
        dtype: str,
        seed: int,
        placements: list[dict] | None = None,
        threads: int | None = None,
    ):
        from actors.remote import thread_env

        cls = ray.remote(LearnerActor)
        env = thread_env(cpus, threads)
        placements = placements or [{}] * num_workers
        self.actors = [
            cls.options(
                name=f"learner-{r}", num_cpus=cpus, num_gpus=gpus, runtime_env={"env_vars": env}, **placements[r]
            ).remote()
            for r in range(num_workers)
        ]
        init_method = ray.get(self.actors[0].rendezvous.remote())
        ray.get(
            [
                a.setup.remote(
                    student_dir,
                    learner_cfg,
                    objective_cfg,
                    vocab_size,
                    rank,
                    num_workers,
                    init_method,
                    dtype=dtype,
                    seed=seed,
                )
                for rank, a in enumerate(self.actors)
            ]
        )
        self.n = num_workers

    def _all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        return ray.get([a.call.remote(method, *args, **kwargs) for a in self.actors])

    def sft_step(self, batch: LMBatch) -> dict[str, float]:
        return _mean_metrics(
            ray.get(
                [
                    a.call.remote("sft_step", _slice_lm(batch, sl))
                    for a, sl in zip(self.actors, _split(len(batch), self.n), strict=True)
                ]
            )
        )

    def kd_step(self, batch: LMBatch, teacher_logprobs: torch.Tensor) -> dict[str, float]:
        sls = _split(len(batch), self.n)
        return _mean_metrics(
            ray.get(
                [
                    a.call.remote("kd_step", _slice_lm(batch, sl), teacher_logprobs[sl])
                    for a, sl in zip(self.actors, sls, strict=True)
                ]
            )
        )

    def minillm_step(
        self, packed: PackedRollouts, teacher_logprobs: torch.Tensor, alpha: float, pt_ids: torch.Tensor | None
    ) -> dict[str, float]:
        sls = _split(packed.input_ids.shape[0], self.n)
        pts = [None] * self.n if pt_ids is None else [pt_ids[s] for s in _split(pt_ids.shape[0], self.n)]
        return _mean_metrics(
            ray.get(
                [
                    a.call.remote("minillm_step", _slice_packed(packed, sl), teacher_logprobs[sl], alpha, pt)
                    for a, sl, pt in zip(self.actors, sls, pts, strict=True)
                ]
            )
        )

    def eval_nll(self, batch: LMBatch) -> float:
        """Mean token NLL over the batch (token sums added across workers)."""
        res = ray.get(
            [
                a.call.remote("eval_nll", _slice_lm(batch, sl))
                for a, sl in zip(self.actors, _split(len(batch), self.n), strict=True)
            ]
        )
        return sum(r[0] for r in res) / max(sum(r[1] for r in res), 1.0)

    def reverse_kl(self, packed: PackedRollouts, teacher_logprobs: torch.Tensor) -> tuple[float, float, int]:
        """(sum of exact per-token KL[q || p], tokens, sequences) over the batch, added across workers."""
        sls = _split(packed.input_ids.shape[0], self.n)
        res = ray.get(
            [
                a.call.remote("reverse_kl", _slice_packed(packed, sl), teacher_logprobs[sl])
                for a, sl in zip(self.actors, sls, strict=True)
            ]
        )
        return sum(r[0] for r in res), sum(r[1] for r in res), sum(r[2] for r in res)

    def state_dict_ref(self) -> ray.ObjectRef:
        """Collective gather; returns the object-store ref of rank 0's full state dict (one batched push)."""
        refs = [a.call.remote("full_state_dict") for a in self.actors]
        ray.get(refs[1:])
        return refs[0]

    def weight_sync_address(self) -> tuple[str, int]:
        """A free address on rank 0's node for the weight group's store."""
        host, port = ray.get(self.actors[0].rendezvous.remote()).removeprefix("tcp://").rsplit(":", 1)
        return host, int(port)

    def init_weight_sender(self, host: str, port: int, world_size: int, backend: str) -> ray.ObjectRef:
        """Rank 0 joins the weight group; returns the ref (the samplers join concurrently, then wait on both)."""
        return self.actors[0].call.remote("init_weight_sender", host, port, world_size, backend)

    def push_weights(self, version: int) -> None:
        """All workers gather the full state dict; rank 0 broadcasts it to the samplers in the background."""
        self._all("push_weights", version)

    def wait_push(self) -> None:
        ray.get(self.actors[0].call.remote("wait_push"))

    def save(self, out_dir: str, tokenizer_dir: str | None) -> None:
        self._all("save", out_dir, tokenizer_dir)

    def load_state(self, student_dir: str) -> None:
        self._all("load_state", student_dir)

    def set_lr(self, lr: float) -> None:
        self._all("set_optimizer", lr)

    def shutdown(self) -> None:
        try:
            self._all("close")
        finally:
            for a in self.actors:
                ray.kill(a)
