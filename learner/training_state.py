"""The driver's side of the training state (global step, the non-finite guard, the ledger of batches consumed, the
checkpoint to continue from) and the training-state checkpoints that save it with the learner's and restore both."""

from __future__ import annotations

import time
from typing import Any

from common.config import DistillConfig, dump_config
from learner.actor_set import ActorSet
from learner.checkpoint import ResumePoint, StateCheckpointer, restore_learner_state
from learner.recovery import LearnerRestart, NonFiniteGuard
from learner.run_log import RunLogger
from learner.weights import WeightPublisher


class TrainingState:
    def __init__(self, cfg: DistillConfig, run_dir: str, actors: ActorSet, weights: WeightPublisher, log: RunLogger):
        self.actors, self.weights, self.log = actors, weights, log
        self.saver = StateCheckpointer(run_dir, cfg.checkpoint.every_steps, cfg.checkpoint.keep, dump_config(cfg))
        self.global_step = 0
        self.non_finite = NonFiniteGuard(cfg.learner.max_bad_steps)
        self.consumed: list[int] = []  # the ledger: ids of the MiniLLM batches the updates used
        self.resume_point: ResumePoint | None = None  # a resume (set by the driver) or a learner restart
        self.learner_restarts = 0
        self.restart: LearnerRestart | None = None  # a learner restart, logged once its checkpoint is restored

    def restart_from(self, restart: LearnerRestart) -> None:
        """A learner group was replaced: the method continues from the restart's checkpoint."""
        self.restart, self.resume_point, self.learner_restarts = restart, restart.point, restart.learner_restarts

    def point_for(self, phase: str) -> ResumePoint | None:
        """The checkpoint phase `phase` continues from (a resume, a learner restart), or None."""
        point = self.resume_point
        return point if point is not None and point.phase == phase else None

    def restore_learner_and_publish(self, point: ResumePoint) -> None:
        """Restore the learner and the driver's counters from `point` (after reset_optimizer: the optimizer is the
        phase's, its state overwritten), publish the restored weights to the samplers, and log the learner restart
        that led here, if any."""
        assert self.actors.learner is not None
        t0 = time.time()
        restore_learner_state(self.actors.learner, point)
        self.global_step, self.non_finite.in_row = point.global_step, point.bad_in_row
        self.weights.publish_restored(point.version)
        print(
            f"[resume] {point.phase} from step {point.phase_step} (global {point.global_step}, weight version "
            f"{point.version}, now {self.weights.version}): {point.path} ({time.time() - t0:.1f}s)",
            flush=True,
        )
        if self.restart is not None:  # metrics.jsonl: the restart, once the samplers hold the restored weights
            self.log.log(self.restart.record(self.weights.version))
            self.restart = None

    def save(self, phase: str, phase_step: int, **fields: Any) -> str:
        """A checkpoint of the whole training state at a point where nothing is in flight (see launch_limit).
        `fields`: the phase's own part of a ResumePoint (best, prompt_batches, pretrain_batches, sft_dir, ...)."""
        assert self.actors.learner is not None
        self.log.sync()  # metrics.jsonl up to the length the checkpoint records is durable before it lands
        for key in ("start", "last"):  # ValidationResults, stored as their fields
            fields[key] = fields[key].__dict__ if fields.get(key) is not None else None
        driver = ResumePoint(
            path="",
            phase=phase,
            phase_step=phase_step,
            global_step=self.global_step,
            version=self.weights.version,
            bad_in_row=self.non_finite.in_row,
            metrics_bytes=self.log.metrics_bytes(),
            **fields,
        )
        return self.saver.save(self.actors.learner, driver)
