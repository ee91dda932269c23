"""The service survives a sampler or a teacher killed for real in the middle of MiniLLM (`ray.kill`; Ray restarts the
actor): the lost batch is sampled again under its id, the restarted sampler gets the current weights first, and the
ledger shows every update consumed exactly one batch. The rollout queue killed for real (SIGKILL of its process) is
replaced and refilled with the batches in flight, at the cost of one failure. A learner rank killed (SIGKILL of its
process) takes the learner group down: a new group restores the newest checkpoint and the run finishes; past
cluster.max_failures it stops with one line."""

import os
import signal
from pathlib import Path

import pytest
import ray

from learner.run_log import RunStopped
from tests.inprocess import short_minillm_recipe

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

STEPS = 6


def _run_with_kill(tmp_path: Path, tiny_models, victim: str, kill_after_step: int, *overrides: str):
    recipe, logger = short_minillm_recipe(
        tmp_path / victim,
        tiny_models.student,
        f"learner.minillm_steps={STEPS}",
        "eval.at_end=false",
        "sampler.max_new_tokens=16",
        *overrides,
    )
    records: list[dict] = []
    real_log = logger.log

    def log_and_kill(record: dict) -> None:
        real_log(record)
        if record.get("phase") == "minillm":
            records.append(record)
            if record["step"] == kill_after_step:  # batches of the next steps are being sampled/scored right now
                ray.kill(ray.get_actor(victim), no_restart=False)

    logger.log = log_and_kill  # type: ignore[method-assign]
    try:
        summary = recipe.run()
    finally:
        recipe.cleanup()
    return summary, records


# the teacher case is `slow` (CI's time budget): it exercises the same relaunch path with a stateless actor. With
# learner.weight_sync=collective (gloo here) the sampler's restart re-forms the weight group.
@pytest.mark.parametrize(
    "victim,sync",
    [
        ("sampler-0", "object_store"),
        ("sampler-0", "collective"),
        pytest.param("teacher-0", "object_store", marks=pytest.mark.slow),
    ],
)
def test_run_survives_a_killed_actor(ray_module, tiny_models, tmp_path, victim, sync, capfd):
    summary, records = _run_with_kill(tmp_path, tiny_models, victim, 2, f"learner.weight_sync={sync}")
    ledger = [b for r in records for b in r["batch_ids"]]
    print(
        f"{victim} killed after step 2: failures {summary['failures']}, ledger {ledger}, versions "
        f"{[(r['rollout_version'], r['weight_version']) for r in records]}"
    )
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert summary["failures"] >= 1
    assert len(ledger) == STEPS and len(set(ledger)) == STEPS  # one batch per update, none twice
    assert sorted(ledger) == list(range(STEPS))  # none lost: the lost batch came back under its id
    # no update trained on a restarted sampler's initial weights: every batch is within the allowed lag
    assert all(0 <= r["version_lag"] <= 1 for r in records)
    assert all(r["rollout_version"] >= 2 for r in records[3:])
    if sync == "collective":  # every member joined a second group, under a new name
        assert "[weights] re-formed over gloo (minillm-weights-2" in capfd.readouterr().out


def test_run_survives_a_killed_rollout_queue(ray_module, tiny_models, tmp_path):
    """SIGKILL of the queue's process after update 2 (batches 2.. queued or on their way): a new queue takes them
    again under their ids, nothing is sampled twice, one failure is spent (not one per batch), and the run ends."""
    recipe, logger = short_minillm_recipe(
        tmp_path / "queue",
        tiny_models.student,
        f"learner.minillm_steps={STEPS}",
        "eval.at_end=false",
        "sampler.max_new_tokens=16",
    )
    records: list[dict] = []
    real_log = logger.log

    def log_and_kill(record: dict) -> None:
        real_log(record)
        if record.get("phase") == "minillm":
            records.append(record)
            if record["step"] == 2:
                queue = ray.get_actor("rollout-queue")
                os.kill(ray.get(queue.__ray_call__.remote(lambda q: os.getpid())), signal.SIGKILL)

    logger.log = log_and_kill  # type: ignore[method-assign]
    try:
        summary = recipe.run()
    finally:
        recipe.cleanup()
    ledger = [b for r in records for b in r["batch_ids"]]
    print(f"queue killed after step 2: failures {summary['failures']}, ledger {ledger}")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert ledger == list(range(STEPS)) and summary["batches_consumed"] == list(range(STEPS))
    assert summary["failures"] == 1  # the queue's death, once
    assert all(0 <= r["version_lag"] <= 1 for r in records)


