"""The coins of exact teacher-mixed sampling, drawn up front (the sampler turns runs of equal coins into segments).

Drawing y_t from alpha*p + (1-alpha)*q equals flipping c_t ~ Bernoulli(alpha) and drawing y_t from the
teacher p when c_t = 1, else from the student q. The coins do not depend on the tokens, so they can all be
drawn before generation; each run of equal coins is then one continuation call to the owning engine.
"""

from __future__ import annotations

import numpy as np

STUDENT, TEACHER = 0, 1


def draw_owners(num_positions: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Per-position owner: TEACHER with probability alpha, independently."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return (rng.random(num_positions) < alpha).astype(np.int8)


def run_length(owners: np.ndarray, start: int) -> int:
    """Length of the run of equal owners that starts at ``start`` (the segment to generate from there)."""
    changes = np.flatnonzero(owners[start:] != owners[start])
    return int(changes[0]) if changes.size else len(owners) - start
