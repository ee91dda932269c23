"""The training recipe, top to bottom: set-up (every actor started, learner/actor_set.py) -> the method (minillm,
sft, kd, seqkd, heal) -> clean-up. The driver schedules and logs; tensors go from actor to actor by reference
(sampler -> teacher -> learner ranks, learner -> samplers), and only token ids, metrics and references come here.

One MiniLLM collection: fill the pipeline (sampler.sample -> teacher.score -> rollout queue, learner/pipeline.py)
-> take the collection by batch id -> the learner ranks update on their shards -> publish the weights to the
samplers (a new version, learner/weights.py) -> log / evaluate / keep the best (learner/best.py) -> checkpoint.

A dead sampler, teacher or rollout queue is recovered inside the pipeline; a learner group that fails is replaced
here (`run`, learner/recovery.py) and the method goes on from the newest complete checkpoint, as on a resume.
"""

from __future__ import annotations

import time
from typing import Any

import ray

from common import storage
from common.config import DistillConfig, resolve_path
from common.data import LMBatch, TokenizedExample, iterate_batches, pretrain_batches
from common.progress import progress_suffix
from common.resumable import Counted
from common.rollout import merge_infos
from learner.actor_set import ActorSet
from learner.best import BestCheckpoint, score_of
from learner.group import LearnerFailed, LearnerGroup
from learner.pipeline import CollectionPlan, RolloutPipeline
from learner.recovery import FailureBudget, replace_learner_group
from learner.run_log import (
    RunLogger,
    RunStopped,
    Sections,
    copy_checkpoint,
    driver_rss_mb,
    minillm_update_record,
    print_minillm_progress,
)
from learner.seqkd import sample_teacher_responses
from learner.training_state import TrainingState
from learner.validation import Split, ValidationResult, Validator, lm_batch
from learner.weights import WeightPublisher

# an SFT run selecting by ROUGE-L also keeps, under this checkpoint name, its weights of lowest validation loss
LOWEST_VALID_LOSS = "lowest_valid_loss"


