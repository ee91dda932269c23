"""Rollout queue logic (plain asyncio, no Ray): bounded back-pressure, FIFO, refusing stale versions, batches taken by
id in launch order whatever order they arrive in."""

import asyncio

import pytest

from actors.rollout_queue import RolloutQueue


def test_put_blocks_when_full_until_get():
    async def scenario():
        q = RolloutQueue(capacity=2, max_version_lag=10)
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
        q = RolloutQueue(capacity=4, max_version_lag=1)
        for version in (0, 1, 2, 3):
            await q.put(f"v{version}", version)
        await q.set_learner_version(3)
        got = await q.get()
        return got, await q.stats()

    got, stats = asyncio.run(scenario())
    assert got == (2, "v2") and stats["dropped_stale"] == 2 and stats["depth"] == 1


def test_get_times_out_on_an_empty_queue_and_bad_capacity():
    async def scenario():
        await RolloutQueue(1, 0).get(timeout=0.05)

    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(scenario())
    with pytest.raises(ValueError, match="capacity"):
        RolloutQueue(0, 0)


class Info:
    def __init__(self, batch_id: int, weight_version: int = 0):
        self.batch_id, self.weight_version = batch_id, weight_version


def test_reset_drops_queued_and_late_batches_of_earlier_generations():
    async def scenario():
        q = RolloutQueue(capacity=2, max_version_lag=10)
        await q.put_batch(Info(0), [], epoch=0)
        await q.put_batch(Info(1), [], epoch=0)
        blocked = asyncio.create_task(q.put_batch(Info(2), [], epoch=0))  # waits for room
        await asyncio.sleep(0.05)
        dropped = await q.reset(1)
        await asyncio.wait_for(blocked, 1.0)  # woken by the reset, then refused: launched before it
        await q.put_batch(Info(2), [], epoch=1)  # the same batch launched again after the reset
        _, (info, _) = await q.get(timeout=1.0)
        return dropped, info.batch_id, await q.stats()

    dropped, taken, stats = asyncio.run(scenario())
    assert dropped == [0, 1] and taken == 2
    assert stats["dropped_restart"] == 3 and stats["depth"] == 0


def test_take_by_id_gives_launch_order_whatever_the_arrival_order():
    async def scenario():
        q = RolloutQueue(capacity=2, max_version_lag=10)
        await q.put_batch(Info(1), ["one"])  # batch 1 arrives before batch 0 (a slow put, a batch sampled again)
        await q.put_batch(Info(2), ["two"])  # the queue is full of later batches
        late0 = asyncio.create_task(q.put_batch(Info(0), ["zero"]))
        await asyncio.wait_for(late0, 1.0)  # older than all queued: it gets in (the learner waits for it)
        blocked3 = asyncio.create_task(q.put_batch(Info(3), ["three"]))
        await asyncio.sleep(0.05)
        assert not blocked3.done()  # back-pressure still holds for later batches
        order = []
        for batch_id in range(4):
            taken = await q.take(0, batch_id, timeout=1.0)
            order.append((taken.info.batch_id, taken.shards[0], taken.stale))
        await asyncio.wait_for(blocked3, 1.0)
        return order

    assert asyncio.run(scenario()) == [(0, "zero", False), (1, "one", False), (2, "two", False), (3, "three", False)]


def test_take_waits_for_its_batch_and_times_out_without_it():
    async def scenario():
        q = RolloutQueue(capacity=4, max_version_lag=10)
        await q.put_batch(Info(1), ["one"])
        waiting = asyncio.create_task(q.take(0, 0, timeout=1.0))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # batch 1 is there, but batch 0 is next
        await q.put_batch(Info(0), ["zero"])
        assert (await waiting).info.batch_id == 0
        await q.take(0, 1, timeout=1.0)
        await q.take(0, 2, timeout=0.05)

    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(scenario())


def test_a_late_second_copy_of_a_taken_batch_is_dropped():
    async def scenario():
        q = RolloutQueue(capacity=4, max_version_lag=10)
        await q.put_batch(Info(0), ["relaunched"])  # batch 0 timed out and was launched again: this copy came first
        await q.put_batch(Info(1), ["one"])
        taken = await q.take(0, 0, timeout=1.0)
        await q.put_batch(Info(0), ["the first launch, late"])
        nxt = await q.take(0, 1, timeout=1.0)
        return taken.shards, nxt.shards, await q.stats()

    first, second, stats = asyncio.run(scenario())
    assert first == ["relaunched"] and second == ["one"]
    assert stats["dropped_duplicate"] == 1 and stats["depth"] == 0


def test_a_batch_taken_by_id_staler_than_the_lag_is_returned_as_stale():
    async def scenario():
        q = RolloutQueue(capacity=4, max_version_lag=1)
        await q.put_batch(Info(0, weight_version=1), ["old"])
        taken = await q.take(3, 0, timeout=1.0)
        return taken, await q.stats()

    taken, stats = asyncio.run(scenario())
    assert taken.stale and taken.shards == [] and stats["dropped_stale"] == 1 and stats["depth"] == 0
