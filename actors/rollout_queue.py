"""The rollout queue: bounded (back-pressure on producers), versioned, refusing items older than a lag. It holds
references to scored batches, never their tensors.

Scored batches can arrive out of launch order (Ray does not order an async actor's calls, and a lost batch is
launched again after later ones), so the learner takes them by batch id (`take(version, batch_id)`): every run
consumes its batches in the same order, whatever the timing, which is what makes a resumed run equal an
uninterrupted one.

`RolloutQueue` is the plain asyncio logic; Ray makes it an async actor (methods interleave while waiting),
so a blocked `put` does not stop `get` from draining the queue.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass
class TakenBatch:
    """What `take` hands the driver: a scored batch and the queue's state when it was taken."""

    info: Any  # the batch's BatchInfo (common/rollout.py)
    shards: list[Any]  # one ObjectRef per learner rank; empty when `stale`
    depth: int  # batches left queued
    dropped_stale: int  # batches dropped as staler than max_version_lag so far
    stale: bool  # taken by id but staler than max_version_lag: dropped, to be sampled again


class RolloutQueue:
    def __init__(self, capacity: int, max_version_lag: int):
        if capacity < 1:
            raise ValueError("replay capacity must be >= 1")
        self.capacity, self.max_lag = capacity, max_version_lag
        self.items: deque[tuple[int, Any]] = deque()
        self.learner_version = 0
        self.dropped_stale = 0
        self.put_total = 0
        # a learner restart rolls the weights back: batches launched before it (queued, or still on their way in)
        # were sampled from weights that no longer exist: puts fenced with an older epoch are dropped
        self.epoch = 0
        self.dropped_restart = 0
        # a batch that timed out and was launched again can still arrive late: a second copy of a taken id is dropped
        self.last_taken: int | None = None
        self.dropped_duplicate = 0
        self._cond: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:  # created lazily inside the running event loop
            self._cond = asyncio.Condition()
        return self._cond

    async def put(self, item: Any, version: int, timeout: float | None = None, epoch: int | None = None) -> None:
        """Wait while the queue is full (back-pressure), then append; an item fenced with another `epoch` than the
        queue's (launched before a `reset`) is dropped instead."""
        cond = self._condition()
        batch_id = _batch_id(item)
        async with cond:
            await asyncio.wait_for(cond.wait_for(lambda: self._room_for(batch_id) or self._is_late(batch_id)), timeout)
            if epoch is not None and epoch != self.epoch:
                self.dropped_restart += 1
                return
            if self._is_late(batch_id):
                self.dropped_duplicate += 1
                return
            self.items.append((version, item))
            self.put_total += 1
            cond.notify_all()

    async def put_batch(
        self, info: Any, shards: list[Any], timeout: float | None = None, epoch: int | None = None
    ) -> None:
        """A scored batch: its `BatchInfo` (Ray resolves it: a few numbers) and the learner shards' ObjectRefs,
        which stay references (nested in a list, Ray does not fetch them). Versioned by the rollouts."""
        await self.put((info, shards), info.weight_version, timeout, epoch)

    async def reset(self, epoch: int) -> list[int]:
        """Drop every queued item and refuse puts fenced with any other epoch from now on; returns the dropped
        batches' ids (the driver's ledger records them)."""
        cond = self._condition()
        async with cond:
            self.epoch = epoch
            self.last_taken = None  # the restarted learner takes the rolled-back ids again
            dropped = [_batch_id(item) for _, item in self.items]
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

    async def take(self, learner_version: int, batch_id: int | None = None, timeout: float | None = None) -> TakenBatch:
        """The learner's side in one call: adopt its weight version, take batch `batch_id` (waiting for it; None:
        the oldest fresh batch), and report the queue's state with it. A batch taken by id that is staler than
        `max_version_lag` is dropped and returned with `stale` set and no shards, for the driver to sample again."""
        self.learner_version = learner_version
        stale = False
        if batch_id is None:
            _, (info, shards) = await self.get(timeout)
        else:
            version, (info, shards) = await self._take_id(batch_id, timeout)
            if learner_version - version > self.max_lag:
                stale, shards = True, []
                self.dropped_stale += 1
        return TakenBatch(info, shards, len(self.items), self.dropped_stale, stale)

    async def _take_id(self, batch_id: int, timeout: float | None) -> tuple[int, Any]:
        cond = self._condition()
        async with cond:
            await asyncio.wait_for(cond.wait_for(lambda: self._index(batch_id) is not None), timeout)
            index = self._index(batch_id)
            assert index is not None
            version, item = self.items[index]
            del self.items[index]
            self.last_taken = batch_id
            late = [entry for entry in self.items if self._is_late(_batch_id(entry[1]))]
            for entry in late:  # a second copy of a batch launched again
                self.items.remove(entry)
                self.dropped_duplicate += 1
            cond.notify_all()
            return version, item

    def _room_for(self, batch_id: int | None) -> bool:
        """Room in the queue; a batch older than every queued one gets in even when it is full (of later batches
        that arrived first): the learner takes it next, and it would wait for it forever."""
        if len(self.items) < self.capacity:
            return True
        queued = [_batch_id(item) for _, item in self.items]
        return batch_id is not None and all(q is not None and batch_id < q for q in queued)

    def _is_late(self, batch_id: int | None) -> bool:
        return batch_id is not None and self.last_taken is not None and batch_id <= self.last_taken

    def _index(self, batch_id: int) -> int | None:
        return next((i for i, (_, item) in enumerate(self.items) if _batch_id(item) == batch_id), None)

    async def set_learner_version(self, version: int) -> None:
        self.learner_version = version

    async def stats(self) -> dict[str, int]:
        return {
            "depth": len(self.items),
            "capacity": self.capacity,
            "dropped_stale": self.dropped_stale,
            "put_total": self.put_total,
            "dropped_restart": self.dropped_restart,
            "dropped_duplicate": self.dropped_duplicate,
            "learner_version": self.learner_version,
        }


def _batch_id(item: Any) -> int | None:
    """The id of a queued (info, shards) batch; None for items that carry none."""
    head = item[0] if isinstance(item, tuple) and item else item
    return getattr(head, "batch_id", None)
