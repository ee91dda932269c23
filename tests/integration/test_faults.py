"""The service survives a sampler or a teacher killed for real in the middle of MiniLLM (`ray.kill`; Ray restarts the
actor): the lost batch is sampled again under its id, the restarted sampler gets the current weights first, and the
ledger shows every update consumed exactly one batch."""

from pathlib import Path

import pytest
import ray

from tests.inprocess import short_minillm_recipe

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

STEPS = 6


def _run_with_kill(tmp_path: Path, tiny_models, victim: str, kill_after_step: int):
    recipe, logger = short_minillm_recipe(
        tmp_path / victim,
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
            if record["step"] == kill_after_step:  # batches of the next steps are being sampled/scored right now
                ray.kill(ray.get_actor(victim), no_restart=False)

    logger.log = log_and_kill  # type: ignore[method-assign]
    try:
        summary = recipe.run()
    finally:
        recipe.cleanup()
    return summary, records


# the teacher case is `slow` (CI's time budget): it exercises the same relaunch path with a stateless actor
@pytest.mark.parametrize("victim", ["sampler-0", pytest.param("teacher-0", marks=pytest.mark.slow)])
def test_run_survives_a_killed_actor(ray_module, tiny_models, tmp_path, victim):
    summary, records = _run_with_kill(tmp_path, tiny_models, victim, kill_after_step=2)
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