# two FSDP ranks (the survivor sits in a collective waiting for its dead peer), a checkpoint every 3 updates
LEARNER_RUN = [
    "learner.minillm_steps=6",
    "learner.num_workers=2",
    "cluster.learner_cpus=0.25",  # 1 sampler + 0.5 teacher + 2 x 0.25 learner = the fixture's 2 CPUs
    "checkpoint.every_steps=3",
    "logging.sampled_ids=true",
    "eval.at_end=false",
    "sampler.max_new_tokens=16",
]
SAME = ["loss", "loss_single", "loss_long", "loss_pt", "reverse_kl", "grad_norm", "sampled_ids", "version_lag"]


def _sigkill_rank(rank: int) -> None:
    """A real death: the rank's process is SIGKILLed (no Ray call ends it; Ray finds the process gone)."""
    pid = ray.get(ray.get_actor(f"learner-{rank}").__ray_call__.remote(lambda worker: os.getpid()))
    os.kill(pid, signal.SIGKILL)


def _run_killing_learner(out: Path, tiny_models, kill_after_steps: tuple[int, ...], *extra: str):
    recipe, logger = short_minillm_recipe(out, tiny_models.student, *LEARNER_RUN, *extra)
    records: list[dict] = []
    real_log, pending = logger.log, list(kill_after_steps)

    def log_and_kill(record: dict) -> None:
        real_log(record)
        if record.get("phase") in ("minillm", "learner_restart"):
            records.append(record)
        if record.get("phase") == "minillm" and pending and record["step"] == pending[0]:
            pending.pop(0)
            _sigkill_rank(1)  # the next update's collective runs without it

    logger.log = log_and_kill  # type: ignore[method-assign]
    try:
        return recipe.run(), records, None
    except RunStopped as exc:
        return None, records, exc
    finally:
        recipe.cleanup()


def test_run_survives_a_killed_learner_rank(ray_module, tiny_models, tmp_path):
    """Rank 1 of 2 SIGKILLed after update 4 (checkpoints at 3 and 6): update 5 fails, the group is replaced, update 3's
    checkpoint restored, and updates 4..6 run again from there to the end."""
    summary, records, stopped = _run_killing_learner(tmp_path / "learner", tiny_models, (4,))
    assert stopped is None, stopped
    restarts = [r for r in records if r["phase"] == "learner_restart"]
    steps = [r["step"] for r in records if r["phase"] == "minillm"]
    print(f"steps {steps}; restart {restarts}")
    assert steps == [1, 2, 3, 4, 4, 5, 6]  # update 5 died with the rank; the run continued from the checkpoint of 3
    (restart,) = restarts
    assert restart["restored_step"] == 3 and restart["failed_at_global_step"] == 4
    assert "learner rank 1 died" in restart["reason"]
    # the ledger: batches 3 and 4 (consumed by update 4 and the failed 5) are taken back, batch 5 (sampled ahead from
    # weights the restored learner never had) dropped; after the restart every update consumes one batch, none twice
    assert restart["rolled_back_batch_ids"] == [3, 4] and restart["dropped_batch_ids"] == [5]
    first, after = records[: steps.index(4) + 1], records[steps.index(4) + 2 :]
    ledger = [b for r in first[:3] + after for b in r["batch_ids"]]
    assert ledger == list(range(6)) and summary["batches_consumed"] == list(range(6))
    assert summary["learner_restarts"] == 1 and summary["failures"] == 1
    # the restored learner redoes update 4 exactly (bitwise: same batch seed, same weights, optimizer and RNGs)
    for key in SAME:
        assert after[0][key] == first[3][key], f"update 4 {key}: {after[0][key]!r} vs {first[3][key]!r}"
    # the restored weights went out as a new version: versions only grow, no batch from before is taken after
    assert after[0]["rollout_version"] > max(r["weight_version"] for r in first)
    assert restart["weight_version"] == after[0]["rollout_version"]


@pytest.mark.slow
def test_learner_failures_past_max_failures_stop_the_run(ray_module, tiny_models, tmp_path):
    """cluster.max_failures=1: the first death is survived, the second stops the run with one line."""
    _, records, stopped = _run_killing_learner(tmp_path / "stop", tiny_models, (2, 4), "cluster.max_failures=1")
    print(f"stopped: {stopped}; restarts {[r for r in records if r['phase'] == 'learner_restart']}")
    assert stopped is not None and len(str(stopped).splitlines()) == 1
    assert "learner rank 1 died" in str(stopped) and "cluster.max_failures=1 failures are spent" in str(stopped)
    assert [r["phase"] for r in records].count("learner_restart") == 1
