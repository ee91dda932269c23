"""Thin Ray wrappers: the plain classes made remote at construction time, named for the dashboard."""

from __future__ import annotations

import os
from typing import Any

import ray

from actors.replay import ReplayBuffer
from actors.sampler import Sampler, SamplerSpec
from actors.teacher import Teacher

# vLLM in-process (about 3 s start-up instead of 30 s; PLATFORM.md) and quiet logs inside actors
ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"),
    "TOKENIZERS_PARALLELISM": "false",
}


def _threads(cpus: float) -> dict[str, str]:
    # torch inside an actor should use the cores it was given, not every core of the node
    return {"OMP_NUM_THREADS": str(max(1, int(cpus))), "MKL_NUM_THREADS": str(max(1, int(cpus)))}


def _options(name: str, cpus: float, gpus: float, env: dict[str, str], **extra: Any) -> dict[str, Any]:
    opts: dict[str, Any] = {"name": name, "num_cpus": cpus, "num_gpus": gpus,
                            "runtime_env": {"env_vars": {**env, **_threads(cpus)}}}
    opts.update(extra)
    return opts


def make_sampler(spec: SamplerSpec, index: int, cpus: float, gpus: float, **extra: Any):
    cls = ray.remote(Sampler)
    return cls.options(**_options(f"sampler-{index}", cpus, gpus, ENGINE_ENV, **extra)).remote(spec)


def make_teacher(index: int, cpus: float, gpus: float, *args: Any, **kwargs: Any):
    cls = ray.remote(Teacher)
    return cls.options(**_options(f"teacher-{index}", cpus, gpus, {})).remote(*args, **kwargs)


def make_replay(capacity: int, max_version_lag: int, cpus: float = 0.0):
    cls = ray.remote(ReplayBuffer)
    return cls.options(name="replay", num_cpus=cpus, max_concurrency=64).remote(capacity, max_version_lag)
