"""Thin Ray wrappers: the plain classes made remote at construction time, named for the dashboard."""

from __future__ import annotations

import os
from typing import Any

import ray

from actors import telemetry
from actors.replay import ReplayBuffer
from actors.sampler import Sampler, SamplerSpec
from actors.teacher import Teacher
from common.rollout import Rollouts, TeacherScores

# vLLM in-process (about 3 s start-up instead of 30 s; PLATFORM.md) and quiet logs inside actors
ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"),
    "TOKENIZERS_PARALLELISM": "false",
}


class SamplerActor(Sampler):
    """Sampler plus dashboard metrics."""

    def sample(self, *args: Any, **kwargs: Any) -> Rollouts:
        out = super().sample(*args, **kwargs)
        telemetry.counter("distill_sampled_tokens").inc(out.num_tokens)
        return out

    def load_weights(self, state_dict: Any, version: int) -> int:
        v = super().load_weights(state_dict, version)
        telemetry.gauge("distill_weight_version").set(v)
        return v


class TeacherActor(Teacher):
    """Teacher plus dashboard metrics."""

    def score(self, rollouts: Rollouts) -> TeacherScores:
        out = super().score(rollouts)
        telemetry.counter("distill_teacher_scored_tokens").inc(rollouts.num_tokens)
        return out


class ReplayActor(ReplayBuffer):
    """Replay queue plus dashboard metrics (depth, and the version lag of what the learner takes)."""

    async def put(self, item: Any, version: int, timeout: float | None = None) -> None:
        await super().put(item, version, timeout)
        telemetry.gauge("distill_queue_depth").set(len(self.items))

    async def get(self, timeout: float | None = None) -> tuple[int, Any]:
        version, item = await super().get(timeout)
        telemetry.gauge("distill_queue_depth").set(len(self.items))
        telemetry.gauge("distill_weight_version_lag").set(self.learner_version - version)
        return version, item


def _threads(cpus: float) -> dict[str, str]:
    # torch inside an actor should use the cores it was given, not every core of the node
    return {"OMP_NUM_THREADS": str(max(1, int(cpus))), "MKL_NUM_THREADS": str(max(1, int(cpus)))}


def _options(name: str, cpus: float, gpus: float, env: dict[str, str], **extra: Any) -> dict[str, Any]:
    opts: dict[str, Any] = {"name": name, "num_cpus": cpus, "num_gpus": gpus,
                            "runtime_env": {"env_vars": {**env, **_threads(cpus)}}}
    opts.update(extra)
    return opts


def make_sampler(spec: SamplerSpec, index: int, cpus: float, gpus: float, placement: dict | None = None):
    cls = ray.remote(SamplerActor)
    return cls.options(**_options(f"sampler-{index}", cpus, gpus, ENGINE_ENV, **(placement or {}))).remote(spec)


def make_teacher(index: int, cpus: float, gpus: float, *args: Any, placement: dict | None = None, **kwargs: Any):
    cls = ray.remote(TeacherActor)
    return cls.options(**_options(f"teacher-{index}", cpus, gpus, {}, **(placement or {}))).remote(*args, **kwargs)


def make_replay(capacity: int, max_version_lag: int, cpus: float = 0.0, placement: dict | None = None):
    cls = ray.remote(ReplayActor)
    return cls.options(name="replay", num_cpus=cpus, max_concurrency=64,
                       **(placement or {})).remote(capacity, max_version_lag)
