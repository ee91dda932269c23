"""Progress lines' rate and time left: `step 30/200 (42s, 0.71 step/s, 4m00s left)`."""

from __future__ import annotations


def clock(seconds: float) -> str:
    """Seconds as a short clock: 42s, 4m00s, 1h05m."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def rate_and_eta(step: int, total: int, elapsed: float, first_step: int = 0) -> str:
    """The phase's rate since it (re)started at `first_step` and the time left at that rate; empty before any step."""
    done = step - first_step
    if done <= 0 or elapsed <= 0:
        return ""
    rate = done / elapsed
    left = max(0, total - step) / rate
    shown = f"{rate:.2f} step/s" if rate >= 0.1 else f"{1 / rate:.0f} s/step"
    return f"{shown}, {clock(left)} left"


def progress_suffix(step: int, total: int, elapsed: float, first_step: int = 0) -> str:
    """The parenthesised tail of a progress line: elapsed seconds, rate and time left."""
    tail = rate_and_eta(step, total, elapsed, first_step)
    return f"({elapsed:.0f}s, {tail})" if tail else f"({elapsed:.0f}s)"
