"""The statistics of one optimizer update: what each learner rank reports, and how the ranks' reports combine.

A rank reports its shares of global sums (they add up over ranks), its own extremes, and values that are the
same on every rank; `reduce` combines the ranks' reports into the update's metrics (a row of metrics.jsonl):
sums of per-token values become means over the update's tokens (`kl_sum` -> `reverse_kl`, ...), and the
sampler-vs-learner log-prob gap of a collection's first update becomes `logprob_gap_mean` / `logprob_gap_max`.
Fields a step does not produce stay None and are left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

SUM, MIN, MAX = "sum", "min", "max"  # how a field combines across ranks


def _across(how: str) -> Any:
    return field(default=None, metadata={"across_ranks": how})


@dataclass
class RankUpdate:
    """One rank's report of one update (SFT, KD or MiniLLM), as the worker sends it (`as_dict`)."""

    loss: float | None = _across(SUM)  # this rank's share of the global loss
    loss_single: float | None = _across(SUM)  # MiniLLM's single-step term
    loss_long: float | None = _across(SUM)  # MiniLLM's long-term (PPO-clipped) term
    loss_pt: float | None = _across(SUM)  # the pre-training LM loss
    kd_sum: float | None = _across(SUM)  # KD: sum of per-token forward KL
    nll_sum: float | None = _across(SUM)  # KD: sum of per-token NLL
    kl_sum: float | None = _across(SUM)  # MiniLLM: sum of per-token reverse KL
    rho_sum: float | None = _across(SUM)  # sum of importance ratios q_theta / q_old
    clip_sum: float | None = _across(SUM)  # tokens whose ratio is outside the PPO clip
    rho_min: float | None = _across(MIN)
    rho_max: float | None = _across(MAX)
    tokens: float | None = _across(SUM)  # response (or target) tokens of the rank's part
    grad_norm: float | None = _across(MAX)  # global (the same on every rank)
    skipped: float | None = _across(MAX)  # 1 if the step was skipped (non-finite): the same on every rank
    lr: float | None = _across(MAX)  # the update's learning rate (the schedule's): the same on every rank
    step_seconds: float | None = _across(MAX)  # the slowest rank's
    step_cpu_seconds: float | None = _across(SUM)
    peak_memory_mb: float | None = _across(MAX)  # the rank's peak during the step (CUDA allocator / CPU VmHWM)
    # sampler-vs-learner |log q(y_t)| gap, first update of a MiniLLM collection only
    gap_sum: float | None = _across(SUM)
    gap_max: float | None = _across(MAX)
    gap_tokens: float | None = _across(SUM)
    # the teacher's payload on the update's pre-training block (objective.pt_kd_ratio > 0): bytes beside the
    # rollouts' teacher_bytes (MiniLLM only)
    pt_teacher_bytes: float | None = _across(SUM)

    def as_dict(self) -> dict[str, float]:
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}

    @staticmethod
    def reduce(ranks: list[dict[str, float]]) -> dict[str, float]:
        """The ranks' reports (`as_dict` of each) -> the update's metrics."""
        unknown = set(ranks[0]) - {f.name for f in fields(RankUpdate)}
        if unknown:
            raise ValueError(f"update statistics without a rule to combine them across ranks: {sorted(unknown)}")
        out: dict[str, float] = {}
        for f in fields(RankUpdate):
            if f.name not in ranks[0]:
                continue
            values = [r[f.name] for r in ranks]
            how = f.metadata["across_ranks"]
            out[f.name] = min(values) if how == MIN else max(values) if how == MAX else sum(values)
        tokens = max(out.get("tokens", 0.0), 1.0)
        for total, mean in _MEANS:
            if total in out:
                out[mean] = out.pop(total) / tokens
        if "gap_sum" in out:
            out["logprob_gap_mean"] = out.pop("gap_sum") / max(out.pop("gap_tokens"), 1.0)
            out["logprob_gap_max"] = out.pop("gap_max")
        return out


# per-token sums reported as means over the update's tokens
_MEANS = (
    ("kl_sum", "reverse_kl"),
    ("rho_sum", "rho_mean"),
    ("kd_sum", "kd"),
    ("nll_sum", "nll"),
    ("clip_sum", "clip_fraction"),
)
