"""Errors as the one line a user reads (Ray's errors carry whole remote tracebacks; config errors come as a list)."""

from __future__ import annotations


def one_line_error(exc: BaseException, *, with_type: bool = True, limit: int = 200) -> str:
    """An error on one line. `with_type` (for errors of the code or of Ray): "Type: first line of the message", cut
    at `limit` characters. Without it (input errors, whose every line names a cause): every line, joined."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if with_type:
        return f"{type(exc).__name__}: {lines[0][:limit]}" if lines else type(exc).__name__
    if not lines:
        return type(exc).__name__
    head, rest = lines[0], lines[1:]
    if not rest:
        return head
    return head + (" " if head.endswith(":") else "; ") + "; ".join(rest)
