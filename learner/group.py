"""The learner as 1..N Ray actors forming one torch.distributed group (FSDP2; gloo on CPU, NCCL on GPU).

`LearnerActor` is the worker made remote (plus dashboard metrics); `LearnerGroup` is the driver's handle. Every
step takes one input per rank — ObjectRefs produced by the teacher (each rank fetches only its own shard) or
values — and returns one small dict of metrics: each rank reports its share of the global sums, added up here.

Every wait on the ranks is bounded (`timeout_s`) and fails fast: a rank that dies raises `LearnerFailed` at once,
even while its peers sit in a collective waiting for it (they cannot go on without it; the driver then replaces the
whole group, see learner/recovery.py).
"""

from __future__ import annotations

import socket
import time
from typing import Any

import ray
import torch

from common.config import LearnerConfig, ObjectiveConfig
from common.data import LMBatch
from common.errors import one_line_error
from common.rollout import ScoredShard, shard_rows
from learner.update_stats import RankUpdate
from learner.worker import LearnerWorker

Ref = Any  # a ray.ObjectRef, resolved by Ray into the value before the method runs


class LearnerFailed(RuntimeError):
    """A learner rank died, or the ranks did not answer in time: the group cannot go on (the message says which)."""


def free_address() -> str:
    """A free TCP address on this node for the group's rendezvous."""
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return f"tcp://{ray.util.get_node_ip_address()}:{port}"


class LearnerActor(LearnerWorker):
    """The worker inside a Ray actor: update results also feed the dashboard's metrics (rank 0)."""

    def __init__(self, init_method: Ref, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, init_method=init_method, **kwargs)

    def rendezvous_address(self) -> str:
        return free_address()

    def _record(self, result: dict[str, float]) -> dict[str, float]:
        if self.rank == 0:
            from actors import telemetry

            telemetry.record_update(result)
        return result

    def sft_step(self, batch: LMBatch, lr: float | None = None) -> dict[str, float]:
        return self._record(super().sft_step(batch, lr))

    def kd_step(self, batch: LMBatch, teacher_logprobs: torch.Tensor, lr: float | None = None) -> dict[str, float]:
        return self._record(super().kd_step(batch, teacher_logprobs, lr))

    def minillm_collection(self, *args: Any, **kwargs: Any) -> list[dict[str, float]]:
        if kwargs.get("pt_teacher") is not None:  # references inside a list are not resolved by Ray: fetch them
            kwargs["pt_teacher"] = ray.get(kwargs["pt_teacher"])
        results = super().minillm_collection(*args, **kwargs)
        for r in results:
            self._record(r)
        return results


