"""Token-bounded micro-batches (learner.micro_batch_tokens) and trimming a micro-batch to its own width."""

import itertools

import torch

from common.rollout import pack_sequences, row_widths, slice_packed, token_micro_batches, trim_packed


def _valid(widths, max_rows, max_tokens, cuts) -> bool:
    covered = [i for sl in cuts for i in range(sl.start, sl.stop)]
    if covered != list(range(len(widths))):
        return False
    for sl in cuts:
        rows = widths[sl]
        if len(rows) > max_rows:
            return False
        if max_tokens is not None and len(rows) > 1 and len(rows) * max(rows) > max_tokens:
            return False
    return True


def test_micro_batches_are_valid_and_greedy():
    for widths in itertools.product([1, 3, 7], repeat=5):
        widths = list(widths)
        for max_rows, max_tokens in [(2, None), (5, 8), (3, 6), (5, 100), (1, 1)]:
            cuts = token_micro_batches(widths, max_rows, max_tokens)
            assert _valid(widths, max_rows, max_tokens, cuts), (widths, max_rows, max_tokens, cuts)
            # greedy: no micro-batch could take the next row as well
            for a, b in zip(cuts, cuts[1:], strict=False):
                merged = widths[a.start : b.start + 1]
                assert len(merged) > max_rows or (max_tokens is not None and len(merged) * max(merged) > max_tokens)


def test_rows_only_matches_fixed_split():
    assert token_micro_batches([5] * 8, 4, None) == [slice(0, 4), slice(4, 8)]


def test_trim_keeps_real_positions():
    packed = pack_sequences([[1, 2, 3], [4], [5, 6, 7, 8, 9]], [[10, 11], [12, 13, 14, 15], [16]], 0, None)
    part = slice_packed(packed, torch.tensor([0, 2]))
    trimmed = trim_packed(part)
    assert trimmed.input_ids.shape == (2, 6) and trimmed.tokens.shape == (2, 2)
    assert row_widths(part) == [5, 6]
    for name in ("input_ids", "attention_mask"):
        assert torch.equal(getattr(trimmed, name), getattr(part, name)[:, :6])
    assert torch.equal(trimmed.mask.sum(), part.mask.sum())
