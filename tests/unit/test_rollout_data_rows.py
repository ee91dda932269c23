"""GKD's data rows through the rollout contracts: flagged when merged with sampled rows, and the flag follows its
rows through packing, row selection (mini-batches) and concatenation (collections)."""

import torch

from common.rollout import (
    Rollouts,
    ScoredShard,
    concat_shards,
    data_rollouts,
    pack_rollouts,
    select_rows,
    with_data_responses,
)


def _sampled() -> Rollouts:
    return Rollouts(
        [[1, 2], [3]], [[4, 5, 6], [7]], [[-1.0, -2.0, -3.0], [-0.5]], [[0, 1, 0], [0]], 3, [0, 1], [True, False]
    )


def _shard(r: Rollouts) -> ScoredShard:
    packed = pack_rollouts(r, 0)
    n = int(packed.mask.sum())
    return ScoredShard(packed, torch.zeros_like(packed.mask), torch.zeros(n, 5))


def test_data_rows_are_flagged_and_keep_the_sampled_version():
    data = data_rollouts([[8, 9]], [[10, 11]], [7], version=1)
    merged = with_data_responses(_sampled(), data)
    assert merged.from_data == [False, False, True] and merged.weight_version == 3
    assert merged.response_ids[2] == [10, 11] and merged.old_logprobs[2] == [0.0, 0.0]
    packed = pack_rollouts(merged, 0)
    assert packed.from_data is not None and packed.from_data.tolist() == [False, False, True]
    assert pack_rollouts(_sampled(), 0).from_data is None  # nothing to flag: the common case carries nothing


def test_the_flag_follows_its_rows():
    merged = with_data_responses(_sampled(), data_rollouts([[8, 9]], [[10, 11]], [7], version=1))
    shard = _shard(merged)
    picked = select_rows(shard, torch.tensor([2, 0]))
    assert picked.packed.from_data.tolist() == [True, False]
    both = concat_shards([_shard(_sampled()), shard])
    assert both.packed.from_data.tolist() == [False, False, False, False, True]
    assert concat_shards([_shard(_sampled()), _shard(_sampled())]).packed.from_data is None
