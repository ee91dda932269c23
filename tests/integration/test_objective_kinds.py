"""Every objective.kind (and MiniLLM's lmops variant) end to end through `python -m learner.main` on the tiny config
(a few updates from the tiny student, SFT skipped): it trains, logs the lr of every update by the schedule, and the
teacher sends what the kind needs (sampled_rkl: no vocabulary rows)."""

import json
import math

import pytest

from learner.lr_schedule import lr_at
from tests.driver_runs import run_driver

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

STEPS = 3
KINDS = {
    # half of each batch sampled, half the data set's responses (GKD's lambda)
    "gkd": ["objective.kind=gkd", "objective.beta=0.5", "objective.on_policy_fraction=0.5"],
    "skew_kl": ["objective.kind=skew_kl"],
    "skew_rkl": ["objective.kind=skew_rkl"],
    "sampled_rkl": ["objective.kind=sampled_rkl", "objective.discount=0.9"],
    # the released code's conventions, L_PT with the teacher's part, a warm-up then cosine decay
    "lmops": ["objective.variant=lmops", "learner.lr_schedule=cosine", "learner.warmup_steps=1"],
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_objective_kind_runs(kind, tmp_path, tiny_models):
    out = tmp_path / kind
    records, stdout = run_driver(
        out,
        f"models.sft_checkpoint={tiny_models.student}",
        f"learner.minillm_steps={STEPS}",
        "learner.batch_size=4",
        "learner.pretrain_batch_size=2",
        "sampler.max_new_tokens=16",
        "eval.max_new_tokens=16",
        f"eval.every_steps={STEPS}",
        "eval.at_start=false",
        "eval.num_prompts=8",
        "eval.kl_prompts=8",
        "data.max_valid_examples=40",
        "data.max_train_examples=200",
        "checkpoint.every_steps=0",
        "logging.wandb_mode=disabled",
        *KINDS[kind],
    )
    steps = [r for r in records if r["phase"] == "minillm"]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1)), stdout[-2000:]
    assert all(math.isfinite(r["loss"]) and not r["skipped"] for r in steps)
    cfg = {"lr": 3e-4, "schedule": "constant", "warmup": 0}  # configs/tiny.yaml's lr
    if kind == "lmops":
        cfg.update(schedule="cosine", warmup=1)
        assert all(r["loss_pt"] > 0 for r in steps)  # L_PT with the teacher's cross-entropy part
        # its teacher rows on the pre-training block (2 x 63 target positions), dense float32 over the vocabulary
        assert len({r["pt_teacher_bytes"] for r in steps}) == 1 and steps[0]["pt_teacher_bytes"] % (2 * 63 * 4) == 0
    else:
        assert all("pt_teacher_bytes" not in r for r in steps)
    expected = [lr_at(s, cfg["lr"], cfg["schedule"], cfg["warmup"], STEPS) for s in range(STEPS)]
    assert [r["lr"] for r in steps] == pytest.approx(expected, rel=1e-12, abs=0)
    if kind == "sampled_rkl":
        assert all(r["teacher_bytes_per_token"] == 0 for r in steps)  # only the sampled tokens' log-probs
        assert all(r["loss_single"] == 0 for r in steps)
    else:
        assert all(r["teacher_bytes_per_token"] > 0 for r in steps)
    if kind in ("gkd", "skew_kl", "skew_rkl"):
        assert all(r["loss_long"] == 0 and r["loss_single"] > 0 for r in steps)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["reverse_kl_token"] > 0  # validation still scores the vocabulary (dense teacher)
    assert (out / "checkpoints" / "final" / "model.safetensors").is_file()