class LearnerGroup:
    """Driver-side handle on the learner ranks: one method per call the driver makes on them (each fans the call
    out to every rank and turns a dead rank into LearnerFailed), which is why it has more than a dozen."""

    def __init__(
        self,
        num_workers: int,
        cpus: float,
        gpus: float,
        student_dir: str,
        learner_cfg: LearnerConfig,
        objective_cfg: ObjectiveConfig,
        vocab_size: int,
        dtype: str,
        seed: int,
        placements: list[dict] | None = None,
        threads: int | None = None,
        timeout_s: float | None = None,
        teacher_dir: str | None = None,  # teacher.transport=hidden: each rank loads the teacher's output layer
    ):
        from actors.remote import thread_env

        self.timeout_s = timeout_s
        placements = placements or [{}] * num_workers
        # the rendezvous address must be on rank 0's node: a zero-CPU task placed like rank 0 picks it
        address = ray.remote(num_cpus=0)(free_address).options(**placements[0]).remote()
        cls = ray.remote(LearnerActor)
        self.actors = [
            cls.options(
                name=f"learner-{r}",
                num_cpus=cpus,
                num_gpus=gpus,
                runtime_env={"env_vars": thread_env(cpus, threads)},
                **placements[r],
            ).remote(
                address,
                student_dir,
                learner_cfg,
                objective_cfg,
                vocab_size,
                rank=r,
                world_size=num_workers,
                dtype=dtype,
                seed=seed,
                teacher_dir=teacher_dir,
            )
            for r in range(num_workers)
        ]
        self.n = num_workers
        self._get([a.__ray_ready__.remote() for a in self.actors])

    # ----- waiting on the ranks ----------------------------------------------------------------------
    def _get(self, refs: list[Ref], fetch: bool = True) -> list[Any]:
        """ray.get over one ref per rank (refs[i] from rank i), but a failed rank raises as soon as it fails (its
        peers may be blocked in a collective for good) and the whole wait is bounded by `timeout_s`.
        `fetch=False` only waits (values stay in the object store) and returns []."""
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        pending = list(refs)
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=left, fetch_local=fetch)
            if not ready:
                waiting = [i for i, r in enumerate(refs) if r in pending]
                raise LearnerFailed(f"learner rank(s) {waiting} did not answer within {self.timeout_s:g}s")
            if fetch:
                try:
                    ray.get(ready[0])
                except ray.exceptions.RayError as exc:
                    raise self._failure(exc, refs.index(ready[0])) from exc
        return ray.get(list(refs)) if fetch else []

    def _failure(self, exc: ray.exceptions.RayError, rank: int) -> BaseException:
        """A rank's error as LearnerFailed when a rank is dead (this one, or a peer whose death made this one's
        collective fail); an exception of a live group is the code's own and is raised as it is."""
        if isinstance(exc, ray.exceptions.RayActorError):
            return LearnerFailed(f"learner rank {rank} died ({one_line_error(exc)})")
        dead = self.dead_ranks()
        if dead:
            return LearnerFailed(f"learner rank {dead[0]} died (rank {rank}: {one_line_error(exc)})")
        return exc

    def dead_ranks(self, wait_s: float = 10.0) -> list[int]:
        """The ranks Ray reports dead. A live rank busy in a collective does not answer within `wait_s`; it
        counts as alive."""
        probes = [a.__ray_ready__.remote() for a in self.actors]
        ray.wait(probes, num_returns=len(probes), timeout=wait_s)
        dead = []
        for r, probe in enumerate(probes):
            try:
                ray.get(probe, timeout=0)
            except ray.exceptions.RayActorError:
                dead.append(r)
            except ray.exceptions.GetTimeoutError:
                pass
        return dead

    def _each(self, method: str, *args: Any) -> list[Any]:
        return self._get([getattr(a, method).remote(*args) for a in self.actors])

    def call_each(self, fn: Any, *args: Any) -> list[Any]:
        """`fn(worker, *args)` on every rank (Ray's __ray_call__), waited on like the steps."""
        return self._get([a.__ray_call__.remote(fn, *args) for a in self.actors])

    def split(self, batch: LMBatch) -> list[LMBatch]:
        """One equal row slice of an LM batch per rank."""
        return [
            LMBatch(batch.input_ids[s], batch.attention_mask[s], batch.loss_mask[s])
            for s in shard_rows(len(batch), self.n)
        ]

    # ----- steps: one input per rank -----------------------------------------------------------------
    def sft_step(self, parts: list[LMBatch | Ref], lr: float | None = None) -> dict[str, float]:
        return RankUpdate.reduce(self._get([a.sft_step.remote(p, lr) for a, p in zip(self.actors, parts, strict=True)]))

    def kd_step(
        self, parts: list[LMBatch | Ref], teacher: list[torch.Tensor | Ref], lr: float | None = None
    ) -> dict[str, float]:
        return RankUpdate.reduce(
            self._get([a.kd_step.remote(p, t, lr) for a, p, t in zip(self.actors, parts, teacher, strict=True)])
        )

    def minillm_collection(
        self,
        shards: list[list[ScoredShard | Ref]],
        alpha: float,
        epochs: int,
        minibatch_size: int,
        micro_batch_size: int | None,
        pt_batches: list[torch.Tensor | None],
        lrs: list[float] | None = None,
        pt_teacher: list[list[Ref]] | None = None,
    ) -> list[dict[str, float]]:
        """Every update of one collection (`shards[b][r]`: sampled batch b's shard for rank r): `epochs` passes in
        mini-batches of `minibatch_size` sequences (split over the ranks), micro-batches of `micro_batch_size` per
        rank, update i at lr `lrs[i]`; `pt_teacher[i][r]`: the teacher's log-probs on rank r's part of update i's
        pre-training block (objective.pt_kd_ratio > 0; the parts `pretrain_parts` cuts). One metrics dict per
        update."""
        rows = minibatch_size // self.n
        micro = micro_batch_size or rows
        parts = [self.pretrain_parts(pt) for pt in pt_batches]
        pts = [[None if part is None else part[r] for part in parts] for r in range(self.n)]
        per_rank = self._get(
            [
                a.minillm_collection.remote(
                    alpha,
                    epochs,
                    rows,
                    micro,
                    pts[r],
                    *[batch[r] for batch in shards],
                    lrs=lrs,
                    pt_teacher=[update[r] for update in pt_teacher] if pt_teacher is not None else None,
                )
                for r, a in enumerate(self.actors)
            ]
        )
        return [RankUpdate.reduce([updates[i] for updates in per_rank]) for i in range(len(per_rank[0]))]

    def pretrain_parts(self, pt_ids: torch.Tensor | None) -> list[torch.Tensor] | None:
        """The rows of a pre-training block each rank takes."""
        if pt_ids is None:
            return None
        return [pt_ids[sl] for sl in shard_rows(len(pt_ids), self.n)]

    def eval_nll(self, batch: LMBatch) -> tuple[float, float]:
        """(sum of token NLL, tokens) over the batch, added across ranks."""
        res = self._get([a.eval_nll.remote(p) for a, p in zip(self.actors, self.split(batch), strict=True)])
        return sum(r[0] for r in res), sum(r[1] for r in res)

    def reverse_kl(self, shards: list[ScoredShard | Ref]) -> tuple[float, float, int]:
        """(sum of per-token KL[q || p], tokens, sequences) over the batch, added across ranks."""
        res = self._get([a.reverse_kl.remote(s) for a, s in zip(self.actors, shards, strict=True)])
        return sum(r[0] for r in res), sum(r[1] for r in res), sum(r[2] for r in res)

    # ----- weights -----------------------------------------------------------------------------------
    def state_dict_ref(self) -> ray.ObjectRef:
        """Collective gather; returns the object-store ref of rank 0's full state dict (one batched push)."""
        refs = [a.push_state_dict.remote() for a in self.actors]  # in the compute dtype, not fp32 masters
        self._get(refs, fetch=False)
        self._get([self.actors[0].__ray_ready__.remote()])  # rank 0 alive: its ref holds weights, not an error
        return refs[0]

    def weight_sync_address(self) -> tuple[str, int]:
        """A free address on rank 0's node for the weight group's store."""
        addr = self._get([self.actors[0].rendezvous_address.remote()])[0]
        host, port = addr.removeprefix("tcp://").rsplit(":", 1)
        return host, int(port)

    def init_weight_sender(
        self, host: str, port: int, world_size: int, backend: str, name: str = "minillm-weights"
    ) -> ray.ObjectRef:
        """Rank 0 joins the weight group; returns the ref (the samplers join concurrently, then wait on both)."""
        return self.actors[0].init_weight_sender.remote(host, port, world_size, backend, name)

    def push_weights(self, version: int) -> None:
        """All ranks gather the full state dict; rank 0 broadcasts it to the samplers in the background."""
        self._each("push_weights", version)

    def save(self, out_dir: str, tokenizer_dir: str | None, dtype: str | None = None) -> None:
        self._each("save", out_dir, tokenizer_dir, dtype)

    def load_state(self, student_dir: str) -> None:
        self._each("load_state", student_dir)

    def reset_optimizer(self, lr: float) -> None:
        """A fresh optimizer at `lr` on every rank (its state starts from zero)."""
        self._each("reset_optimizer", lr)

    def shutdown(self) -> None:
        try:
            self._each("close")
        finally:
            for a in self.actors:
                ray.kill(a)

    def kill(self, wait_s: float = 60.0) -> None:
        """End every rank at once (no clean-up: a peer may be stuck in a collective) and wait until Ray has them
        dead, so that a new group can take their names and bundles."""
        for a in self.actors:
            ray.kill(a, no_restart=True)
        deadline = time.monotonic() + wait_s
        for a in self.actors:
            while time.monotonic() < deadline:
                try:
                    ray.get(a.__ray_ready__.remote(), timeout=max(0.1, deadline - time.monotonic()))
                except ray.exceptions.RayActorError:
                    break
                except ray.exceptions.GetTimeoutError:
                    break
                time.sleep(0.1)
