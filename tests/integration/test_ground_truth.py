"""The ground-truth experiment (docs/ground_truth.md) in CI, seed 1 of the bench: the teacher fitted to the known
multi-modal response distribution, then KD and MiniLLM (its own SFT phase first, so SFT and MiniLLM students come
from one run of `python -m learner.main`) distilling it into the too-small student, measured exactly against teacher
and ground truth. Besides the checks that hold whatever the result, it asserts the ordering the theory predicts,
MiniLLM's precision above KD's, because it held on all 3 seeds of the bench with a wide margin (0.880 / 0.876 / 0.876
against 0.694 / 0.632 / 0.672: at least 0.19 apart)."""

import math
import os
from pathlib import Path

import pytest

# slow: about 20 minutes on the 2-core machine (KD's 1,000 updates dominate), too long for CI's 30-minute budget;
# run it with `python -m pytest -m slow tests/integration/test_ground_truth.py`
pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

MARGIN = 0.1  # about half the smallest gap the 3 bench seeds left (0.186, seed 1)
# the models and data are built once per setup and reused, like the tiny default's (tests/conftest.py)
CACHE = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "minillm-service" / "ground_truth"


def _within(a: float, b: float, sigmas: float, stderr: float) -> bool:
    return abs(a - b) <= sigmas * stderr


def test_minillm_is_more_precise_than_kd_on_a_known_distribution(tmp_path):
    import json

    from learner.reports.ground_truth import Measuring, build_assets, measure_model, run_method

    assets = build_assets(CACHE)
    fit = json.loads((assets.root / "teacher_fit.json").read_text())
    # the teacher is the ground truth, near enough to stand for it: <= 5 % total variation, every mode within 5 %
    assert fit["total_variation"] < 0.05 and 0.95 < fit["mode_ratio_min"] <= fit["mode_ratio_max"] < 1.05, fit

    how = Measuring()
    out = tmp_path / "s1"
    init = measure_model(assets, assets.student_init(1), how)
    kd = measure_model(assets, run_method(assets, "kd", 1, out, []), how)
    minillm = measure_model(assets, run_method(assets, "minillm", 1, out, [], chain=False), how)
    sft = measure_model(assets, out / "minillm" / "checkpoints" / "sft_best", how)
    shown = {
        name: {k: round(m[k], 3) for k in ("precision_exact", "precision", "coverage_expected", "reverse_kl")}
        for name, m in (("init", init), ("sft", sft), ("kd", kd), ("minillm", minillm))
    }
    print(json.dumps(shown))

    n = how.samples_per_topic * len(assets.language.topics)
    for m in (init, sft, kd, minillm):
        # exact sums over the support against the model's own samples (drawn token by token, a separate code path):
        # the exact precision is the probability that a sample lands on the support (threshold below every g(y))
        p = m["precision_exact"]
        assert _within(m["precision"], p, 5, math.sqrt(max(p * (1 - p), 1e-4) / n)), shown
        assert 0 <= m["coverage_expected"] <= 1 and p <= 1 + 1e-9, m
        # a KL is >= 0; the estimate's only noise is its off-support Monte-Carlo part
        for kl in ("reverse_kl", "forward_kl"):
            assert m[kl] > -5 * m[f"{kl}_stderr"] - 1e-9, (kl, m)

    assert init["precision_exact"] < 0.05, shown  # a random student: almost all its mass in the void
    # the service trained the student: SFT moves most of the mass onto the support, and MiniLLM (reverse KL)
    # lowers the reverse KL it starts from
    assert sft["precision_exact"] > 0.4 and sft["reverse_kl"] < init["reverse_kl"] - 5, shown
    assert minillm["reverse_kl"] < sft["reverse_kl"], shown
    # the theory's prediction (docs/ground_truth.md): reverse KL puts more of the student's mass where the teacher has
    # its own than forward KL does
    assert minillm["precision_exact"] > kd["precision_exact"] + MARGIN, shown
