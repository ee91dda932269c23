"""Applying the placement plan of common/placement.py to Ray: one placement group for the whole service."""

from __future__ import annotations

from typing import Any

import ray

from common.config import ConfigError, DistillConfig
from common.placement import bundled, plan_slots


class Placement:
    """Reserves a bundle per actor that asks for resources, all at once, or fails with the numbers."""

    def __init__(self, cfg: DistillConfig):
        from ray.util.placement_group import placement_group, remove_placement_group

        c = cfg.cluster
        slots = plan_slots(cfg)
        self.index = bundled(slots)
        self.group = None
        bundles = [s.bundle for s in slots if s.bundle]
        if not bundles:
            return
        self.group = placement_group(bundles, strategy=c.placement_strategy, name="minillm-service")
        if not self.group.wait(timeout_seconds=c.placement_timeout_s):
            remove_placement_group(self.group)
            self.group = None
            raise ConfigError(
                f"could not place the service's actors ({bundles}, strategy {c.placement_strategy}) within "
                f"cluster.placement_timeout_s={c.placement_timeout_s:g}s: the cluster has "
                f"{ray.available_resources()} free"
            )
        print(f"[placement] {len(bundles)} bundles reserved ({c.placement_strategy})", flush=True)

    def of(self, name: str) -> dict[str, Any]:
        """Ray options that put the actor `name` (learner-0, teacher-1, sampler-0, rollout-queue) in its bundle."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if self.group is None or name not in self.index:
            return {}
        return {
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                self.group, placement_group_bundle_index=self.index[name]
            )
        }

    def release(self) -> None:
        if self.group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.group)
            self.group = None
