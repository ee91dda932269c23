"""Failure recovery: the failure budget (cluster.max_failures), bounded waits, the guard on non-finite updates, and
the replacement of a failed learner group.

A learner rank that dies takes the whole learner group with it (FSDP ranks cannot go on without a peer): the group
is replaced, the newest complete training-state checkpoint is restored into it (the code path of `resume=`), the
batches sampled since from weights that no longer exist are dropped, and the method goes on. A dead sampler or
teacher costs the batch it was working on (sampled again, see learner/pipeline.py); a dead rollout queue is replaced
and refilled with the batches in flight. Each of these spends one failure of the budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray

from common.errors import one_line_error
from learner.checkpoint import ResumePoint, latest_complete
from learner.group import LearnerFailed
from learner.run_log import RunStopped

if TYPE_CHECKING:
    from learner.actor_set import ActorSet
    from learner.pipeline import RolloutPipeline
    from learner.training_state import TrainingState
    from learner.weights import WeightPublisher


class FailureBudget:
    """Actor failures a run survives (cluster.max_failures): lost batches, lost weight pushes, learner groups and
    rollout queues replaced."""

    def __init__(self, max_failures: int):
        self.max_failures = max_failures
        self.spent = 0

    def spend(self, what: str) -> None:
        """Count one failure; past the budget the run stops, with `what` (the failure) in its one-line reason."""
        self.spent += 1
        if self.spent > self.max_failures:
            raise RunStopped(f"{what}, and cluster.max_failures={self.max_failures} failures are spent")


def wait_for(ref: Any, what: str, timeout_s: float) -> Any:
    """ray.get bounded by cluster.task_timeout_s; a timeout stops the run naming `what`."""
    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise RunStopped(f"waited cluster.task_timeout_s={timeout_s:g}s for {what}") from None


class NonFiniteGuard:
    """Updates skipped for a non-finite loss or gradient norm, counted in a row (learner.max_bad_steps)."""

    def __init__(self, max_in_row: int, in_row: int = 0):
        self.max_in_row, self.in_row = max_in_row, in_row

    def limit_reached(self, m: dict[str, float], phase: str) -> bool:
        """Count update `m`; True when learner.max_bad_steps skipped updates in a row are reached."""
        if not m.get("skipped"):
            self.in_row = 0
            return False
        self.in_row += 1
        print(
            f"[{phase}] update skipped: non-finite loss {m.get('loss')} or gradient norm {m.get('grad_norm')} "
            f"({self.in_row} in a row)",
            flush=True,
        )
        return self.in_row >= self.max_in_row


@dataclass
class LearnerRestart:
    """A learner group replaced, waiting for its checkpoint to be restored (then logged as a learner_restart)."""

    point: ResumePoint
    reason: str
    failed_at_global_step: int
    rolled_back_batch_ids: list[int]
    dropped_batch_ids: list[int]
    learner_restarts: int
    failures: int
    drain_seconds: float
    kill_seconds: float
    start_seconds: float
    t0: float

    def record(self, weight_version: int) -> dict[str, Any]:
        """The metrics.jsonl record, once the samplers hold the restored weights (`weight_version`)."""
        return {
            "phase": "learner_restart",
            "reason": self.reason,
            "failed_at_global_step": self.failed_at_global_step,
            "checkpoint": str(self.point.path),
            "restored_phase": self.point.phase,
            "restored_step": self.point.phase_step,
            "global_step": self.point.global_step,
            "rolled_back_batch_ids": self.rolled_back_batch_ids,
            "dropped_batch_ids": self.dropped_batch_ids,
            "learner_restarts": self.learner_restarts,
            "failures": self.failures,
            # where the time goes: draining (in-flight producers, pushes), teardown, the new group's start-up
            "drain_seconds": self.drain_seconds,
            "kill_seconds": self.kill_seconds,
            "start_seconds": self.start_seconds,
            "restart_seconds": round(time.time() - self.t0, 2),
            "weight_version": weight_version,
        }


def replace_learner_group(
    reason: str,
    actors: ActorSet,
    pipeline: RolloutPipeline,
    weights: WeightPublisher,
    budget: FailureBudget,
    state: TrainingState,
) -> LearnerRestart:
    """Kill every rank of a failed learner group and start a new one (its weights are the initial ones until the
    returned restart's checkpoint is restored into it). Batches launched since that checkpoint were sampled from
    weights that no longer exist: the ones queued or on their way are dropped, the ones consumed are taken out of
    the ledger (`state.consumed`); all are sampled again, under the same ids, from the restored weights. Spends one
    failure."""
    c, t0 = actors.cfg, time.time()
    if actors.learner is None or actors.student_dir is None:  # the group never came up: nothing to restore into
        raise RunStopped(f"{reason} while the learner group was starting")
    budget.spend(reason)
    if c.learner.weight_sync != "object_store":  # the weight group cannot take a new rank 0 back
        raise RunStopped(f"{reason}; a learner restart needs learner.weight_sync=object_store")
    path = latest_complete(state.saver.root)
    if path is None:
        raise RunStopped(f"{reason}, before any complete checkpoint to restart from (checkpoint.every_steps)")
    point = ResumePoint.read(path)
    print(f"[fault] {reason}: restarting the learner group from {path} ({budget.spent} failure(s))", flush=True)
    dropped = pipeline.drop_all_in_flight()
    rolled_back = [b for b in state.consumed if b >= point.prompt_batches]
    state.consumed = [b for b in state.consumed if b < point.prompt_batches]
    weights.drain_pushes_of_lost_weights()
    t_kill = time.time()
    actors.learner.kill()
    actors.learner = None
    t_start = time.time()
    try:
        actors.start_learner(actors.student_dir)
    except (LearnerFailed, ray.exceptions.RayError) as exc:
        raise RunStopped(f"{reason}; the new learner group did not start ({one_line_error(exc)})") from exc
    return LearnerRestart(
        point=point,
        reason=reason,
        failed_at_global_step=state.global_step,
        rolled_back_batch_ids=rolled_back,
        dropped_batch_ids=dropped,
        learner_restarts=state.learner_restarts + 1,
        failures=budget.spent,
        drain_seconds=round(t_kill - t0, 2),
        kill_seconds=round(t_start - t_kill, 2),
        start_seconds=round(time.time() - t_start, 2),
        t0=t0,
    )
