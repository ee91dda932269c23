"""Thin Ray wrappers: the plain classes made remote at construction time, named for the dashboard."""

from __future__ import annotations

from typing import Any

import ray

from actors import telemetry
from actors.rollout_queue import RolloutQueue, TakenBatch
from actors.sampler import Sampler, SamplerSpec
from actors.teacher import Teacher
from common.engine_env import ENGINE_ENV
from common.rollout import Rollouts


class SamplerActor(Sampler):
    """Sampler plus dashboard metrics."""

    def sample(self, *args: Any, **kwargs: Any) -> Rollouts:
        out = super().sample(*args, **kwargs)
        telemetry.counter("distill_sampled_tokens").inc(out.num_tokens)
        telemetry.add("distill_sampler_busy_seconds", out.seconds)
        return out

    def load_weights(self, state_dict: Any, version: int) -> int:
        v = super().load_weights(state_dict, version)  # receive_weights() comes through here too
        telemetry.gauge("distill_weight_version").set(v)
        telemetry.add("distill_weight_pushes", 1)
        return v


class TeacherActor(Teacher):
    """Teacher plus dashboard metrics."""

    def score(self, rollouts: Rollouts, num_shards: int = 1, rows: list[int] | None = None, batch_id: int = -1) -> list:
        out = super().score(rollouts, num_shards, rows, batch_id)
        telemetry.counter("distill_teacher_scored_tokens").inc(out[0].response_tokens)
        telemetry.add("distill_teacher_busy_seconds", out[0].score_seconds)
        return out


class RolloutQueueActor(RolloutQueue):
    """Rollout queue plus dashboard metrics (depth, and the version lag of what the learner takes)."""

    async def put(self, item: Any, version: int, timeout: float | None = None, epoch: int | None = None) -> None:
        await super().put(item, version, timeout, epoch)
        telemetry.gauge("distill_queue_depth").set(len(self.items))

    async def get(self, timeout: float | None = None) -> tuple[int, Any]:
        version, item = await super().get(timeout)
        self._report_taken(version)
        return version, item

    async def take(self, learner_version: int, batch_id: int | None = None, timeout: float | None = None) -> TakenBatch:
        out = await super().take(learner_version, batch_id, timeout)  # by id: get() above is not called
        self._report_taken(out.info.weight_version)
        return out

    def _report_taken(self, version: int) -> None:
        telemetry.gauge("distill_queue_depth").set(len(self.items))
        telemetry.gauge("distill_weight_version_lag").set(self.learner_version - version)


def thread_env(cpus: float, threads: int | None = None) -> dict[str, str]:
    """torch inside an actor uses the cores it was given (or `threads`), not every core of the node."""
    n = str(threads or max(1, int(cpus)))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


def _options(
    name: str, cpus: float, gpus: float, env: dict[str, str], threads: int | None, **extra: Any
) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "name": name,
        "num_cpus": cpus,
        "num_gpus": gpus,
        "runtime_env": {"env_vars": {**env, **thread_env(cpus, threads)}},
    }
    opts.update(extra)
    return opts


def make_sampler(
    spec: SamplerSpec,
    index: int,
    cpus: float,
    gpus: float,
    placement: dict | None = None,
    threads: int | None = None,
    max_restarts: int = 0,
):
    """A sampler actor; Ray restarts it (from `spec`: initial weights, version 0) up to `max_restarts` times."""
    cls = ray.remote(SamplerActor)
    opts = _options(f"sampler-{index}", cpus, gpus, ENGINE_ENV, threads, max_restarts=max_restarts, **(placement or {}))
    return cls.options(**opts).remote(spec)


def make_teacher(
    index: int,
    cpus: float,
    gpus: float,
    *args: Any,
    placement: dict | None = None,
    threads: int | None = None,
    max_restarts: int = 0,
    **kwargs: Any,
):
    """A teacher actor (args as `Teacher`; stateless, so Ray may restart it). Its `score` returns 1 + num_shards
    objects: call it as `teacher.score.options(num_returns=1 + n).remote(rollouts_ref, n)`."""
    cls = ray.remote(TeacherActor)
    opts = _options(f"teacher-{index}", cpus, gpus, {}, threads, max_restarts=max_restarts, **(placement or {}))
    return cls.options(**opts).remote(*args, **kwargs)


def make_rollout_queue(capacity: int, max_version_lag: int, cpus: float = 0.0, placement: dict | None = None):
    """The rollout queue actor, named "rollout-queue" (not restarted by Ray: the driver replaces a dead one)."""
    cls = ray.remote(RolloutQueueActor)
    return cls.options(name="rollout-queue", num_cpus=cpus, max_concurrency=64, **(placement or {})).remote(
        capacity, max_version_lag
    )
