"""The training recipe, top to bottom: set-up (every actor started here) -> the method (minillm, sft, kd, seqkd,
heal) -> clean-up. The driver schedules and logs; tensors go from actor to actor by reference (sampler -> teacher ->
learner ranks, learner -> samplers), and only token ids, metrics and references come back here.

One MiniLLM step:  sampler.sample -> teacher.score (one shard per learner rank) -> replay queue (references)
                   -> learner ranks update on their shard -> weights pushed to the samplers (a new version).

A learner rank that dies takes the whole learner group with it (FSDP ranks cannot go on without a peer): `run`
replaces the group, restores the newest complete training-state checkpoint into it (the code path of `resume=`),
drops the batches sampled since from weights that no longer exist, and goes on, up to cluster.max_failures.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray

from actors.placement import Placement
from actors.remote import make_replay, make_sampler, make_teacher
from actors.sampler import sampler_spec
from common import storage
from common.config import DistillConfig, dump_config, resolve_path, weight_sync_backend
from common.data import (
    Example,
    LMBatch,
    TokenizedExample,
    collate_prompt_response,
    iterate_batches,
    iterate_pretrain,
    load_pretrain_blocks,
)
from common.placement import num_samplers
from common.resumable import EVAL, TRAIN_BATCH, Counted, sampling_seed
from common.rollout import merge_infos
from learner.checkpoint import Checkpointer, ResumePoint, latest_complete, response_ids, restore_learner
from learner.group import LearnerFailed, LearnerGroup
from learner.run_log import RunLogger, RunStopped, copy_checkpoint
from learner.validation import ValidationResult, validate

Split = tuple[list[Example], list[TokenizedExample]]
# an SFT run selecting by ROUGE-L also keeps, under this checkpoint name, its weights of lowest validation loss
LOWEST_VALID_LOSS = "lowest_valid_loss"


def one_line_error(exc: BaseException) -> str:
    """The first line of an error's message (Ray's carry whole remote tracebacks)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _rss_mb() -> float:
    """The driver's resident memory (it must stay flat: tensors never come through the driver)."""
    import psutil

    return round(psutil.Process().memory_info().rss / 2**20, 1)