class Recipe:
    def __init__(
        self,
        cfg: DistillConfig,
        assets: Any,
        tokenizer: Any,
        vocab_size: int,
        train: Split,
        valid: Split,
        logger: RunLogger,
        run_dir: str,
    ):
        self.cfg, self.assets, self.tok = cfg, assets, tokenizer
        self.train_items = train[1]
        # every durable artifact goes into the run's folder in storage (storage.path), written by whoever has it
        self.run_dir = storage.canonical(run_dir)
        self.log, self.models_dir = logger, storage.join(self.run_dir, "checkpoints")  # HF folders: best/, final/
        self.actors = ActorSet(cfg, assets, tokenizer, vocab_size)
        self.budget = FailureBudget(cfg.cluster.max_failures)
        self.weights = WeightPublisher(self.actors, self.budget)
        self.pipeline = RolloutPipeline(self.actors, self.weights, self.budget)
        self.validator = Validator(cfg, self.actors, self.weights, logger, valid)
        self.state = TrainingState(cfg, self.run_dir, self.actors, self.weights, logger)
        self.seqkd_items: list[TokenizedExample] | None = None
        self.phase_start: ValidationResult | None = None  # the last train_phase's start validation (not on resume)

    @property
    def learner(self) -> LearnerGroup:
        assert self.actors.learner is not None
        return self.actors.learner

    def model_dir(self, name: str) -> str:
        """An HF folder of the run (sft_best, best, final) in storage."""
        return storage.join(self.models_dir, name)

    # ===== the methods ===============================================================================
    def run(self) -> dict[str, Any]:
        """The method; a learner group that fails is replaced and the method goes on from the newest complete
        checkpoint (phases already done are skipped as on a resume)."""
        while True:
            try:
                summary = self.run_method()
            except LearnerFailed as exc:
                restart = replace_learner_group(
                    str(exc), self.actors, self.pipeline, self.weights, self.budget, self.state
                )
                self.state.restart_from(restart)
                continue
            summary["learner_restarts"] = self.state.learner_restarts
            return summary

    def run_method(self) -> dict[str, Any]:
        c = self.cfg
        summary: dict[str, Any] = {"method": c.method}
        if c.method == "minillm":
            given = str(resolve_path(c.models.sft_checkpoint)) if c.models.sft_checkpoint else None
            sft_dir = given
            if self.state.resume_point is not None and self.state.resume_point.phase == "minillm":  # SFT is done
                sft_dir = self.state.resume_point.sft_dir
            if not self.actors.samplers:  # a learner restart re-enters here with every actor up
                # actors start from input weights only (folders every node has); a resumed run's SFT'd weights are in
                # storage: the learner restores them from the checkpoint and publishes them to the samplers
                self.actors.start(given or self.assets.student_dir)
            if sft_dir is None:
                sft_dir = self.train_phase("sft", self.train_items, c.learner.sft_init_select_by)
                self.weights.publish()
            summary["sft_checkpoint"] = sft_dir
            summary.update(self.minillm_phase(sft_dir))
            return summary
        if c.method == "heal":
            return {**summary, **self.heal()}
        if not self.actors.samplers:
            self.actors.start(self.assets.student_dir)
        items = self.train_items
        if c.method == "seqkd":  # sampled once: a learner restart reuses them
            self.seqkd_items = self.seqkd_items or sample_teacher_responses(c, self.actors.samplers, items)
            items = self.seqkd_items
        self.train_phase(c.method, items, c.learner.baseline_select_by)
        self.weights.publish()
        res = self.validator.run(f"{c.method}-best", self.state.global_step)
        self.save_kept_as("best", "final")  # the learner holds the kept weights (reloaded by train_phase)
        # "final" is the kept weights (what checkpoints/final holds); "start" the initial student, when this
        # process evaluated it (not after a resume, nor under select_by=valid_loss)
        start = self.phase_start.as_dict("") if self.phase_start is not None else None
        summary.update({"start": start, "final": res.as_dict(""), "best_valid_rouge_l": res.rouge_l})
        return summary

    def heal(self) -> dict[str, Any]:
        """Word-level KD from the teacher on general text (the recipe's validation set is then held-out general
        text): the student's and the teacher's held-out NLL before, the student's after (lowest kept)."""
        if not self.actors.teachers:
            self.actors.start(self.assets.student_dir)
        resumed = self.state.resume_point is not None and self.state.resume_point.phase == "heal"
        teacher_nll = self.validator.teacher_valid_loss()
        start_nll = None if resumed else self.validator.valid_loss()
        if start_nll is not None:
            self.log.log({"phase": "heal-start", "global_step": 0, "valid_loss": start_nll})
            print(
                f"[heal] held-out NLL per token: student {start_nll:.3f}, teacher {teacher_nll:.3f} "
                f"(gap {start_nll - teacher_nll:.3f})",
                flush=True,
            )
        self.train_phase("heal", self.train_items, "valid_loss")
        kept = self.validator.valid_loss()
        self.save_kept_as("best", "final")  # the learner holds the kept weights (reloaded by train_phase)
        print(
            f"[heal] kept: held-out NLL {kept:.3f} per token, teacher {teacher_nll:.3f} (gap {kept - teacher_nll:.3f})",
            flush=True,
        )
        return {
            "teacher_valid_loss": teacher_nll,
            "start_valid_loss": start_nll,
            "kept_valid_loss": kept,
            "gap_to_teacher": kept - teacher_nll,
            "train_blocks": len(self.train_items),
            "valid_blocks": len(self.validator.items),
        }

    def train_phase(self, kind: str, items: list[TokenizedExample], select_by: str) -> str:
        """Fine-tune the student (sft / seqkd: NLL on `items`; kd / heal: word-level KD + NLL) for learner.sft_steps
        and keep the checkpoint with the lowest validation loss or the highest validation ROUGE-L (`select_by`; under
        ROUGE-L the initial student competes too unless learner.start_competes is false). Returns the kept
        checkpoint, loaded back into the learner."""
        c, learner, tok_dir = self.cfg, self.learner, self.assets.tokenizer_dir
        learner.reset_optimizer(c.learner.sft_lr)
        by_rouge = select_by == "rouge_l"
        best = BestCheckpoint(self.model_dir(f"{kind}_best"), select_by)
        # the paper's protocol picks SFT twice from one run: the SFT baseline by validation ROUGE-L, MiniLLM's
        # initialisation by the lowest validation loss; a run selecting by ROUGE-L keeps the latter as well
        lowest = BestCheckpoint(self.model_dir(LOWEST_VALID_LOSS), "valid_loss") if by_rouge and kind == "sft" else None
        point, done = self.state.point_for(kind), 0
        if point is not None:
            self.state.restore_learner_and_publish(point)
            best.score, done = point.best, point.phase_step
            if lowest is not None:
                lowest.score = point.extra.get("lowest_valid_loss")
        self.phase_start = None
        if point is None and by_rouge:
            self.phase_start = self.validator.run(f"{kind}-start", self.state.global_step)
            if c.learner.start_competes:
                best.save(self.phase_start.rouge_l, learner, tok_dir)
        batches = Counted(
            iterate_batches(items, c.learner.sft_batch_size, c.seed), point.prompt_batches if point else 0
        )
        steps, time_in, t0 = c.learner.sft_steps, Sections(), time.time()
        print(
            f"[{kind}] {steps} steps, batch {c.learner.sft_batch_size}, lr {c.learner.sft_lr}, select by {select_by}",
            flush=True,
        )
        for step in range(done + 1, steps + 1):
            with time_in("update"):
                m = self.lm_update(kind, lm_batch(next(batches), self.tok.pad_token_id), step)
            self.state.global_step += 1
            record: dict[str, Any] = {"phase": kind, "global_step": self.state.global_step, "step": step, **m}
            if step % c.learner.sft_eval_every == 0 or step == steps:
                with time_in("validation"):
                    # the validation loss is logged under either rule (one cheap pass): it shows when they disagree
                    loss = record["valid_loss"] = self.validator.valid_loss()
                    score, shown = loss, f"valid {loss:.3f}"
                    if by_rouge:
                        self.weights.publish()
                        res = self.validator.run(f"{kind}-step-{step}", self.state.global_step)
                        score, shown = res.rouge_l, f"{shown} ROUGE-L {res.rouge_l:.2f}"
                        record.update(res.as_dict())
                if best.save_if_better(score, learner, tok_dir):
                    record["best"] = True
                if lowest is not None and lowest.save_if_better(loss, learner, tok_dir):
                    record["lowest_valid_loss"] = True
                print(
                    f"[{kind}] step {step}/{steps} loss {m['loss']:.3f} {shown} "
                    f"(best {best.score:.3f}) {progress_suffix(step, steps, time.time() - t0, done)}",
                    flush=True,
                )
            elif step % c.logging.progress_every == 0:
                shown = progress_suffix(step, steps, time.time() - t0, done)
                print(f"[{kind}] step {step}/{steps} loss {m['loss']:.3f} {shown}", flush=True)
            self.log.log({**record, **time_in.pop()})
            if self.state.non_finite.limit_reached(m, kind):
                self.save_final_and_stop(kind)
            # at the phase's end MiniLLM's start or the run's end saves
            if step < steps and self.state.saver.due(step - 1, step):
                extra = {"extra": {"lowest_valid_loss": lowest.score}} if lowest is not None else {}
                self.state.save(kind, step, best=best.score, prompt_batches=batches.drawn, pretrain_batches=0, **extra)
        for kept in (best, lowest):
            if kept is not None and not storage.is_complete_dir(kept.path):  # no steps: the initial student is kept
                learner.save(kept.path, tok_dir)
        learner.load_state(best.path)  # every rank reads it from storage
        # measured again on the weights just reloaded: what the phase hands on, not what it logged at the time
        kept_loss = self.validator.valid_loss()
        self.log.log(
            {"phase": "selection", "of": kind, "global_step": self.state.global_step, "kept_valid_loss": kept_loss}
        )
        return best.path

    def lm_update(self, kind: str, batch: LMBatch, step: int) -> dict[str, float]:
        """One SFT / SeqKD / KD update; for KD the teacher scores each rank's part and sends it to that rank."""
        parts = [ray.put(p) for p in self.learner.split(batch)]
        if kind not in ("kd", "heal"):
            return self.learner.sft_step(parts)
        teacher = self.actors.teachers[step % len(self.actors.teachers)]
        scored = teacher.score_lm.options(num_returns=len(parts)).remote(*parts)
        return self.learner.kd_step(parts, scored if isinstance(scored, list) else [scored])

    def minillm_phase(self, sft_dir: str) -> dict[str, Any]:
        """Algorithm 1 with the paper's PPO schedule: collect rollouts_per_collection rollouts (teacher-mixed samples,
        scored) -> ppo_epochs passes of mini-batch updates (single + long + L_PT) -> publish the weights. Sampling of
        the next collections runs ahead, up to `max_version_lag` pushes behind the learner."""
        c, lc, learner, pipeline = self.cfg, self.cfg.learner, self.learner, self.pipeline
        learner.reset_optimizer(lc.lr)
        point = self.state.point_for("minillm")
        if point is not None:
            self.state.restore_learner_and_publish(point)
        pretrain = Counted(pretrain_batches(c, self.tok), point.pretrain_batches if point else 0)
        prompts = Counted(
            iterate_batches(self.train_items, lc.batch_size, c.seed + 1), point.prompt_batches if point else 0
        )
        plan = CollectionPlan.of(lc)
        best = BestCheckpoint(self.model_dir("best"), lc.minillm_select_by, save_dtype=c.checkpoint.save_dtype)
        if point is None:
            start = last = self.validator.run("minillm-start", self.state.global_step) if c.eval.at_start else None
            best.score = score_of(start, best.metric) if start is not None and lc.start_competes else None
        else:
            start, last = (ValidationResult(**r) if r else None for r in (point.start, point.last))
            best.score = point.best
        if point is None or not storage.is_complete_dir(best.path):  # resumed into another folder: from SFT's
            copy_checkpoint(sft_dir, best.path)
        steps, time_in, t0, step = lc.minillm_steps, Sections(), time.time(), point.phase_step if point else 0
        first = step  # the rate counts this process's steps only (a resumed phase starts part-way)
        print(f"[minillm] {steps} updates: {plan.describe(c)}", flush=True)
        kept = {"sft_dir": sft_dir, "start": start, "last": last}  # saved with every MiniLLM checkpoint
        if point is None and self.state.saver.every > 0:  # the phase's start (SFT's end): a resume skips SFT from here
            self.state.save("minillm", 0, best=best.score, prompt_batches=0, pretrain_batches=pretrain.drawn, **kept)
        while step < steps:
            # ---- fill the pipeline (never past the next checkpoint: nothing is in flight there)
            limit = self.state.saver.launch_limit(
                step, steps, plan.updates, plan.batches, prompts.drawn - len(pipeline)
            )
            pipeline.fill(prompts, plan.ahead, limit)
            # ---- take the collection
            with time_in("wait"):
                taken = [pipeline.take() for _ in range(plan.batches)]
            self.state.consumed.extend(t.info.batch_id for t in taken)
            info = merge_infos([t.info for t in taken])
            # ---- update
            pt = [next(pretrain, None) for _ in range(min(plan.updates, steps - step))]
            with time_in("update"):
                shards, alpha = [t.shards for t in taken], c.objective.alpha
                updates = learner.minillm_collection(
                    shards, alpha, lc.ppo_epochs, plan.minibatch, lc.micro_batch_size, pt
                )
            # ---- publish the weights (a new version, when they changed)
            lag, before = self.weights.version - info.weight_version, step
            if any(not u.get("skipped") for u in updates):
                with time_in("push"):
                    self.weights.publish(wait=False)
            sections = time_in.pop()
            # ---- log / evaluate / keep the best
            for i, m in enumerate(updates):
                step, self.state.global_step = step + 1, self.state.global_step + 1
                record = minillm_update_record(
                    step, self.state.global_step, i, m, info, taken, self.weights.version, lag, self.budget.spent
                )
                if i == len(updates) - 1:
                    record.update({**sections, "driver_rss_mb": driver_rss_mb()})
                if c.logging.sampled_ids and i == 0:
                    record["sampled_ids"] = [ray.get(pipeline.sampled_ids.pop(t.info.batch_id)) for t in taken]
                if step % c.eval.every_steps == 0 or (step == steps and c.eval.at_end):
                    with time_in("validation"):
                        last = self.validator.run(f"minillm-step-{step}", self.state.global_step)
                    record.update({**last.as_dict(), **time_in.pop()})
                    if best.save_if_better(score_of(last, best.metric), learner, self.assets.tokenizer_dir):
                        record["best"] = True
                self.log.log(record)
                if self.state.non_finite.limit_reached(m, "minillm"):
                    self.save_final_and_stop("minillm")
                if step % c.logging.progress_every == 0 or step == steps:
                    print_minillm_progress(record, steps, progress_suffix(step, steps, time.time() - t0, first))
            # ---- checkpoint
            if self.state.saver.due(before, step, steps):
                kept.update(last=last)
                self.state.save(
                    "minillm",
                    step,
                    best=best.score,
                    prompt_batches=prompts.drawn,
                    pretrain_batches=pretrain.drawn,
                    **kept,
                )
        self.weights.wait()
        pipeline.cancel_all()
        self.save_kept_as("final")
        return {
            "start": start.as_dict("") if start else None,
            "final": last.as_dict("") if last else None,
            "best_valid_rouge_l" if best.metric == "rouge_l" else "best_valid_reverse_kl": best.score,
            "minillm_seconds": round(time.time() - t0, 1),
            "batches_consumed": self.state.consumed,
            "failures": self.budget.spent,
            "weight_version": self.weights.version,
            "sampler_stats": ray.get(self.actors.samplers[0].get_stats.remote()),
            "teacher_stats": ray.get(self.actors.teachers[0].get_stats.remote()),
        }

    # ===== helpers ===================================================================================
    def save_kept_as(self, *names: str) -> None:
        """The learner's weights (a phase's kept ones) saved as the HF folders `names`."""
        for name in names:
            self.learner.save(self.model_dir(name), self.assets.tokenizer_dir, self.cfg.checkpoint.save_dtype)

    def save_final_and_stop(self, phase: str) -> None:
        """learner.max_bad_steps non-finite updates in a row: the weights of the last good update (the learner skips
        bad updates) are saved as final/, and the run stops."""
        self.save_kept_as("final")
        raise RunStopped(
            f"{self.state.non_finite.in_row} updates in a row had a non-finite loss or gradient norm "
            f"(learner.max_bad_steps={self.cfg.learner.max_bad_steps}) in the {phase} phase at global "
            f"step {self.state.global_step}; the last good weights are in {self.model_dir('final')}"
        )

    # ===== clean-up ==================================================================================
    def cleanup(self) -> None:
        self.actors.shutdown()
