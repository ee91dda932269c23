"""Planning where the service's actors go (pure; Ray is only touched by the driver that applies the plan).

Every actor that asks for resources gets one bundle of one placement group, so the whole service is reserved
at once (PACK puts it on as few nodes as possible) and a request the cluster cannot hold fails at start-up
with the numbers, instead of leaving actors pending forever.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.config import DistillConfig


@dataclass(frozen=True)
class ActorSlot:
    name: str  # the actor's name in the dashboard: learner-0, teacher-0, sampler-0, replay
    cpus: float
    gpus: float

    @property
    def bundle(self) -> dict[str, float]:
        return {k: v for k, v in (("CPU", self.cpus), ("GPU", self.gpus)) if v > 0}


def num_samplers(cfg: DistillConfig) -> int:
    """Sampler actors the method runs: healing samples nothing (KD on given text, selection by held-out loss)."""
    return 0 if cfg.method == "heal" else cfg.sampler.num_samplers


def plan_slots(cfg: DistillConfig) -> list[ActorSlot]:
    c = cfg.cluster
    slots = [ActorSlot(f"learner-{i}", c.learner_cpus, c.learner_gpus) for i in range(cfg.learner.num_workers)]
    slots += [ActorSlot(f"teacher-{i}", c.teacher_cpus, c.teacher_gpus) for i in range(cfg.teacher.num_teachers)]
    # a tensor-parallel engine needs one GPU per shard inside the sampler's own bundle
    slots += [ActorSlot(f"sampler-{i}", c.sampler_cpus, c.sampler_gpus) for i in range(num_samplers(cfg))]
    slots.append(ActorSlot("rollout-queue", c.replay_cpus, 0.0))
    return slots


def bundled(slots: list[ActorSlot]) -> dict[str, int]:
    """Bundle index of every slot that needs resources (slots asking for nothing float outside the group)."""
    index: dict[str, int] = {}
    for slot in slots:
        if slot.bundle:
            index[slot.name] = len(index)
    return index


def resource_problems(
    slots: list[ActorSlot], cluster: dict[str, float], nodes: list[dict[str, float]] | None = None
) -> list[str]:
    """Why the cluster cannot hold these actors (empty when it can). Checks totals, and that every single
    actor fits on some node (a 2-GPU sampler cannot span two 1-GPU nodes)."""
    problems = []
    for key in ("CPU", "GPU"):
        need = sum(s.bundle.get(key, 0.0) for s in slots)
        have = cluster.get(key, 0.0)
        if need > have + 1e-9:
            detail = ", ".join(f"{s.name} {s.bundle[key]:g}" for s in slots if s.bundle.get(key))
            problems.append(f"{need:g} {key}s requested ({detail}), the cluster has {have:g}")
    if nodes:
        for s in slots:
            if s.bundle and not any(all(n.get(k, 0.0) + 1e-9 >= v for k, v in s.bundle.items()) for n in nodes):
                problems.append(f"{s.name} needs {s.bundle} on one node; no node has that much")
    return problems
