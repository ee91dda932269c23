"""Planning exact teacher-mixed sampling: coins up front, runs of equal coins become segments.

Drawing y_t from alpha*p + (1-alpha)*q equals flipping c_t ~ Bernoulli(alpha) and drawing y_t from the
teacher p when c_t = 1, else from the student q. The coins do not depend on the tokens, so they can all be
drawn before generation; each run of equal coins is then one continuation call to the owning engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STUDENT, TEACHER = 0, 1


@dataclass(frozen=True)
class Segment:
    owner: int  # STUDENT or TEACHER
    length: int  # tokens to generate in this segment (>= 1)


def draw_owners(num_positions: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Per-position owner: TEACHER with probability alpha, independently."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return (rng.random(num_positions) < alpha).astype(np.int8)


def owners_to_segments(owners: np.ndarray) -> list[Segment]:
    """Run-length encode an owner sequence into segments (lengths sum to len(owners))."""
    segments: list[Segment] = []
    start = 0
    for t in range(1, len(owners) + 1):
        if t == len(owners) or owners[t] != owners[start]:
            segments.append(Segment(int(owners[start]), t - start))
            start = t
    return segments


def plan_segments(num_positions: int, alpha: float, rng: np.random.Generator) -> list[Segment]:
    return owners_to_segments(draw_owners(num_positions, alpha, rng))


def segments_to_owners(segments: list[Segment]) -> np.ndarray:
    return (
        np.concatenate([np.full(s.length, s.owner, dtype=np.int8) for s in segments])
        if segments
        else np.zeros(0, dtype=np.int8)
    )


def expected_segments(num_positions: int, alpha: float) -> float:
    """E[#segments] = 1 + (T-1) * 2 alpha (1 - alpha): a new segment starts wherever the coin changes."""
    if num_positions == 0:
        return 0.0
    return 1.0 + (num_positions - 1) * 2.0 * alpha * (1.0 - alpha)
