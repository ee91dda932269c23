"""The MiniLLM rollout pipeline: launch (sampler.sample -> teacher.score, one shard per learner rank -> the rollout
queue; every hop passes references, never values), take by id in launch order, and recovery of what a dead actor
lost.

Batches are taken by their id whatever order they arrive in, and every batch is sampled with its own seed: sampled
again (a restarted sampler, a resume) it is the same batch. What a failure costs:

* a sampler or teacher that died (Ray restarts it) or a timeout: the batch is lost; the current weights go to any
  restarted sampler and the same prompts are sampled again under the same id (one failure of the budget each);
* the rollout queue that died: a new queue is started and every batch in flight is queued into it again from the
  references the driver holds (scored batches are owned by the driver, not by the queue): nothing is sampled again,
  the run goes on as if the queue had not died (one failure);
* a learner restart: every batch in flight is dropped (`drop_all_in_flight`), the queue fenced with a new epoch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray

from actors.rollout_queue import TakenBatch
from common.config import DistillConfig, LearnerConfig
from common.data import TokenizedExample
from common.errors import one_line_error
from common.resumable import TRAIN_BATCH, Counted, sampling_seed
from learner.checkpoint import response_ids
from learner.recovery import FailureBudget, wait_for
from learner.run_log import RunStopped

if TYPE_CHECKING:
    from learner.actor_set import ActorSet
    from learner.weights import WeightPublisher


@dataclass(frozen=True)
class CollectionPlan:
    """MiniLLM's PPO schedule in numbers: a collection of `rollouts` rollouts is `batches` sampled batches, trained
    on in `updates` mini-batch updates of `minibatch` sequences; sampling runs up to `ahead` batches ahead."""

    rollouts: int
    batches: int
    minibatch: int
    updates: int
    ahead: int

    @staticmethod
    def of(lc: LearnerConfig) -> CollectionPlan:
        rollouts = lc.rollouts_per_collection or lc.batch_size
        batches, minibatch = rollouts // lc.batch_size, lc.minibatch_size or rollouts
        return CollectionPlan(
            rollouts, batches, minibatch, lc.ppo_epochs * rollouts // minibatch, (1 + lc.max_version_lag) * batches
        )

    def describe(self, c: DistillConfig) -> str:
        lc = c.learner
        return (
            f"collections of {self.rollouts} rollouts (batches of {lc.batch_size}), "
            f"{lc.ppo_epochs} epoch(s) of mini-batches of {self.minibatch}; alpha {c.objective.alpha}, lr {lc.lr}, "
            f"lag <= {lc.max_version_lag}, teacher transport {c.teacher.transport}"
        )


@dataclass
class Launch:
    """A batch launched and not yet taken: its prompts, the teacher's outputs (references) and the queue's put."""

    batch_id: int
    prompts: list[TokenizedExample]
    info: Any  # ObjectRef of the batch's BatchInfo
    shards: list[Any]  # ObjectRefs, one scored shard per learner rank
    queued: Any  # ObjectRef of the rollout queue's put_batch: ready once the batch is queued


class RolloutPipeline:
    def __init__(self, actors: ActorSet, weights: WeightPublisher, budget: FailureBudget):
        self.actors, self.weights, self.budget = actors, weights, budget
        self.cfg = actors.cfg
        self.timeout_s = self.cfg.cluster.task_timeout_s
        self.in_flight: deque[Launch] = deque()
        self.epoch = 0  # the queue's fence: bumped by a learner restart, puts of earlier launches are refused
        self.sampled_ids: dict[int, Any] = {}  # batch id -> ref to its sampled token ids (logging.sampled_ids)

    def __len__(self) -> int:
        return len(self.in_flight)

    def fill(self, prompts: Counted[list[TokenizedExample]], ahead: int, limit: int) -> None:
        """Launch the next prompt batches (a batch's id is its number in `prompts`) while fewer than `ahead` are in
        flight and fewer than `limit` are drawn in all."""
        while len(self.in_flight) < ahead and prompts.drawn < limit:
            batch_id = prompts.drawn
            self.in_flight.append(self._launch(batch_id, next(prompts)))

    def _launch(self, batch_id: int, batch: list[TokenizedExample]) -> Launch:
        """Sample -> score -> queue one batch. Actors round-robin."""
        learner = self.actors.learner
        n = learner.n if learner is not None else 1
        sampler = self.actors.samplers[batch_id % len(self.actors.samplers)]
        # the batch's own seed: sampled again (a restarted sampler, a resume) it is the same batch
        sampler.reseed.remote(sampling_seed(self.cfg.seed, TRAIN_BATCH, batch_id))  # runs before its sample
        rollouts = sampler.sample.remote([it.prompt_ids for it in batch], [it.index for it in batch])
        if self.cfg.logging.sampled_ids:
            self.sampled_ids[batch_id] = ray.remote(num_cpus=0)(response_ids).remote(rollouts)
        teacher = self.actors.teachers[batch_id % len(self.actors.teachers)]
        info, *shards = teacher.score.options(num_returns=1 + n).remote(rollouts, n, None, batch_id)
        return Launch(batch_id, batch, info, shards, self._queue(info, shards))

    def _queue(self, info: Any, shards: list[Any]) -> Any:
        return self.actors.queue.put_batch.remote(info, shards, None, self.epoch)

    def take(self) -> TakenBatch:
        """The oldest launched batch, taken from the queue by its id, whatever failed on its way (see the module
        doc). One staler than `max_version_lag` (cannot happen with the recipe's launch window, but the queue
        checks) is sampled again under the same id."""
        while True:
            launch = self.in_flight.popleft()
            try:
                wait_for(launch.queued, f"batch {launch.batch_id}", self.timeout_s)
            except (ray.exceptions.RayError, RunStopped) as exc:
                self.in_flight.appendleft(launch)
                self._recover_lost(launch, exc)
                continue
            try:
                taken = wait_for(
                    self.actors.queue.take.remote(self.weights.version, launch.batch_id),
                    "the rollout queue",
                    self.timeout_s,
                )
            except ray.exceptions.RayError as exc:
                if not self.actors.queue_is_dead():
                    raise
                self.in_flight.appendleft(launch)
                self._replace_dead_queue(exc)
                continue
            if not taken.stale:
                return taken
            print(
                f"[minillm] batch {launch.batch_id} was staler than learner.max_version_lag: sampling it again",
                flush=True,
            )
            self.in_flight.appendleft(self._launch(launch.batch_id, launch.prompts))

    def _recover_lost(self, launch: Launch, exc: BaseException) -> None:
        """The oldest launch did not reach the queue: the queue died (every launch goes into a new one), or the
        batch was lost (sampled again, after the samplers are brought up to date)."""
        if self.actors.queue_is_dead():
            self._replace_dead_queue(exc)
            return
        reason = one_line_error(exc)
        self.budget.spend(f"batch {launch.batch_id} was lost ({reason})")
        print(
            f"[fault] batch {launch.batch_id} lost ({reason}); sampling it again ({self.budget.spent} failure(s))",
            flush=True,
        )
        self.weights.resync_samplers()
        self.in_flight[0] = self._launch(launch.batch_id, launch.prompts)

    def _replace_dead_queue(self, exc: BaseException) -> None:
        """A new rollout queue, fenced with the current epoch, and every launch in flight queued into it again from
        the driver's references (a batch whose scoring failed fails there again and is sampled again then)."""
        what = f"the rollout queue died ({one_line_error(exc)})"
        self.budget.spend(what)
        ids = [launch.batch_id for launch in self.in_flight]
        print(f"[fault] {what}: a new queue takes batches {ids} again ({self.budget.spent} failure(s))", flush=True)
        try:
            queue = self.actors.replace_queue()
            wait_for(queue.reset.remote(self.epoch), "the new rollout queue", self.timeout_s)
        except ray.exceptions.RayError as err:
            raise RunStopped(f"{what}, and a new one did not start ({one_line_error(err)})") from err
        for launch in self.in_flight:
            launch.queued = self._queue(launch.info, launch.shards)

    def drop_all_in_flight(self) -> list[int]:
        """A learner restart: cancel every launch, fence the queue with a new epoch (what still arrives is refused)
        and empty it; returns the ids dropped, sorted."""
        launches, self.in_flight = list(self.in_flight), deque()
        for launch in launches:
            ray.cancel(launch.queued)
        dropped = [launch.batch_id for launch in launches]
        if self.actors.queue is None:  # not a MiniLLM run
            return dropped
        self.epoch += 1
        queued = wait_for(self.actors.queue.reset.remote(self.epoch), "the rollout queue", self.timeout_s)
        return sorted(set(dropped) | set(queued))

    def cancel_all(self) -> None:
        """The phase is over: producers that ran ahead are not needed any more."""
        for launch in self.in_flight:
            ray.cancel(launch.queued)
