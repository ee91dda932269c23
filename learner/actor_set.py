"""Starting and stopping the service's actors: learner ranks, teachers, samplers and the rollout queue, in one
placement group. `ActorSet` holds their handles; the recipe and its helpers read them from here (a learner restart
or a queue replacement swaps one handle, everyone sees the new one)."""

from __future__ import annotations

import time
from typing import Any

import ray

from actors.placement import Placement
from actors.remote import make_rollout_queue, make_sampler, make_teacher
from actors.sampler import sampler_spec
from common.config import DistillConfig, weight_sync_backend
from common.placement import num_samplers
from common.weight_sync import group_backend
from learner.group import LearnerGroup


def gpus_of_actor(_actor: Any) -> list[str]:
    """Run in an actor (`__ray_call__`): its GPUs as "node:gpu" names ([] without one)."""
    node = ray.get_runtime_context().get_node_id()
    return [f"{node}:{g}" for g in ray.get_gpu_ids()]


class ActorSet:
    def __init__(self, cfg: DistillConfig, assets: Any, tokenizer: Any, vocab_size: int):
        self.cfg, self.assets, self.tok, self.vocab = cfg, assets, tokenizer, vocab_size
        self.placement: Placement | None = None
        self.learner: LearnerGroup | None = None
        self.student_dir: str | None = None  # the learner ranks' initial weights
        self.teachers: list = []
        self.samplers: list = []
        self.queue: Any = None  # the rollout queue (MiniLLM only)
        self.weight_groups = 0  # weight groups formed so far (weight_sync=collective): one more per re-forming
        self.weight_backend: str | None = None  # the weight group's backend (gloo / nccl), once formed

    def start(self, student_dir: str) -> None:
        """Every actor of the service, in one placement group: learner ranks, teachers, samplers (student engine,
        plus a teacher engine when the method samples from the teacher), the rollout queue."""
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
                # with weight_sync=collective a restart re-forms the weight group (connect_weight_group)
                max_restarts=c.cluster.max_actor_restarts,
            )
            for i in range(num_samplers(c))
        ]
        if c.method == "minillm":
            self.start_queue()
        ray.get([s.get_version.remote() for s in self.samplers] + [t.get_stats.remote() for t in self.teachers])
        print(
            f"[setup] {c.learner.num_workers} learner rank(s), {len(self.teachers)} teacher(s), "
            f"{len(self.samplers)} sampler(s) ready in {time.time() - t0:.1f}s",
            flush=True,
        )
        if c.learner.weight_sync == "collective":
            self.connect_weight_group()

    def start_learner(self, student_dir: str) -> LearnerGroup:
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
        return self.learner

    def start_queue(self) -> Any:
        c, where = self.cfg, self.placement.of if self.placement is not None else (lambda name: {})
        self.queue = make_rollout_queue(
            c.learner.replay_capacity,
            c.learner.max_version_lag,
            c.cluster.replay_cpus,
            placement=where("rollout-queue"),
        )
        return self.queue

    def queue_is_dead(self, wait_s: float = 10.0) -> bool:
        """Whether Ray reports the rollout queue dead (a live queue busy with puts answers within `wait_s`, or
        counts as alive)."""
        try:
            ray.get(self.queue.__ray_ready__.remote(), timeout=wait_s)
        except ray.exceptions.RayActorError:
            return True
        except ray.exceptions.GetTimeoutError:
            pass
        return False

    def replace_queue(self) -> Any:
        """A new, empty rollout queue in place of a dead one (same name and bundle, once Ray has the old one
        dead)."""
        ray.kill(self.queue, no_restart=True)
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            try:
                ray.get(self.queue.__ray_ready__.remote(), timeout=1.0)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                break
            time.sleep(0.1)
        return self.start_queue()

    def connect_weight_group(self) -> None:
        """The learner's rank 0 and the samplers form the weight group (all join at once: it is collective). Called
        again after a sampler restarted: every member leaves the old group and joins a new one, under a new name on
        a new port (a restarted sampler cannot rejoin the old one; its weights come separately)."""
        assert self.learner is not None
        backend = weight_sync_backend(self.cfg.cluster)
        members = [self.learner.actors[0], *self.samplers]
        if backend == "nccl":  # gloo where the learner and a sampler share a GPU: NCCL refuses two ranks on one
            backend = group_backend(ray.get([m.__ray_call__.remote(gpus_of_actor) for m in members]))
        self.weight_backend = backend
        host, port = self.learner.weight_sync_address()
        world = 1 + len(self.samplers)
        self.weight_groups += 1
        name = f"minillm-weights-{self.weight_groups}"
        ray.get(
            [
                self.learner.init_weight_sender(host, port, world, backend, name),
                *[
                    s.join_weight_group.remote(host, port, 1 + i, world, backend, name)
                    for i, s in enumerate(self.samplers)
                ],
            ]
        )
        what = "re-formed" if self.weight_groups > 1 else "collective push"
        print(
            f"[weights] {what} over {backend} ({name} at {host}:{port}): learner rank 0 -> {len(self.samplers)} "
            "sampler(s)",
            flush=True,
        )

    def shutdown(self) -> None:
        if self.learner is not None:
            try:
                self.learner.shutdown()
            except Exception as exc:  # noqa: BLE001 - best effort at exit
                print(f"[run] learner shutdown: {exc}", flush=True)
        for actor in [*self.samplers, *self.teachers, *([self.queue] if self.queue else [])]:
            ray.kill(actor)
        if self.placement is not None:
            self.placement.release()
