"""Replay queue: bounded (back-pressure on producers), versioned, refusing items older than a lag. It holds
references to scored batches, never their tensors.

`ReplayBuffer` is the plain asyncio logic; Ray makes it an async actor (methods interleave while waiting),
so a blocked `put` does not stop `get` from draining the queue.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any


class ReplayBuffer:
    def __init__(self, capacity: int, max_version_lag: int):
        if capacity < 1:
            raise ValueError("replay capacity must be >= 1")
        self.capacity, self.max_lag = capacity, max_version_lag
        self.items: deque[tuple[int, Any]] = deque()
        self.learner_version = 0
        self.dropped_stale = 0
        self.put_total = 0
        # a learner restart rolls the weights back: batches launched before it (queued, or still on their way in)
        # were sampled from weights that no longer exist, and puts of an older generation are dropped
        self.generation = 0
        self.dropped_restart = 0
        self._cond: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:  # created lazily inside the running event loop
            self._cond = asyncio.Condition()
        return self._cond

    async def put(self, item: Any, version: int, timeout: float | None = None, generation: int | None = None) -> None:
        """Wait while the queue is full (back-pressure), then append; an item of an older `generation` than the
        queue's (launched before a `reset`) is dropped instead."""
        cond = self._condition()
        async with cond:
            await asyncio.wait_for(cond.wait_for(lambda: len(self.items) < self.capacity), timeout)
            if generation is not None and generation != self.generation:
                self.dropped_restart += 1
                return
            self.items.append((version, item))
            self.put_total += 1
            cond.notify_all()

    async def put_batch(
        self, info: Any, shards: list[Any], timeout: float | None = None, generation: int | None = None
    ) -> None:
        """A scored batch: its `BatchInfo` (Ray resolves it: a few numbers) and the learner shards' ObjectRefs,
        which stay references (nested in a list, Ray does not fetch them). Versioned by the rollouts."""
        await self.put((info, shards), info.weight_version, timeout, generation)

    async def reset(self, generation: int) -> list[int]:
        """Drop every queued item and refuse puts of earlier generations from now on; returns the dropped batches'
        ids (the driver's ledger records them)."""
        cond = self._condition()
        async with cond:
            self.generation = generation
            dropped = [getattr(item[0], "batch_id", -1) for _, item in self.items]
            self.dropped_restart += len(self.items)
            self.items.clear()
            cond.notify_all()
        return dropped

    async def get(self, timeout: float | None = None) -> tuple[int, Any]:
        """Oldest item whose version is within `max_version_lag` of the learner; staler ones are dropped."""
        cond = self._condition()
        async with cond:
            while True:
                await asyncio.wait_for(cond.wait_for(lambda: len(self.items) > 0), timeout)
                version, item = self.items.popleft()
                cond.notify_all()
                if self.learner_version - version <= self.max_lag:
                    return version, item
                self.dropped_stale += 1

    async def take(self, learner_version: int, timeout: float | None = None) -> dict[str, Any]:
        """The learner's side in one call: adopt its weight version, take the oldest fresh batch, and report the
        queue's state with it: {"info", "shards", "depth", "dropped_stale"}."""
        self.learner_version = learner_version
        _, (info, shards) = await self.get(timeout)
        return {"info": info, "shards": shards, "depth": len(self.items), "dropped_stale": self.dropped_stale}

    async def set_learner_version(self, version: int) -> None:
        self.learner_version = version

    async def stats(self) -> dict[str, int]:
        return {
            "depth": len(self.items),
            "capacity": self.capacity,
            "dropped_stale": self.dropped_stale,
            "put_total": self.put_total,
            "dropped_restart": self.dropped_restart,
            "learner_version": self.learner_version,
        }
