"""Custom Ray metrics, exported on Ray's metrics endpoint with a `ray_` prefix (`ray_distill_sampled_tokens_total`).

Created lazily inside actor processes (and the driver); the plain classes never touch them, only the Ray wrappers
and the driver's run log do. deploy/monitoring/grafana_dashboard.json plots every one of them.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from ray.util import metrics

COUNTERS = {
    "distill_sampled_tokens": "response tokens sampled by the samplers",
    "distill_teacher_scored_tokens": "response tokens scored by the teachers",
    "distill_learner_tokens": "response tokens the learner trained on (rank 0's share)",
    "distill_updates": "learner updates (SFT, KD or MiniLLM steps) done",
    "distill_sampler_busy_seconds": "wall seconds the samplers spent sampling (rate: busy share)",
    "distill_teacher_busy_seconds": "wall seconds the teachers spent scoring (rate: busy share)",
    "distill_learner_busy_seconds": "wall seconds learner rank 0 spent in updates (rate: busy share)",
    "distill_weight_pushes": "weight versions loaded by the samplers",
}
GAUGES = {
    "distill_learner_step_seconds": "wall time of the last learner update",
    "distill_queue_depth": "batches waiting in the rollout queue",
    "distill_weight_version_lag": "learner version minus the version that sampled the batch it consumed",
    "distill_loss": "total loss of the last update",
    "distill_loss_single": "single-step (exact reverse-KL) term of the last update",
    "distill_loss_long": "long-term (PPO-clipped) term of the last update",
    "distill_loss_pt": "pre-training LM loss of the last update",
    "distill_reverse_kl": "exact per-token reverse KL to the teacher on the last batch",
    "distill_clip_fraction": "share of tokens whose importance ratio rho was clipped in the last update",
    "distill_rho_min": "smallest importance ratio rho in the last update",
    "distill_rho_max": "largest importance ratio rho in the last update",
    "distill_skipped_updates": "updates skipped so far by learner rank 0 (non-finite loss or gradient norm)",
    "distill_weight_version": "weight version of the samplers' student",
    # set by the driver from its run log (learner/run_log.py)
    "distill_progress": "share of the current phase's steps done (0-1)",
    "distill_failures": "faults the run recovered from so far (lost batches, lost pushes, learner restarts)",
    "distill_valid_rouge_l": "validation ROUGE-L of the last in-run evaluation",
    "distill_valid_reverse_kl": "validation reverse KL per token of the last in-run evaluation",
    "distill_valid_response_tokens": "mean validation response length of the last in-run evaluation",
}

_skipped = 0.0  # rank 0's skipped updates so far (a gauge: it is exported at 0 too, a counter only once increased)


@cache
def counter(name: str) -> metrics.Counter:
    return metrics.Counter(name, description=COUNTERS[name])


@cache
def gauge(name: str) -> metrics.Gauge:
    return metrics.Gauge(name, description=GAUGES[name])


def add(name: str, value: float) -> None:
    """Counter increase; Ray refuses zero or negative increases, so those are skipped."""
    if value > 0:
        counter(name).inc(float(value))


def record_update(result: dict[str, float]) -> None:
    """Learner metrics from an update's result dict (keys missing for a phase are skipped)."""
    global _skipped
    _skipped += float(result.get("skipped", 0.0))
    gauge("distill_skipped_updates").set(_skipped)
    add("distill_updates", 1)
    add("distill_learner_tokens", result.get("tokens", 0.0))
    add("distill_learner_busy_seconds", result.get("step_seconds", 0.0))
    tokens = result.get("tokens")
    if tokens:  # a rank's share: its own tokens' mean reverse KL and clipped share
        if "kl_sum" in result:
            gauge("distill_reverse_kl").set(result["kl_sum"] / tokens)
        if "clip_sum" in result:
            gauge("distill_clip_fraction").set(result["clip_sum"] / tokens)
    for key, name in (
        ("step_seconds", "distill_learner_step_seconds"),
        ("loss", "distill_loss"),
        ("loss_single", "distill_loss_single"),
        ("loss_long", "distill_loss_long"),
        ("loss_pt", "distill_loss_pt"),
        ("reverse_kl", "distill_reverse_kl"),
        ("clip_fraction", "distill_clip_fraction"),
        ("rho_min", "distill_rho_min"),
        ("rho_max", "distill_rho_max"),
    ):
        if key in result:
            gauge(name).set(float(result[key]))


def record_run(record: dict[str, Any], total_steps: int | None = None) -> None:
    """Driver-side gauges from one run-log record: phase progress, recovered faults, validation results."""
    if total_steps and isinstance(record.get("step"), int):
        gauge("distill_progress").set(min(1.0, record["step"] / total_steps))
    if isinstance(record.get("failures"), int | float):
        gauge("distill_failures").set(float(record["failures"]))
    for key, name in (
        ("eval_rouge_l", "distill_valid_rouge_l"),
        ("eval_reverse_kl_token", "distill_valid_reverse_kl"),
        ("eval_response_tokens", "distill_valid_response_tokens"),
    ):
        if isinstance(record.get(key), int | float):
            gauge(name).set(float(record[key]))
