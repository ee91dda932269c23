"""The phases of a run, top to bottom: place actors -> SFT (keep the best by validation loss or ROUGE-L) ->
MiniLLM steps (sample -> score -> replay -> update -> push weights), evaluating and checkpointing along the way."""

from __future__ import annotations

import random
import time
from collections import deque
from pathlib import Path
from typing import Any

import ray

from actors.remote import make_replay, make_sampler, make_teacher
from actors.sampler import SamplerSpec
from common.config import ConfigError, DistillConfig, resolve_path, weight_sync_backend
from common.data import (
    Example,
    TokenizedExample,
    collate_prompt_response,
    iterate_batches,
    iterate_pretrain,
    load_pretrain_blocks,
)
from common.placement import bundled, plan_slots
from common.rollout import pack_rollouts
from learner.evaluation import EvalResult, evaluate_student
from learner.group import LearnerGroup
from learner.run_log import RunLogger, copy_checkpoint

Split = tuple[list[Example], list[TokenizedExample]]


class Service:
    def __init__(
        self,
        cfg: DistillConfig,
        assets,
        tokenizer,
        vocab_size: int,
        train: Split,
        valid: Split,
        logger: RunLogger,
        run_dir: Path,
    ):
        self.cfg, self.assets, self.tok, self.vocab = cfg, assets, tokenizer, vocab_size
        self.train_examples, self.train_items = train
        self.valid_examples, self.valid_items = valid
        self.log, self.run_dir = logger, run_dir
        self.ckpt = run_dir / "checkpoints"
        self.samplers: list[Any] = []
        self.teachers: list[Any] = []
        self.group: LearnerGroup | None = None
        self.replay = None
        self.placement_group = None
        self.bundle_index: dict[str, int] = {}
        self.version = 0
        self.global_step = 0
        rng = random.Random(cfg.seed)
        held_out = list(self.valid_items)
        rng.shuffle(held_out)
        self.eval_items = held_out[: cfg.eval.num_prompts]
        n_kl = min(cfg.eval.kl_prompts, len(held_out))
        self.kl_items = held_out[len(held_out) - n_kl + n_kl % cfg.learner.num_workers :]  # splits evenly

    # ----- placement ---------------------------------------------------------------------------------
    def _reserve(self) -> None:
        """One placement group for the whole service (a bundle per actor that asks for resources)."""
        from ray.util.placement_group import placement_group, remove_placement_group

        c = self.cfg.cluster
        slots = plan_slots(self.cfg)
        self.bundle_index = bundled(slots)
        bundles = [s.bundle for s in slots if s.bundle]
        if not bundles:
            return
        self.placement_group = placement_group(bundles, strategy=c.placement_strategy, name="minillm-service")
        if not self.placement_group.wait(timeout_seconds=c.placement_timeout_s):
            remove_placement_group(self.placement_group)
            self.placement_group = None
            raise ConfigError(
                f"could not place the service's actors ({bundles}, strategy {c.placement_strategy}) "
                f"within cluster.placement_timeout_s={c.placement_timeout_s:g}s: the cluster has "
                f"{ray.available_resources()} free"
            )
        print(f"[placement] {len(bundles)} bundles reserved ({c.placement_strategy})", flush=True)

    def _where(self, name: str) -> dict:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if self.placement_group is None or name not in self.bundle_index:
            return {}
        return {
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                self.placement_group, placement_group_bundle_index=self.bundle_index[name]
            )
        }

    def _start_learner(self, student_dir: str) -> None:
        c = self.cfg
        t0 = time.time()
        self.group = LearnerGroup(
            c.learner.num_workers,
            c.cluster.learner_cpus,
            c.cluster.learner_gpus,
            student_dir,
            c.learner,
            c.objective,
            self.vocab,
            c.models.dtype,
            c.seed,
            placements=[self._where(f"learner-{r}") for r in range(c.learner.num_workers)],
            threads=c.cluster.torch_threads,
        )
        print(f"[learner] {c.learner.num_workers} FSDP worker(s) ready in {time.time() - t0:.1f}s", flush=True)

    def _start_teachers(self) -> None:
        c = self.cfg
        self.teachers = [
            make_teacher(
                i,
                c.cluster.teacher_cpus,
                c.cluster.teacher_gpus,
                self.assets.teacher_dir,
                self.vocab,
                self.tok.pad_token_id,
                batch_size=c.teacher.batch_size,
                top_k=c.teacher.top_k,
                dtype=c.models.dtype,
                placement=self._where(f"teacher-{i}"),
                threads=c.cluster.torch_threads,
            )
            for i in range(c.teacher.num_teachers)
        ]

    def _start_samplers(self, student_dir: str, alpha: float) -> None:
        c = self.cfg
        t0 = time.time()
        max_len = c.data.max_prompt_tokens + max(c.sampler.max_new_tokens, c.eval.max_new_tokens) + 8
        self.samplers = [
            make_sampler(
                SamplerSpec(
                    student_dir=student_dir,
                    teacher_dir=self.assets.teacher_dir if alpha > 0 else None,
                    eos_token_id=self.tok.eos_token_id,
                    max_new_tokens=c.sampler.max_new_tokens,
                    alpha=alpha,
                    temperature=c.sampler.temperature,
                    kv_cache_mb=c.sampler.kv_cache_mb,
                    seed=c.seed + 1000 * i,
                    gpu_memory_utilization=c.sampler.gpu_memory_utilization,
                    tensor_parallel_size=c.sampler.tensor_parallel_size,
                    max_model_len=max_len,
                ),
                i,
                c.cluster.sampler_cpus,
                c.cluster.sampler_gpus,
                placement=self._where(f"sampler-{i}"),
                threads=c.cluster.torch_threads,
            )
            for i in range(c.sampler.num_samplers)
        ]
        ray.get([s.get_version.remote() for s in self.samplers])
        print(f"[sampler] {len(self.samplers)} vLLM sampler(s) ready in {time.time() - t0:.1f}s", flush=True)
        if c.learner.weight_sync == "collective":
            self._connect_weight_group()

    def _connect_weight_group(self) -> None:
        """The learner's rank 0 and the samplers form the weight group (all join at once: it is collective)."""
        assert self.group is not None
        backend = weight_sync_backend(self.cfg.cluster)
        host, port = self.group.weight_sync_address()
        world = 1 + len(self.samplers)
        refs = [
            self.group.init_weight_sender(host, port, world, backend),
            *[s.join_weight_group.remote(host, port, 1 + i, world, backend) for i, s in enumerate(self.samplers)],
        ]
        ray.get(refs)
        print(
            f"[weights] collective push over {backend}: learner rank 0 -> {len(self.samplers)} sampler(s)", flush=True
        )

    def _send_weights(self) -> list:
        """Start a push of the learner's current weights as a new version; returns refs that resolve when every
        sampler holds it (and raise if the push failed)."""
        self.version += 1
        if self.cfg.learner.weight_sync == "collective":
            refs = [s.receive_weights.remote() for s in self.samplers]  # queued behind any batch being sampled
            self.group.push_weights(self.version)
            return refs
        state = self.group.state_dict_ref()
        return [s.load_weights.remote(state, self.version) for s in self.samplers]

    def shutdown(self) -> None:
        if self.group is not None:
            try:
                self.group.shutdown()
            except Exception as exc:  # noqa: BLE001 - best effort at exit
                print(f"[run] learner shutdown: {exc}", flush=True)
        for actor in [*self.samplers, *self.teachers, *([self.replay] if self.replay else [])]:
            ray.kill(actor)
        if self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement_group)

    # ----- helpers -----------------------------------------------------------------------------------
    def _lm_batch(self, items: list[TokenizedExample]):
        return collate_prompt_response([(it.prompt_ids, it.response_ids) for it in items], self.tok.pad_token_id)

    def _valid_loss(self) -> float:
        n = self.cfg.learner.num_workers
        bs = self.cfg.learner.sft_batch_size
        items = self.valid_items[: max(n, (len(self.valid_items) // n) * n)]
        total = tokens = 0.0
        for start in range(0, len(items), bs):
            chunk = items[start : start + bs]
            chunk = chunk[: (len(chunk) // n) * n]
            if not chunk:
                continue
            batch = self._lm_batch(chunk)
            mean, count = self.group.eval_nll(batch), float(batch.loss_mask.sum())
            total, tokens = total + mean * count, tokens + count
        return total / max(tokens, 1.0)

    def _evaluate(self, label: str) -> EvalResult:
        t0 = time.time()
        res = evaluate_student(
            self.samplers[0],
            self.teachers[0],
            self.group,
            self.tok,
            self.eval_items,
            self.valid_examples,
            self.cfg.eval.max_new_tokens,
            self.kl_items,
            self.vocab,
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

    # ----- phases ------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """minillm: SFT (or the given SFT checkpoint) then MiniLLM. sft / kd / seqkd: the baselines, trained on
        the same data and step budget as the SFT phase, selected by `learner.select_by`, evaluated the same way."""
        c = self.cfg
        self._reserve()
        self._start_teachers()
        summary: dict[str, Any] = {"method": c.method}
        by_rouge = c.learner.select_by == "rouge_l"
        if c.method == "minillm":
            if c.models.sft_checkpoint:
                sft_dir = str(resolve_path(c.models.sft_checkpoint))
                self._start_learner(sft_dir)
            else:
                self._start_learner(self.assets.student_dir)
                if by_rouge:  # the samplers evaluate the SFT phase too; they get its best weights after
                    self._start_samplers(self.assets.student_dir, alpha=c.objective.alpha)
                sft_dir = self.train_phase("sft", self.train_items)
                if self.samplers:
                    self._push_weights()
            summary["sft_checkpoint"] = sft_dir
            summary.update(self.minillm_phase(sft_dir))
            return summary
        self._start_learner(self.assets.student_dir)
        if c.method == "seqkd":
            self._start_samplers(self.assets.student_dir, alpha=1.0)
            best_dir = self.train_phase("seqkd", self.teacher_responses())
            self._push_weights()
        elif by_rouge:
            self._start_samplers(self.assets.student_dir, alpha=0.0)
            best_dir = self.train_phase(c.method, self.train_items)
            self._push_weights()
        else:
            best_dir = self.train_phase(c.method, self.train_items)
            self._start_samplers(best_dir, alpha=0.0)
        res = self._evaluate(f"{c.method}-best")
        copy_checkpoint(Path(best_dir), self.ckpt / "best")
        copy_checkpoint(Path(best_dir), self.ckpt / "final")
        summary.update({"start": res.as_dict(""), "final": res.as_dict(""), "best_valid_rouge_l": res.rouge_l})
        return summary

    def _push_weights(self) -> None:
        """Send the learner's current weights to every sampler (a new version) and wait until they hold them."""
        ray.get(self._send_weights())

    def teacher_responses(self) -> list[TokenizedExample]:
        """SeqKD data: the teacher's own samples (alpha = 1 through the samplers) for the training prompts."""
        c = self.cfg
        n = min(len(self.train_items), c.learner.sft_steps * c.learner.sft_batch_size)
        prompts = self.train_items[:n]
        out: list[TokenizedExample] = []
        t0 = time.time()
        chunk = 256
        for start in range(0, n, chunk):
            part = prompts[start : start + chunk]
            sampler = self.samplers[(start // chunk) % len(self.samplers)]
            r = ray.get(
                sampler.sample.remote(
                    [it.prompt_ids for it in part],
                    [it.index for it in part],
                    alpha=1.0,
                    max_new_tokens=c.data.max_response_tokens,
                )
            )
            out.extend(
                TokenizedExample(it.prompt_ids, resp, it.index)
                for it, resp in zip(part, r.response_ids, strict=True)
                if resp
            )
            print(f"[seqkd] teacher responses {min(start + chunk, n)}/{n} ({time.time() - t0:.0f}s)", flush=True)
        return out

    def train_phase(self, kind: str, items: list[TokenizedExample]) -> str:
        """Fine-tune the student (kind: sft / seqkd = NLL on `items`; kd = word-level KD + NLL) for
        learner.sft_steps; keep the checkpoint with the lowest validation loss (on ground-truth responses) or,
        with learner.select_by=rouge_l, the highest validation ROUGE-L of its samples (the initial student too)."""
        c, group = self.cfg, self.group
        assert group is not None
        group.set_lr(c.learner.sft_lr)
        best_dir = self.ckpt / f"{kind}_best"
        by_rouge = c.learner.select_by == "rouge_l"
        best = float("inf")  # lower is better: validation loss, or -ROUGE-L
        if by_rouge:
            best = -self._evaluate(f"{kind}-start").rouge_l
            group.save(str(best_dir), self.assets.tokenizer_dir)
        batches = iterate_batches(items, c.learner.sft_batch_size, c.seed)
        steps = c.learner.sft_steps
        print(
            f"[{kind}] {steps} steps, batch {c.learner.sft_batch_size}, lr {c.learner.sft_lr}, "
            f"select by {c.learner.select_by}",
            flush=True,
        )
        t0 = time.time()
        for step in range(1, steps + 1):
            batch = self._lm_batch(next(batches))
            if kind == "kd":
                teacher = self.teachers[step % len(self.teachers)]
                m = group.kd_step(batch, ray.get(teacher.score_lm_batch.remote(batch)))
            else:
                m = group.sft_step(batch)
            self.global_step += 1
            record = {"phase": kind, "global_step": self.global_step, "step": step, **m}
            if step % c.learner.sft_eval_every == 0 or step == steps:
                if by_rouge:
                    self._push_weights()
                    res = self._evaluate(f"{kind}-step-{step}")
                    score, shown = -res.rouge_l, f"valid ROUGE-L {res.rouge_l:.2f}"
                    record.update(res.as_dict())
                else:
                    score = self._valid_loss()
                    shown = f"valid {score:.3f}"
                    record["valid_loss"] = score
                if score < best:
                    best = score
                    group.save(str(best_dir), self.assets.tokenizer_dir)
                    record["best"] = True
                print(
                    f"[{kind}] step {step}/{steps} loss {m['loss']:.3f} {shown} "
                    f"(best {abs(best):.3f}, {time.time() - t0:.0f}s)",
                    flush=True,
                )
            elif step % c.logging.progress_every == 0:
                print(f"[{kind}] step {step}/{steps} loss {m['loss']:.3f} ({time.time() - t0:.0f}s)", flush=True)
            self.log.log(record)
        if not best_dir.exists():  # no steps: the initial student is the phase's result
            group.save(str(best_dir), self.assets.tokenizer_dir)
        group.load_state(str(best_dir))
        return str(best_dir)

    def minillm_phase(self, sft_dir: str) -> dict[str, Any]:
        c, group = self.cfg, self.group
        assert group is not None
        group.set_lr(c.learner.lr)
        if not self.samplers:
            self._start_samplers(sft_dir, alpha=c.objective.alpha)
        self.replay = make_replay(
            c.learner.replay_capacity, c.learner.max_version_lag, c.cluster.replay_cpus, placement=self._where("replay")
        )
        pt_batches = None
        if c.data.pretrain and c.objective.pt_weight > 0:
            blocks = load_pretrain_blocks(
                resolve_path(c.data.pretrain), self.tok, c.data.pretrain_block_size, max_blocks=4096
            )
            pt_batches = iterate_pretrain(blocks, c.learner.pretrain_batch_size, c.seed)
        prompts = iterate_batches(self.train_items, c.learner.batch_size, c.seed + 1)

        start = self._evaluate("minillm-start")
        best_rouge = start.rouge_l
        copy_checkpoint(Path(sft_dir), self.ckpt / "best")
        last = start
        ahead = 1 + c.learner.max_version_lag  # batches in flight: sampling runs that far ahead of updates
        inflight: deque = deque()
        pushes: list = []
        launched = 0
        t0 = time.time()
        print(
            f"[minillm] {c.learner.minillm_steps} steps, batch {c.learner.batch_size}, alpha {c.objective.alpha}, "
            f"lr {c.learner.lr}, lag <= {c.learner.max_version_lag}",
            flush=True,
        )
        for step in range(1, c.learner.minillm_steps + 1):
            while len(inflight) < ahead:
                batch = next(prompts)
                sampler = self.samplers[launched % len(self.samplers)]
                teacher = self.teachers[launched % len(self.teachers)]
                rollouts = sampler.sample.remote([it.prompt_ids for it in batch], [it.index for it in batch])
                scores = teacher.score.remote(rollouts)
                inflight.append(self.replay.put_scored.remote(rollouts, scores))
                launched += 1
            t_wait = time.perf_counter()
            item_version, (rollouts, scores) = ray.get(self.replay.get.remote())
            wait = time.perf_counter() - t_wait
            ray.get(inflight.popleft())
            ray.get(pushes)  # a failed weight push is an error, not silence
            packed = pack_rollouts(rollouts, self.tok.pad_token_id)
            pt = next(pt_batches) if pt_batches is not None else None
            m = group.minillm_step(packed, scores.dense(self.vocab), c.objective.alpha, pt)
            t_push = time.perf_counter()
            pushes = self._send_weights()
            ray.get(self.replay.set_learner_version.remote(self.version))
            push_dispatch = time.perf_counter() - t_push  # gather + send; samplers load it between batches
            self.global_step += 1
            qstats = ray.get(self.replay.stats.remote())
            n_tok = rollouts.num_tokens
            record = {
                "phase": "minillm",
                "global_step": self.global_step,
                "step": step,
                **m,
                "mean_response_tokens": n_tok / max(len(rollouts), 1),
                "teacher_token_share": sum(sum(o) for o in rollouts.owners) / max(n_tok, 1),
                "sampler_tokens_per_s": n_tok / max(rollouts.seconds, 1e-9),
                "teacher_tokens_per_s": n_tok / max(scores.seconds, 1e-9),
                "learner_tokens_per_s": m["response_tokens"] / max(m["step_seconds"], 1e-9),
                "learner_wait_seconds": wait,
                "push_dispatch_seconds": push_dispatch,
                "queue_depth": qstats["depth"],
                "dropped_stale": qstats["dropped_stale"],
                "weight_version": self.version,
                "rollout_version": item_version,
                "version_lag": self.version - 1 - item_version,
            }
            if step % c.eval.every_steps == 0 or step == c.learner.minillm_steps:
                ray.get(pushes)
                last = self._evaluate(f"minillm-step-{step}")
                record.update(last.as_dict())
                if last.rouge_l > best_rouge:
                    best_rouge = last.rouge_l
                    group.save(str(self.ckpt / "best"), self.assets.tokenizer_dir)
                    record["best"] = True
            self.log.log(record)
            if step % c.logging.progress_every == 0 or step == c.learner.minillm_steps:
                print(
                    f"[minillm] step {step}/{c.learner.minillm_steps} loss {m['loss']:.3f} "
                    f"(single {m['loss_single']:.3f} long {m['loss_long']:.3f} pt {m['loss_pt']:.3f}) "
                    f"rKL {m['reverse_kl']:.3f} len {record['mean_response_tokens']:.1f} "
                    f"rho [{m['rho_min']:.2f}, {m['rho_max']:.2f}] lag {record['version_lag']} "
                    f"({time.time() - t0:.0f}s)",
                    flush=True,
                )
        ray.get(pushes)
        for ref in inflight:  # let producers that ran ahead finish cleanly
            ray.cancel(ref)
        group.save(str(self.ckpt / "final"), self.assets.tokenizer_dir)
        return {
            "start": start.as_dict(""),
            "final": last.as_dict(""),
            "best_valid_rouge_l": best_rouge,
            "minillm_seconds": round(time.time() - t0, 1),
            "weight_version": self.version,
            "sampler_stats": ray.get(self.samplers[0].get_stats.remote()),
            "teacher_stats": ray.get(self.teachers[0].get_stats.remote()),
        }
