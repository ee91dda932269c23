"""The update statistics' contract (learner/update_stats.py): how two ranks' reports combine."""

import pytest

from learner.update_stats import RankUpdate


def _rank(tokens: float, rho_min: float, rho_max: float, seconds: float, gap: bool) -> dict[str, float]:
    return RankUpdate(
        loss=0.5 * tokens,
        loss_single=0.25,
        loss_long=0.125,
        loss_pt=0.0,
        kl_sum=2.0 * tokens,
        rho_sum=tokens,
        clip_sum=1.0,
        rho_min=rho_min,
        rho_max=rho_max,
        tokens=tokens,
        grad_norm=3.0,
        skipped=0.0,
        step_seconds=seconds,
        step_cpu_seconds=seconds,
        gap_sum=0.1 * tokens if gap else None,
        gap_max=0.3 * rho_max if gap else None,
        gap_tokens=tokens if gap else None,
    ).as_dict()


def test_minillm_ranks_combine_into_means_and_extremes():
    out = RankUpdate.reduce([_rank(4.0, 0.9, 1.1, 2.0, True), _rank(6.0, 0.8, 1.3, 3.0, True)])
    assert list(out) == [
        "loss", "loss_single", "loss_long", "loss_pt", "rho_min", "rho_max", "tokens", "grad_norm", "skipped",
        "step_seconds", "step_cpu_seconds", "reverse_kl", "rho_mean", "clip_fraction", "logprob_gap_mean",
        "logprob_gap_max",
    ]  # fmt: skip
    assert out["loss"] == 5.0 and out["tokens"] == 10.0 and out["step_cpu_seconds"] == 5.0  # shares add up
    assert (out["rho_min"], out["rho_max"], out["step_seconds"], out["grad_norm"]) == (0.8, 1.3, 3.0, 3.0)
    assert out["reverse_kl"] == pytest.approx(2.0) and out["rho_mean"] == pytest.approx(1.0)
    assert out["clip_fraction"] == pytest.approx(0.2)
    assert out["logprob_gap_mean"] == pytest.approx(0.1) and out["logprob_gap_max"] == pytest.approx(0.39)


def test_sft_and_kd_reports_keep_only_their_fields():
    sft = RankUpdate(loss=1.0, grad_norm=2.0, skipped=0.0, tokens=0.0, step_seconds=1.0, step_cpu_seconds=1.0)
    assert RankUpdate.reduce([sft.as_dict()] * 2) == {
        "loss": 2.0, "tokens": 0.0, "grad_norm": 2.0, "skipped": 0.0, "step_seconds": 1.0, "step_cpu_seconds": 2.0,
    }  # fmt: skip
    kd = RankUpdate(loss=1.0, kd_sum=3.0, nll_sum=6.0, tokens=3.0).as_dict()
    assert RankUpdate.reduce([kd, kd]) == {"loss": 2.0, "tokens": 6.0, "kd": 1.0, "nll": 2.0}


def test_a_statistic_without_a_rule_is_refused():
    with pytest.raises(ValueError, match="no_rule"):
        RankUpdate.reduce([{"loss": 1.0, "no_rule": 2.0}])


def test_pre_training_teacher_bytes_add_up_over_ranks():
    ranks = [RankUpdate(loss=1.0, tokens=2.0, pt_teacher_bytes=b).as_dict() for b in (100.0, 300.0)]
    assert RankUpdate.reduce(ranks)["pt_teacher_bytes"] == 400.0
    assert "pt_teacher_bytes" not in RankUpdate.reduce([RankUpdate(loss=1.0, tokens=2.0).as_dict()] * 2)
