"""Restorable positions of the run's deterministic streams, and per-batch sampling seeds.

The data iterators (`iterate_batches`, `iterate_pretrain`) are pure functions of their seed, so a position is just
the number of items drawn: a resumed run rebuilds the iterator and draws that many again (cheap: index shuffles,
no tokenising). Sampling seeds are derived from (run seed, purpose, index), so a batch sampled again after a
resume (or on a restarted sampler) draws the same coins and the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")

TRAIN_BATCH, EVAL = 1, 2  # purposes of a sampling seed


class Counted(Generic[T]):
    """An iterator that counts what it has handed out; `skip(n)` fast-forwards a fresh one to position n."""

    def __init__(self, source: Iterator[T], drawn: int = 0) -> None:
        self._source = source
        self.drawn = 0
        self.skip(drawn)

    def skip(self, n: int) -> None:
        for _ in range(n):
            next(self._source)
            self.drawn += 1

    def __iter__(self) -> Counted[T]:
        return self

    def __next__(self) -> T:
        item = next(self._source)  # StopIteration passes through uncounted
        self.drawn += 1
        return item


def sampling_seed(seed: int, purpose: int, index: int) -> int:
    """A 31-bit seed for batch `index` of `purpose`, independent of which sampler takes it or when."""
    return int(np.random.SeedSequence([seed, purpose, index]).generate_state(1)[0] & 0x7FFFFFFF)
