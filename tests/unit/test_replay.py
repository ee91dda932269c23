"""Replay queue logic (plain asyncio, no Ray): bounded back-pressure, FIFO, refusing stale versions."""

import asyncio

import pytest

from actors.replay import ReplayBuffer


def test_put_blocks_when_full_until_get():
    async def scenario():
        q = ReplayBuffer(capacity=2, max_version_lag=10)
        await q.put("a", 0)
        await q.put("b", 0)
        blocked = asyncio.create_task(q.put("c", 0))
        await asyncio.sleep(0.05)
        assert not blocked.done()  # back-pressure: the producer waits
        assert await q.get() == (0, "a")
        await asyncio.wait_for(blocked, 1.0)
        return [await q.get(), await q.get(), (await q.stats())["depth"]]

    assert asyncio.run(scenario()) == [(0, "b"), (0, "c"), 0]


def test_stale_items_are_dropped_and_counted():
    async def scenario():
        q = ReplayBuffer(capacity=4, max_version_lag=1)
        for version in (0, 1, 2, 3):
            await q.put(f"v{version}", version)
        await q.set_learner_version(3)
        got = await q.get()
        return got, await q.stats()

    got, stats = asyncio.run(scenario())
    assert got == (2, "v2") and stats["dropped_stale"] == 2 and stats["depth"] == 1


def test_get_times_out_on_an_empty_queue_and_bad_capacity():
    async def scenario():
        await ReplayBuffer(1, 0).get(timeout=0.05)

    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(scenario())
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(0, 0)


def test_reset_drops_queued_and_late_batches_of_earlier_generations():
    class Info:
        def __init__(self, batch_id: int):
            self.batch_id, self.weight_version = batch_id, 0

    async def scenario():
        q = ReplayBuffer(capacity=2, max_version_lag=10)
        await q.put_batch(Info(0), [], generation=0)
        await q.put_batch(Info(1), [], generation=0)
        blocked = asyncio.create_task(q.put_batch(Info(2), [], generation=0))  # waits for room
        await asyncio.sleep(0.05)
        dropped = await q.reset(1)
        await asyncio.wait_for(blocked, 1.0)  # woken by the reset, then refused: launched before it
        await q.put_batch(Info(2), [], generation=1)  # the same batch launched again after the reset
        _, (info, _) = await q.get(timeout=1.0)
        return dropped, info.batch_id, await q.stats()

    dropped, taken, stats = asyncio.run(scenario())
    assert dropped == [0, 1] and taken == 2
    assert stats["dropped_restart"] == 3 and stats["depth"] == 0