class Sections:
    """Named wall-time sections of a loop; `pop()` hands back `<name>_seconds` and starts over."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0

    def pop(self) -> dict[str, float]:
        out = {f"{k}_seconds": round(v, 4) for k, v in self.seconds.items()}
        self.seconds.clear()
        return out


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
        run_dir: str | Path,
    ):
        self.cfg, self.assets, self.tok, self.vocab = cfg, assets, tokenizer, vocab_size
        self.train_examples, self.train_items = train
        self.valid_examples, self.valid_items = valid
        # every durable artifact goes into the run's folder in storage (storage.path), written by whoever has it
        self.run_dir = storage.canonical(run_dir)
        self.log, self.ckpt_root = logger, storage.join(self.run_dir, "checkpoints")
        self.version = 0  # weight version the samplers hold (or are being sent)
        self.global_step = 0
        self.pending_pushes: list = []
        self.bad_in_row = 0  # consecutive updates skipped for a non-finite loss or gradient
        self.failures = 0  # sampler/teacher tasks lost to a dead actor or a timeout, and learner group failures
        self.learner_restarts = 0
        self.restart: dict[str, Any] | None = None  # the restart in progress, logged once the checkpoint is restored
        self.consumed: list[int] = []  # the ledger: ids of the MiniLLM batches the updates used
        self.inflight: deque = deque()  # MiniLLM batches launched and not yet taken: (id, prompts, producer ref)
        self.generation = 0  # of the replay queue: bumped by a learner restart, older batches are refused
        self.student_dir: str | None = None  # the learner ranks' initial weights
        self.seqkd_items: list[TokenizedExample] | None = None
        self.phase_start: ValidationResult | None = None  # the last train_phase's start validation (not on resume)
        self.sampled_ids: dict[int, Any] = {}  # batch id -> ref to its sampled token ids (logging.sampled_ids)
        self.resume_point: ResumePoint | None = None  # set by the driver when the run continues a checkpoint
        self.ckpts = Checkpointer(self.run_dir, cfg.checkpoint.every_steps, cfg.checkpoint.keep, dump_config(cfg))
        held_out = list(self.valid_items)
        random.Random(cfg.seed).shuffle(held_out)
        self.eval_items = held_out[: cfg.eval.num_prompts]
        n_kl = min(cfg.eval.kl_prompts, len(held_out))
        n_kl -= n_kl % cfg.learner.num_workers  # every learner rank scores an equal share
        self.kl_items = held_out[len(held_out) - n_kl :]
        self.placement: Placement | None = None
        self.learner: LearnerGroup | None = None
        self.teachers: list = []
        self.samplers: list = []
        self.replay: Any = None

    def ckpt(self, name: str) -> str:
        """An HF folder of the run (sft_best, best, final) in storage."""
        return storage.join(self.ckpt_root, name)

    # ===== set-up ====================================================================================
    def start_actors(self, student_dir: str) -> None:
        """Every actor of the service, in one placement group: learner ranks, teachers, samplers (student engine,
        plus a teacher engine when the method samples from the teacher), the replay queue."""
        c = self.cfg
        self.placement = Placement(c)
        where = self.placement.of
        t0 = time.time()
        self.start_learner(student_dir)
        self.teachers = [
            make_teacher(
                i,
                c.cluster.teacher_cpus,
                c.cluster.teacher_gpus,
                self.assets.teacher_dir,
                self.vocab,
                self.tok.pad_token_id,
                batch_size=c.teacher.batch_size,
                transport=c.teacher.transport,
                top_k=c.teacher.top_k,
                dtype=c.models.dtype,
                chunk_tokens=c.learner.logit_chunk_tokens,
                placement=where(f"teacher-{i}"),
                threads=c.cluster.torch_threads,
                max_restarts=c.cluster.max_actor_restarts,
            )
            for i in range(c.teacher.num_teachers)
        ]
        alpha = {"minillm": c.objective.alpha, "seqkd": 1.0}.get(c.method, 0.0)
        self.samplers = [
            make_sampler(
                sampler_spec(
                    c, student_dir, self.assets.teacher_dir, self.tok.eos_token_id, alpha, i, vocab_size=self.vocab
                ),
                i,
                c.cluster.sampler_cpus,
                c.cluster.sampler_gpus,
                placement=where(f"sampler-{i}"),
                threads=c.cluster.torch_threads,
                # a collective weight group cannot take a restarted member back: restarts need object_store pushes
                max_restarts=c.cluster.max_actor_restarts if c.learner.weight_sync == "object_store" else 0,
            )
            for i in range(num_samplers(c))
        ]
        if c.method == "minillm":
            self.replay = make_replay(
                c.learner.replay_capacity, c.learner.max_version_lag, c.cluster.replay_cpus, placement=where("replay")
            )
        ray.get([s.get_version.remote() for s in self.samplers] + [t.get_stats.remote() for t in self.teachers])
        print(
            f"[setup] {c.learner.num_workers} learner rank(s), {len(self.teachers)} teacher(s), "
            f"{len(self.samplers)} sampler(s) ready in {time.time() - t0:.1f}s",
            flush=True,
        )
        if c.learner.weight_sync == "collective":
            self._connect_weight_group()

    def start_learner(self, student_dir: str) -> None:
        c, where = self.cfg, self.placement.of if self.placement is not None else (lambda name: {})
        self.student_dir = student_dir
        self.learner = LearnerGroup(
            c.learner.num_workers,
            c.cluster.learner_cpus,
            c.cluster.learner_gpus,
            student_dir,
            c.learner,
            c.objective,
            self.vocab,
            c.models.dtype,
            c.seed,
            placements=[where(f"learner-{r}") for r in range(c.learner.num_workers)],
            threads=c.cluster.torch_threads,
            timeout_s=c.cluster.task_timeout_s,
            teacher_dir=self.assets.teacher_dir if c.teacher.transport == "hidden" else None,
        )

    def _connect_weight_group(self) -> None:
        """The learner's rank 0 and the samplers form the weight group (all join at once: it is collective)."""
        assert self.learner is not None
        backend = weight_sync_backend(self.cfg.cluster)
        host, port = self.learner.weight_sync_address()
        world = 1 + len(self.samplers)
        ray.get(
            [
                self.learner.init_weight_sender(host, port, world, backend),
                *[s.join_weight_group.remote(host, port, 1 + i, world, backend) for i, s in enumerate(self.samplers)],
            ]
        )
        print(
            f"[weights] collective push over {backend}: learner rank 0 -> {len(self.samplers)} sampler(s)", flush=True
        )

    # ===== the methods ===============================================================================
    def run(self) -> dict[str, Any]:
        """The method; a learner group that fails is replaced and the method goes on from the newest complete
        checkpoint (phases already done are skipped as on a resume)."""
        while True:
            try:
                summary = self.run_method()
            except LearnerFailed as exc:
                self.restart_learner(str(exc))
                continue
            except ray.exceptions.RayError as exc:  # raised outside LearnerGroup (checkpoint.py waits on the ranks)
                dead = self.learner.dead_ranks() if self.learner is not None else []
                if not dead:
                    raise
                self.restart_learner(f"learner rank {dead[0]} died ({one_line_error(exc)})")
                continue
            summary["learner_restarts"] = self.learner_restarts
            return summary

    def run_method(self) -> dict[str, Any]:
        c = self.cfg
        summary: dict[str, Any] = {"method": c.method}
        if c.method == "minillm":
            given = str(resolve_path(c.models.sft_checkpoint)) if c.models.sft_checkpoint else None
            sft_dir = given
            if self.resume_point is not None and self.resume_point.phase == "minillm":  # SFT is done
                sft_dir = self.resume_point.sft_dir
            if not self.samplers:  # a learner restart re-enters here with every actor up
                # actors start from input weights only (folders every node has); a resumed run's SFT'd weights are in
                # storage: the learner restores them from the checkpoint and pushes them to the samplers (_resume)
                self.start_actors(given or self.assets.student_dir)
            if sft_dir is None:
                sft_dir = self.train_phase("sft", self.train_items, c.learner.sft_init_select_by)
                self.push_weights()
            summary["sft_checkpoint"] = sft_dir
            summary.update(self.minillm_phase(sft_dir))
            return summary
        if c.method == "heal":
            return {**summary, **self.heal()}
        if not self.samplers:
            self.start_actors(self.assets.student_dir)
        items = self.train_items
        if c.method == "seqkd":  # sampled once: a learner restart reuses them
            self.seqkd_items = self.seqkd_items or self.teacher_responses()
            items = self.seqkd_items
        self.train_phase(c.method, items, c.learner.baseline_select_by)
        self.push_weights()
        res = self.validation(f"{c.method}-best")
        for name in ("best", "final"):  # the learner holds the kept weights (reloaded by train_phase)
            assert self.learner is not None
            self.learner.save(self.ckpt(name), self.assets.tokenizer_dir, c.checkpoint.save_dtype)
        # "final" is the kept weights (what checkpoints/final holds); "start" the initial student, when this
        # process evaluated it (not after a resume, nor under select_by=valid_loss)
        start = self.phase_start.as_dict("") if self.phase_start is not None else None
        summary.update({"start": start, "final": res.as_dict(""), "best_valid_rouge_l": res.rouge_l})
        return summary

    def heal(self) -> dict[str, Any]:
        """Word-level KD from the teacher on general text (the recipe's validation set is then held-out general
        text): the student's and the teacher's held-out NLL before, the student's after (lowest kept)."""
        c = self.cfg
        if not self.teachers:
            self.start_actors(self.assets.student_dir)
        resumed = self.resume_point is not None and self.resume_point.phase == "heal"
        teacher_nll = self.teacher_valid_loss()
        start_nll = None if resumed else self.valid_loss()
        if start_nll is not None:
            self.log.log({"phase": "heal-start", "global_step": 0, "valid_loss": start_nll})
            print(
                f"[heal] held-out NLL per token: student {start_nll:.3f}, teacher {teacher_nll:.3f} "
                f"(gap {start_nll - teacher_nll:.3f})",
                flush=True,
            )
        self.train_phase("heal", self.train_items, "valid_loss")
        kept = self.valid_loss()
        for name in ("best", "final"):  # the learner holds the kept weights (reloaded by train_phase)
            assert self.learner is not None
            self.learner.save(self.ckpt(name), self.assets.tokenizer_dir, c.checkpoint.save_dtype)
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
            "valid_blocks": len(self.valid_items),
        }

    def teacher_valid_loss(self) -> float:
        """The teacher's token-mean NLL on the validation items, the same rows as valid_loss."""
        n, bs = self.cfg.learner.num_workers, self.cfg.learner.sft_batch_size
        refs = []
        for k, start in enumerate(range(0, len(self.valid_items), bs)):
            chunk = self.valid_items[start : start + bs]
            chunk = chunk[: (len(chunk) // n) * n]
            if chunk:
                refs.append(self.teachers[k % len(self.teachers)].lm_nll.remote(self._lm_batch(chunk)))
        sums = ray.get(refs)
        return sum(s for s, _ in sums) / max(sum(t for _, t in sums), 1.0)

    def teacher_responses(self) -> list[TokenizedExample]:
        """SeqKD data: the teacher's own samples (alpha = 1 through the samplers) for a shuffled draw of the
        training prompts, as many as the phase consumes (every sampler works at once)."""
        c = self.cfg
        pool = list(self.train_items)
        random.Random(c.seed + 7).shuffle(pool)
        prompts = pool[: min(len(pool), c.learner.sft_steps * c.learner.sft_batch_size)]
        chunk, t0 = 256, time.time()
        parts = [prompts[i : i + chunk] for i in range(0, len(prompts), chunk)]
        refs = [
            self.samplers[k % len(self.samplers)].sample.remote(
                [it.prompt_ids for it in part],
                [it.index for it in part],
                alpha=1.0,
                max_new_tokens=c.data.max_response_tokens,
            )
            for k, part in enumerate(parts)
        ]
        out: list[TokenizedExample] = []
        for k, (part, ref) in enumerate(zip(parts, refs, strict=True)):
            responses = ray.get(ref).response_ids
            out.extend(TokenizedExample(it.prompt_ids, r, it.index) for it, r in zip(part, responses, strict=True) if r)
            print(
                f"[seqkd] teacher responses {min((k + 1) * chunk, len(prompts))}/{len(prompts)} "
                f"({time.time() - t0:.0f}s)",
                flush=True,
            )
        return out

    # ===== phases ====================================================================================
    def train_phase(self, kind: str, items: list[TokenizedExample], select_by: str) -> str:
        """Fine-tune the student (sft / seqkd: NLL on `items`; kd: word-level KD + NLL) for learner.sft_steps and
        keep the checkpoint with the lowest validation loss or the highest validation ROUGE-L (`select_by`; under
        ROUGE-L the initial student competes too unless learner.start_competes is false). Returns the kept
        checkpoint, loaded back into the learner."""
        c, learner = self.cfg, self.learner
        assert learner is not None
        learner.reset_optimizer(c.learner.sft_lr)
        best_dir, by_rouge = self.ckpt(f"{kind}_best"), select_by == "rouge_l"
        best = float("inf")  # lower is better: validation loss, or -ROUGE-L
        # the paper's protocol picks SFT twice from one run: the SFT baseline by validation ROUGE-L, MiniLLM's
        # initialisation by the lowest validation loss; a run selecting by ROUGE-L keeps the latter as well
        lowest_dir = self.ckpt(LOWEST_VALID_LOSS) if by_rouge and kind == "sft" else None
        lowest = float("inf")
        point, done = self._resume(kind), 0
        if point is not None:
            best, done = point.best if point.best is not None else best, point.phase_step
            lowest = point.extra.get("lowest_valid_loss", lowest)
        self.phase_start = None
        if point is None and by_rouge:
            self.phase_start = self.validation(f"{kind}-start")
            start_score = -self.phase_start.rouge_l
            if c.learner.start_competes:
                best = start_score
                learner.save(best_dir, self.assets.tokenizer_dir)
        batches = Counted(
            iterate_batches(items, c.learner.sft_batch_size, c.seed), point.prompt_batches if point else 0
        )
        steps, time_in = c.learner.sft_steps, Sections()
        print(
            f"[{kind}] {steps} steps, batch {c.learner.sft_batch_size}, lr {c.learner.sft_lr}, select by {select_by}",
            flush=True,
        )
        t0 = time.time()
        for step in range(done + 1, steps + 1):
            with time_in("update"):
                m = self.lm_update(kind, self._lm_batch(next(batches)), step)
            self.global_step += 1
            record: dict[str, Any] = {"phase": kind, "global_step": self.global_step, "step": step, **m}
            if step % c.learner.sft_eval_every == 0 or step == steps:
                with time_in("validation"):
                    # the validation loss is logged under either rule (one cheap pass): it shows when they disagree
                    loss = record["valid_loss"] = self.valid_loss()
                    score, shown = loss, f"valid {loss:.3f}"
                    if by_rouge:
                        self.push_weights()
                        res = self.validation(f"{kind}-step-{step}")
                        score, shown = -res.rouge_l, f"{shown} ROUGE-L {res.rouge_l:.2f}"
                        record.update(res.as_dict())
                if score < best:
                    best, record["best"] = score, True
                    learner.save(best_dir, self.assets.tokenizer_dir)
                if lowest_dir is not None and loss < lowest:
                    lowest, record["lowest_valid_loss"] = loss, True
                    learner.save(lowest_dir, self.assets.tokenizer_dir)
                print(
                    f"[{kind}] step {step}/{steps} loss {m['loss']:.3f} {shown} "
                    f"(best {abs(best):.3f}, {time.time() - t0:.0f}s)",
                    flush=True,
                )
            elif step % c.logging.progress_every == 0:
                print(f"[{kind}] step {step}/{steps} loss {m['loss']:.3f} ({time.time() - t0:.0f}s)", flush=True)
            self.log.log({**record, **time_in.pop()})
            self.count_bad(m, kind)
            if step < steps and self.ckpts.due(step - 1, step):  # at the end MiniLLM's start (or the run's end) saves
                extra = {"lowest_valid_loss": lowest} if lowest_dir is not None else None
                self.save_state(kind, step, best, batches.drawn, extra=extra)
        for kept in (best_dir, lowest_dir):
            if kept is not None and not storage.is_complete_dir(kept):  # no steps: the initial student is the result
                learner.save(kept, self.assets.tokenizer_dir)
        learner.load_state(best_dir)  # every rank reads it from storage
        # measured again on the weights just reloaded: what the phase hands on, not what it logged at the time
        self.log.log(
            {"phase": "selection", "of": kind, "global_step": self.global_step, "kept_valid_loss": self.valid_loss()}
        )
        return best_dir

    def lm_update(self, kind: str, batch: LMBatch, step: int) -> dict[str, float]:
        """One SFT / SeqKD / KD update; for KD the teacher scores each rank's part and sends it to that rank."""
        learner = self.learner
        assert learner is not None
        parts = [ray.put(p) for p in learner.split(batch)]
        if kind not in ("kd", "heal"):
            return learner.sft_step(parts)
        teacher = self.teachers[step % len(self.teachers)]
        scored = teacher.score_lm.options(num_returns=len(parts)).remote(*parts)
        return learner.kd_step(parts, scored if isinstance(scored, list) else [scored])

    def minillm_phase(self, sft_dir: str) -> dict[str, Any]:
        """Algorithm 1 with the paper's PPO schedule: collect rollouts_per_collection rollouts (teacher-mixed samples,
        scored) -> ppo_epochs passes of mini-batch updates (single + long + L_PT) -> push the weights. Sampling of the
        next collections runs ahead, up to `max_version_lag` pushes behind the learner."""
        c, learner = self.cfg, self.learner
        assert learner is not None and self.replay is not None
        lc = c.learner
        learner.reset_optimizer(lc.lr)
        point = self._resume("minillm")
        pretrain = Counted(self._pretrain_batches(), point.pretrain_batches if point else 0)
        prompts = Counted(
            iterate_batches(self.train_items, lc.batch_size, c.seed + 1), point.prompt_batches if point else 0
        )
        per_collection = lc.rollouts_per_collection or lc.batch_size
        batches_per, minibatch = per_collection // lc.batch_size, lc.minibatch_size or per_collection
        updates_per = lc.ppo_epochs * per_collection // minibatch
        better = (lambda a, b: a > b) if lc.minillm_select_by == "rouge_l" else (lambda a, b: a < b)
        score_of = (lambda r: r.rouge_l) if lc.minillm_select_by == "rouge_l" else (lambda r: r.reverse_kl_token)
        if point is None:
            start = last = self.validation("minillm-start") if c.eval.at_start else None
            best = score_of(start) if start is not None and lc.start_competes else None
            copy_checkpoint(sft_dir, self.ckpt("best"))
        else:
            start, last = (ValidationResult(**r) if r else None for r in (point.start, point.last))
            best = point.best
            if not storage.is_complete_dir(
                self.ckpt("best")
            ):  # resumed into another folder: its best/ starts from SFT's
                copy_checkpoint(sft_dir, self.ckpt("best"))
        ahead = (1 + lc.max_version_lag) * batches_per
        inflight = self.inflight = deque()
        launched, steps, time_in = 0, lc.minillm_steps, Sections()
        print(
            f"[minillm] {steps} updates: collections of {per_collection} rollouts (batches of {lc.batch_size}), "
            f"{lc.ppo_epochs} epoch(s) of mini-batches of {minibatch}; alpha {c.objective.alpha}, lr {lc.lr}, "
            f"lag <= {lc.max_version_lag}, teacher transport {c.teacher.transport}",
            flush=True,
        )
        t0, step = time.time(), point.phase_step if point else 0
        launched = prompts.drawn
        if point is None and self.ckpts.every > 0:  # the phase's start (SFT's end): a resume skips SFT from here
            self.save_state("minillm", 0, best, 0, pretrain.drawn, sft_dir, start, last)
        while step < steps:
            limit = self.ckpts.launch_limit(step, steps, updates_per, batches_per, launched - len(inflight))
            while len(inflight) < ahead and launched < limit:  # launch: every hop below passes references, never values
                inflight.append(self.launch_batch(launched, next(prompts)))
                launched += 1
            with time_in("wait"):
                taken = [self.take_batch(inflight) for _ in range(batches_per)]
            self.consumed.extend(t["info"].batch_id for t in taken)
            info = merge_infos([t["info"] for t in taken])
            with time_in("update"):
                updates = learner.minillm_collection(
                    [t["shards"] for t in taken],
                    c.objective.alpha,
                    lc.ppo_epochs,
                    minibatch,
                    lc.micro_batch_size,
                    [next(pretrain, None) for _ in range(min(updates_per, steps - step))],
                )
            lag, before = self.version - info.weight_version, step
            if any(not u.get("skipped") for u in updates):  # the weights changed: a new version for the samplers
                with time_in("push"):
                    self.push_weights(wait=False)
            sections = time_in.pop()
            for i, m in enumerate(updates):
                step += 1
                self.global_step += 1
                record = {
                    "phase": "minillm",
                    "global_step": self.global_step,
                    "step": step,
                    "inner_step": i,
                    **m,
                    **info.as_dict(),
                    "learner_tokens_per_s": m["tokens"] / max(m["step_seconds"], 1e-9),
                    "queue_depth": taken[-1]["depth"],
                    "dropped_stale": taken[-1]["dropped_stale"],
                    "weight_version": self.version,
                    "rollout_version": info.weight_version,
                    "version_lag": lag,
                    "batch_ids": [t["info"].batch_id for t in taken],
                    "failures": self.failures,
                    **({**sections, "driver_rss_mb": _rss_mb()} if i == len(updates) - 1 else {}),
                }
                if c.logging.sampled_ids and i == 0:
                    record["sampled_ids"] = [ray.get(self.sampled_ids.pop(t["info"].batch_id)) for t in taken]
                if step % c.eval.every_steps == 0 or (step == steps and c.eval.at_end):
                    with time_in("validation"):
                        last = self.validation(f"minillm-step-{step}")
                    record.update(last.as_dict())
                    record.update(time_in.pop())
                    if best is None or better(score_of(last), best):
                        best, record["best"] = score_of(last), True
                        learner.save(self.ckpt("best"), self.assets.tokenizer_dir, self.cfg.checkpoint.save_dtype)
                self.log.log(record)
                self.count_bad(m, "minillm")
                if step % c.logging.progress_every == 0 or step == steps:
                    print(
                        f"[minillm] step {step}/{steps} loss {m['loss']:.3f} (single {m['loss_single']:.3f} "
                        f"long {m['loss_long']:.3f} pt {m['loss_pt']:.3f}) rKL {m['reverse_kl']:.3f} "
                        f"len {record['mean_response_tokens']:.1f} rho [{m['rho_min']:.2f}, {m['rho_max']:.2f}] "
                        f"clip {m['clip_fraction']:.2f} lag {lag} ({time.time() - t0:.0f}s)",
                        flush=True,
                    )
            if self.ckpts.due(before, step, steps):
                self.save_state("minillm", step, best, prompts.drawn, pretrain.drawn, sft_dir, start, last)
        self.wait_pushes()
        for launch in inflight:  # producers that ran ahead: not needed any more
            ray.cancel(launch[2])
        learner.save(self.ckpt("final"), self.assets.tokenizer_dir, self.cfg.checkpoint.save_dtype)
        return {
            "start": start.as_dict("") if start else None,
            "final": last.as_dict("") if last else None,
            "best_valid_rouge_l" if lc.minillm_select_by == "rouge_l" else "best_valid_reverse_kl": best,
            "minillm_seconds": round(time.time() - t0, 1),
            "batches_consumed": self.consumed,
            "failures": self.failures,
            "weight_version": self.version,
            "sampler_stats": ray.get(self.samplers[0].get_stats.remote()),
            "teacher_stats": ray.get(self.teachers[0].get_stats.remote()),
        }

    # ===== batches and failures =================================================================
    def launch_batch(self, batch_id: int, batch: list[TokenizedExample]) -> tuple[int, list, Any]:
        """Sample -> score -> queue one batch; returns (id, prompts, the producer's ref). Actors round-robin."""
        n = self.learner.n if self.learner is not None else 1
        sampler = self.samplers[batch_id % len(self.samplers)]
        # the batch's own seed: sampled again (a restarted sampler, a resume) it is the same batch
        sampler.reseed.remote(sampling_seed(self.cfg.seed, TRAIN_BATCH, batch_id))  # runs before its sample
        rollouts = sampler.sample.remote([it.prompt_ids for it in batch], [it.index for it in batch])
        if self.cfg.logging.sampled_ids:
            self.sampled_ids[batch_id] = ray.remote(num_cpus=0)(response_ids).remote(rollouts)
        info, *shards = (
            self.teachers[batch_id % len(self.teachers)]
            .score.options(num_returns=1 + n)
            .remote(rollouts, n, None, batch_id)
        )
        return batch_id, batch, self.replay.put_batch.remote(info, shards, None, self.generation)

    def take_batch(self, inflight: deque) -> dict[str, Any]:
        """The oldest launched batch, taken from the queue by its id: batches are consumed in launch order whatever
        order they arrive in. One staler than `max_version_lag` (cannot happen with the launch window above, but the
        queue checks) is sampled again under the same id."""
        assert self.replay is not None
        while True:
            batch_id, batch = self.await_batch(inflight)
            taken = self.get_with_timeout(self.replay.take.remote(self.version, batch_id), "the replay queue")
            if not taken["stale"]:
                return taken
            print(f"[minillm] batch {batch_id} was staler than learner.max_version_lag: sampling it again", flush=True)
            inflight.appendleft(self.launch_batch(batch_id, batch))

    def await_batch(self, inflight: deque) -> tuple[int, list[TokenizedExample]]:
        """Wait until the oldest launched batch is in the queue; returns its (id, prompts). A sampler or teacher that
        died (Ray restarts it) or a timeout loses it: the current weights go to any restarted sampler and the same
        prompts are sampled again, under the same id, until cluster.max_failures is spent."""
        batch_id, batch, ref = inflight.popleft()
        try:
            self.get_with_timeout(ref, f"batch {batch_id}")
            return batch_id, batch
        except (ray.exceptions.RayError, RunStopped) as exc:
            self.failures += 1
            reason = one_line_error(exc)
        if self.failures > self.cfg.cluster.max_failures:
            raise RunStopped(
                f"batch {batch_id} was lost ({reason}) and cluster.max_failures="
                f"{self.cfg.cluster.max_failures} failures are spent"
            )
        print(f"[fault] batch {batch_id} lost ({reason}); sampling it again ({self.failures} failure(s))", flush=True)
        self.resync_samplers()
        inflight.appendleft(self.launch_batch(batch_id, batch))
        return self.await_batch(inflight)

    def resync_samplers(self) -> None:
        """Samplers that Ray restarted hold their initial weights (version 0): give them the current ones."""
        assert self.learner is not None
        pending, self.pending_pushes = self.pending_pushes, []
        for ref in pending:  # pushes still in flight land first (or are lost with their sampler)
            try:
                ray.get(ref, timeout=self.cfg.cluster.task_timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                pass
        for t in self.teachers:  # a restarting teacher refuses tasks until its model is loaded again
            self._when_ready(t.get_stats)
        versions = [self._when_ready(s.get_version) for s in self.samplers]
        behind = [s for s, v in zip(self.samplers, versions, strict=True) if v < self.version]
        if not behind:
            return
        state = self.learner.state_dict_ref()
        ray.get([s.load_weights.remote(state, self.version) for s in behind])
        print(f"[fault] {len(behind)} restarted sampler(s) now hold weight version {self.version}", flush=True)

    def _when_ready(self, method: Any) -> Any:
        """Call an actor's cheap method, waiting while Ray restarts the actor (bounded by cluster.task_timeout_s)."""
        deadline = time.time() + self.cfg.cluster.task_timeout_s
        while True:
            try:
                return ray.get(method.remote(), timeout=self.cfg.cluster.task_timeout_s)
            except ray.exceptions.ActorUnavailableError:
                if time.time() > deadline:
                    raise RunStopped("a restarted actor did not come back within cluster.task_timeout_s") from None
                time.sleep(1.0)

    def _settle(self, refs: list) -> None:
        """Wait for weight pushes; a sampler that died meanwhile is brought up to date once Ray has restarted it."""
        lost = False
        for ref in refs:
            try:
                ray.get(ref, timeout=self.cfg.cluster.task_timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                lost = True
        if lost:
            self.failures += 1
            print(f"[fault] a weight push was lost to a dead sampler ({self.failures} failure(s))", flush=True)
            self.resync_samplers()

    def restart_learner(self, reason: str) -> None:
        """Replace a failed learner group: kill every rank, start new ones, and point the method at the newest
        complete checkpoint (restored by the phase's `_resume`, as on a resume). Batches launched since that
        checkpoint were sampled from weights that no longer exist: the ones queued or on their way are dropped,
        the ones consumed are taken back from the ledger; all are sampled again, under the same ids, from the
        restored weights. Counts against cluster.max_failures."""
        c, t0 = self.cfg, time.time()
        if self.learner is None or self.student_dir is None:  # the group never came up: nothing to restore into
            raise RunStopped(f"{reason} while the learner group was starting")
        self.failures += 1
        if self.failures > c.cluster.max_failures:
            raise RunStopped(f"{reason}, and cluster.max_failures={c.cluster.max_failures} failures are spent")
        if c.learner.weight_sync != "object_store":  # the weight group cannot take a new rank 0 back
            raise RunStopped(f"{reason}; a learner restart needs learner.weight_sync=object_store")
        path = latest_complete(self.ckpts.root)
        if path is None:
            raise RunStopped(f"{reason}, before any complete checkpoint to restart from (checkpoint.every_steps)")
        point = ResumePoint.read(path)
        print(f"[fault] {reason}: restarting the learner group from {path} ({self.failures} failure(s))", flush=True)
        # in-flight batches first: their producers are cancelled, the queue refuses what still arrives
        launches, self.inflight = list(self.inflight), deque()
        for _, _, producer in launches:
            ray.cancel(producer)
        dropped = [batch_id for batch_id, _, _ in launches]
        if self.replay is not None:
            self.generation += 1
            queued = self.get_with_timeout(self.replay.reset.remote(self.generation), "the replay queue")
            dropped = sorted(set(dropped) | set(queued))
        rolled_back = [b for b in self.consumed if b >= point.prompt_batches]
        self.consumed = [b for b in self.consumed if b < point.prompt_batches]
        pending, self.pending_pushes = self.pending_pushes, []
        for ref in pending:  # pushes of the old weights: landed or lost, the restore pushes the checkpoint's anyway
            try:
                ray.get(ref, timeout=c.cluster.task_timeout_s)
            except ray.exceptions.RayError:
                pass
        t_kill = time.time()
        self.learner.kill()
        self.learner = None
        t_start = time.time()
        try:
            self.start_learner(self.student_dir)
        except (LearnerFailed, ray.exceptions.RayError) as exc:
            raise RunStopped(f"{reason}; the new learner group did not start ({one_line_error(exc)})") from exc
        self.learner_restarts += 1
        self.resume_point = point
        self.restart = {
            "phase": "learner_restart",
            "reason": reason,
            "failed_at_global_step": self.global_step,
            "checkpoint": str(path),
            "restored_phase": point.phase,
            "restored_step": point.phase_step,
            "global_step": point.global_step,
            "rolled_back_batch_ids": rolled_back,
            "dropped_batch_ids": dropped,
            "learner_restarts": self.learner_restarts,
            "failures": self.failures,
            # where the time goes: draining (in-flight producers, pushes), teardown, the new group's start-up
            "drain_seconds": round(t_kill - t0, 2),
            "kill_seconds": round(t_start - t_kill, 2),
            "start_seconds": round(time.time() - t_start, 2),
            "t0": t0,
        }

    def get_with_timeout(self, ref: Any, what: str) -> Any:
        try:
            return ray.get(ref, timeout=self.cfg.cluster.task_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RunStopped(f"waited cluster.task_timeout_s={self.cfg.cluster.task_timeout_s:g}s for {what}") from None

    # ===== checkpoints ===============================================================================
    def _resume(self, phase: str) -> ResumePoint | None:
        """The checkpoint this phase continues from (restored into the learner here), or None."""
        point = self.resume_point
        if point is None or point.phase != phase:
            return None
        assert self.learner is not None
        t0 = time.time()
        restore_learner(self.learner, point)  # after reset_optimizer: the phase's optimizer, its state overwritten
        self.global_step, self.bad_in_row = point.global_step, point.bad_in_row
        if point.version > self.version:  # a new driver: the samplers get the checkpoint's weights under its version
            self.version = point.version - 1
            self.push_weights()
        elif point.version < self.version:  # a learner restart: the samplers hold later weights; versions only grow
            self.push_weights()
        print(
            f"[resume] {phase} from step {point.phase_step} (global {point.global_step}, weight version "
            f"{point.version}, now {self.version}): {point.path} ({time.time() - t0:.1f}s)",
            flush=True,
        )
        if self.restart is not None:  # metrics.jsonl: the restart, once the samplers hold the restored weights
            record, self.restart = self.restart, None
            record["restart_seconds"] = round(time.time() - record.pop("t0"), 2)
            record["weight_version"] = self.version
            self.log.log(record)
        return point

    def save_state(
        self,
        phase: str,
        step: int,
        best: float | None,
        prompt_batches: int,
        pretrain_batches: int = 0,
        sft_dir: str | None = None,
        start: ValidationResult | None = None,
        last: ValidationResult | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """A checkpoint of the whole training state at a point where nothing is in flight (see launch_limit)."""
        assert self.learner is not None
        self.log.sync()  # metrics.jsonl up to the length the checkpoint records is durable before it lands
        self.ckpts.save(
            self.learner,
            ResumePoint(
                path="",
                phase=phase,
                phase_step=step,
                global_step=self.global_step,
                version=self.version,
                best=best,
                bad_in_row=self.bad_in_row,
                prompt_batches=prompt_batches,
                pretrain_batches=pretrain_batches,
                metrics_bytes=self.log.metrics_bytes(),
                sft_dir=sft_dir,
                start=start.__dict__ if start else None,
                last=last.__dict__ if last else None,
                extra=extra or {},
            ),
        )

    # ===== helpers ===================================================================================
    def count_bad(self, m: dict[str, float], phase: str) -> None:
        """Updates skipped for a non-finite loss/gradient: learner.max_bad_steps in a row stop the run, with the
        weights of the last good update saved as final/."""
        if not m.get("skipped"):
            self.bad_in_row = 0
            return
        self.bad_in_row += 1
        print(
            f"[{phase}] update skipped: non-finite loss {m.get('loss')} or gradient norm {m.get('grad_norm')} "
            f"({self.bad_in_row} in a row)",
            flush=True,
        )
        if self.bad_in_row >= self.cfg.learner.max_bad_steps:
            assert self.learner is not None
            self.learner.save(self.ckpt("final"), self.assets.tokenizer_dir, self.cfg.checkpoint.save_dtype)
            raise RunStopped(
                f"{self.bad_in_row} updates in a row had a non-finite loss or gradient norm "
                f"(learner.max_bad_steps={self.cfg.learner.max_bad_steps}) in the {phase} phase at global "
                f"step {self.global_step}; the last good weights are in {self.ckpt('final')}"
            )

    def _lm_batch(self, items: list[TokenizedExample]) -> LMBatch:
        return collate_prompt_response([(it.prompt_ids, it.response_ids) for it in items], self.tok.pad_token_id)

    def _pretrain_batches(self) -> Iterator[Any]:
        c = self.cfg
        if not c.data.pretrain or c.objective.pt_weight <= 0:
            return iter(())
        blocks = load_pretrain_blocks(
            resolve_path(c.data.pretrain), self.tok, c.data.pretrain_block_size, max_blocks=4096
        )
        return iterate_pretrain(blocks, c.learner.pretrain_batch_size, c.seed)

    def valid_loss(self) -> float:
        """Token-mean NLL of the validation responses (the rows that split evenly over the learner ranks)."""
        assert self.learner is not None
        n, bs = self.learner.n, self.cfg.learner.sft_batch_size
        total = tokens = 0.0
        for start in range(0, len(self.valid_items), bs):
            chunk = self.valid_items[start : start + bs]
            chunk = chunk[: (len(chunk) // n) * n]
            if chunk:
                s, t = self.learner.eval_nll(self._lm_batch(chunk))
                total, tokens = total + s, tokens + t
        return total / max(tokens, 1.0)

    def validation(self, label: str) -> ValidationResult:
        assert self.learner is not None
        self.wait_pushes()  # the samplers must hold the learner's weights
        # every evaluation draws with the same seed (common random numbers): two checkpoints' scores differ by the
        # models, not by the draws, which is what selection compares; a resume draws the same too
        self.samplers[0].reseed.remote(sampling_seed(self.cfg.seed, EVAL, 0))
        t0 = time.time()
        res = validate(
            self.samplers[0],
            self.teachers[0],
            self.learner,
            self.tok,
            self.eval_items,
            self.valid_examples,
            self.cfg.eval.max_new_tokens,
            self.kl_items,
        )
        print(
            f"[eval] {label}: valid ROUGE-L {res.rouge_l:.2f}, reverse KL {res.reverse_kl_seq:.3f}/seq "
            f"({res.reverse_kl_token:.4f}/token), {res.mean_response_tokens:.1f} tokens "
            f"({time.time() - t0:.1f}s)",
            flush=True,
        )
        self.log.log(
            {
                "phase": "eval",
                "label": label,
                "global_step": self.global_step,
                "weight_version": self.version,
                **res.as_dict(),
            }
        )
        return res

    def push_weights(self, wait: bool = True) -> None:
        """Send the learner's weights to every sampler as a new version. Samplers load it between batches; a push
        that failed raises here (at the latest at the next validation or the end)."""
        assert self.learner is not None
        self.version += 1
        if self.cfg.learner.weight_sync == "collective":
            refs = [s.receive_weights.remote() for s in self.samplers]  # queued behind any batch being sampled
            self.learner.push_weights(self.version)
        else:
            state = self.learner.state_dict_ref()
            refs = [s.load_weights.remote(state, self.version) for s in self.samplers]
        self.pending_pushes += refs
        done, self.pending_pushes = ray.wait(self.pending_pushes, num_returns=len(self.pending_pushes), timeout=0)
        self._settle(done)  # raises if a push failed for another reason than a dead sampler
        if wait:
            self.wait_pushes()

    def wait_pushes(self) -> None:
        pending, self.pending_pushes = self.pending_pushes, []
        self._settle(pending)

    # ===== clean-up ==================================================================================
    def cleanup(self) -> None:
        if self.learner is not None:
            try:
                self.learner.shutdown()
            except Exception as exc:  # noqa: BLE001 - best effort at exit
                print(f"[run] learner shutdown: {exc}", flush=True)
        for actor in [*self.samplers, *self.teachers, *([self.replay] if self.replay else [])]:
            ray.kill(actor)
        if self.placement is not None:
            self.placement.release()
