"""Single MiniLLM steps on a LearnerGroup's ranks, for tests (the service trains whole collections:
LearnerGroup.minillm_collection)."""

from __future__ import annotations

from typing import Any

import ray
import torch

from common.rollout import shard_rows
from learner.group import LearnerGroup
from learner.update_stats import RankUpdate


def minillm_step(group: LearnerGroup, shards: list[Any], alpha: float, pt_ids: torch.Tensor | None) -> dict[str, float]:
    """One update on every rank (`shards[r]` for rank r; the L_PT rows split like the group splits them), the ranks'
    metrics combined as the group combines them."""
    pts: list[Any] = [None] * group.n if pt_ids is None else [pt_ids[s] for s in shard_rows(len(pt_ids), group.n)]
    return RankUpdate.reduce(
        ray.get([a.minillm_step.remote(s, alpha, pt) for a, s, pt in zip(group.actors, shards, pts, strict=True)])
    )


def wait_push(group: LearnerGroup) -> None:
    """Wait until rank 0's background broadcast of the weights is done."""
    ray.get(group.actors[0].wait_push.remote())
