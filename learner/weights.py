"""Weight versions and pushes: the learner's weights go to every sampler as a numbered version (object store: one
state-dict ref every sampler loads; collective: rank 0 broadcasts). Samplers load a version between batches; versions
only grow, so a batch's rollout version says which weights sampled it."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import ray

from learner.run_log import RunStopped

if TYPE_CHECKING:
    from learner.actor_set import ActorSet
    from learner.recovery import FailureBudget

_DEAD = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


class WeightPublisher:
    def __init__(self, actors: ActorSet, budget: FailureBudget):
        self.actors, self.budget = actors, budget
        self.timeout_s = actors.cfg.cluster.task_timeout_s
        self.version = 0  # weight version the samplers hold (or are being sent)
        self.pending: list = []  # pushes not yet waited for
        self.collective = actors.cfg.learner.weight_sync == "collective"
        # a push lost to a dead sampler: with the collective the live samplers' receives fail too (the group broke)
        self.lost_push = (ray.exceptions.RayError,) if self.collective else _DEAD

    def publish(self, wait: bool = True, as_version: int | None = None) -> None:
        """Push the learner's weights to every sampler as a new version (`as_version`, or the next one). A push
        that failed raises here (at the latest at the next validation or the end); `wait=False` returns while the
        pushes are under way."""
        learner = self.actors.learner
        assert learner is not None
        self.version = self.version + 1 if as_version is None else as_version
        if self.collective:
            # the previous push landed everywhere first: one lost to a dead sampler re-forms the group (resync)
            self.wait()
            refs = [s.receive_weights.remote() for s in self.actors.samplers]  # queued behind any batch being sampled
            learner.push_weights(self.version)
        else:
            state = learner.state_dict_ref()
            refs = [s.load_weights.remote(state, self.version) for s in self.actors.samplers]
        self.pending += refs
        done, self.pending = ray.wait(self.pending, num_returns=len(self.pending), timeout=0)
        self._settle(done)  # raises if a push failed for another reason than a dead sampler
        if wait:
            self.wait()

    def publish_restored(self, checkpoint_version: int) -> None:
        """After a checkpoint was restored into the learner: a new driver (samplers behind) pushes it under the
        checkpoint's version; a learner restart (samplers ahead: they hold later, lost weights) under the next
        version, as versions only grow."""
        if checkpoint_version > self.version:
            self.publish(as_version=checkpoint_version)
        elif checkpoint_version < self.version:
            self.publish()

    def wait(self) -> None:
        """Wait for every push under way (the samplers then hold the learner's weights)."""
        pending, self.pending = self.pending, []
        self._settle(pending)

    def drain_pushes_of_lost_weights(self) -> None:
        """A learner restart: pushes of the old weights land or are lost, whatever happened (the restore pushes the
        checkpoint's weights anyway)."""
        pending, self.pending = self.pending, []
        for ref in pending:
            try:
                ray.get(ref, timeout=self.timeout_s)
            except ray.exceptions.RayError:
                pass

    def resync_samplers(self) -> None:
        """Samplers that Ray restarted hold their initial weights (version 0): give them the current ones. With
        weight_sync=collective the weight group is re-formed first (every member joins a new one)."""
        learner = self.actors.learner
        assert learner is not None
        pending, self.pending = self.pending, []
        for ref in pending:  # pushes still in flight land first (or are lost with their sampler)
            try:
                ray.get(ref, timeout=self.timeout_s)
            except self.lost_push:
                pass
        for t in self.actors.teachers:  # a restarting teacher refuses tasks until its model is loaded again
            self._when_ready(t.get_stats)
        versions = [self._when_ready(s.get_version) for s in self.actors.samplers]
        behind = [s for s, v in zip(self.actors.samplers, versions, strict=True) if v < self.version]
        if not behind:
            return
        if self.collective:
            self.actors.connect_weight_group()
        state = learner.state_dict_ref()
        ray.get([s.load_weights.remote(state, self.version) for s in behind])
        print(f"[fault] {len(behind)} restarted sampler(s) now hold weight version {self.version}", flush=True)

    def _when_ready(self, method: Any) -> Any:
        """Call an actor's cheap method, waiting while Ray restarts the actor (bounded by cluster.task_timeout_s)."""
        deadline = time.time() + self.timeout_s
        while True:
            try:
                return ray.get(method.remote(), timeout=self.timeout_s)
            except ray.exceptions.ActorUnavailableError:
                if time.time() > deadline:
                    raise RunStopped("a restarted actor did not come back within cluster.task_timeout_s") from None
                time.sleep(1.0)

    def _settle(self, refs: list) -> None:
        """Wait for weight pushes; a sampler that died meanwhile is brought up to date once Ray has restarted it."""
        lost = False
        for ref in refs:
            try:
                ray.get(ref, timeout=self.timeout_s)
            except self.lost_push:
                lost = True
        if lost:
            self.budget.spend("a weight push was lost to a dead sampler")
            print(f"[fault] a weight push was lost to a dead sampler ({self.budget.spent} failure(s))", flush=True)
            self.resync_samplers()
