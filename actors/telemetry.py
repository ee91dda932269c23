"""Custom Ray metrics, exported on Ray's metrics endpoint with a `ray_` prefix (`ray_distill_sampled_tokens_total`).

Created lazily inside actor processes; the plain classes never touch them, only the Ray wrappers do.
"""

from __future__ import annotations

from functools import cache

from ray.util import metrics

COUNTERS = {
    "distill_sampled_tokens": "response tokens sampled by the samplers",
    "distill_teacher_scored_tokens": "response tokens scored by the teachers",
    "distill_skipped_steps": "updates skipped for a non-finite loss or gradient norm",
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
    "distill_weight_version": "weight version of the samplers' student",
}


@cache
def counter(name: str) -> metrics.Counter:
    return metrics.Counter(name, description=COUNTERS[name])


@cache
def gauge(name: str) -> metrics.Gauge:
    return metrics.Gauge(name, description=GAUGES[name])


def record_update(result: dict[str, float]) -> None:
    """Learner metrics from an update's result dict (keys missing for a phase are skipped)."""
    if result.get("skipped"):
        counter("distill_skipped_steps").inc(result["skipped"])
    if "kl_sum" in result and result.get("tokens"):  # a rank's share: its own tokens' mean reverse KL
        gauge("distill_reverse_kl").set(result["kl_sum"] / result["tokens"])
    for key, name in (
        ("step_seconds", "distill_learner_step_seconds"),
        ("loss", "distill_loss"),
        ("loss_single", "distill_loss_single"),
        ("loss_long", "distill_loss_long"),
        ("loss_pt", "distill_loss_pt"),
        ("reverse_kl", "distill_reverse_kl"),
    ):
        if key in result:
            gauge(name).set(float(result[key]))
