import numpy as np
import pytest

from common.mixture import (
    TEACHER,
    draw_owners,
    expected_segments,
    owners_to_segments,
    plan_segments,
    segments_to_owners,
)


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 1.0])
def test_segments_cover_positions_and_alternate(alpha):
    rng = np.random.default_rng(0)
    for length in [1, 2, 7, 64]:
        segs = plan_segments(length, alpha, rng)
        assert sum(s.length for s in segs) == length
        assert all(s.length >= 1 for s in segs)
        assert all(a.owner != b.owner for a, b in zip(segs, segs[1:], strict=False))


def test_round_trip():
    owners = np.array([0, 0, 1, 1, 1, 0, 1], dtype=np.int8)
    segs = owners_to_segments(owners)
    assert [(s.owner, s.length) for s in segs] == [(0, 2), (1, 3), (0, 1), (1, 1)]
    assert (segments_to_owners(segs) == owners).all()


def test_owner_is_bernoulli_alpha_per_position():
    rng = np.random.default_rng(1)
    alpha, n, length = 0.2, 20000, 8
    owners = np.stack([segments_to_owners(plan_segments(length, alpha, rng)) for _ in range(n)])
    freq = (owners == TEACHER).mean(axis=0)
    # 4-sigma band per position: sd = sqrt(a(1-a)/n) ~ 0.0028
    assert np.all(np.abs(freq - alpha) < 4 * np.sqrt(alpha * (1 - alpha) / n))
    # independence of neighbours: P(both teacher) = alpha^2
    both = ((owners[:, :-1] == TEACHER) & (owners[:, 1:] == TEACHER)).mean()
    assert abs(both - alpha**2) < 4 * np.sqrt(alpha**2 * (1 - alpha**2) / (n * (length - 1)))


def test_segment_count_matches_expectation():
    rng = np.random.default_rng(2)
    counts = [len(plan_segments(64, 0.2, rng)) for _ in range(5000)]
    assert abs(np.mean(counts) - expected_segments(64, 0.2)) < 0.3


def test_bad_alpha():
    with pytest.raises(ValueError, match="alpha"):
        draw_owners(4, 1.2, np.random.default_rng(0))
