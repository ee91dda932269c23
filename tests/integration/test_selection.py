"""Checkpoint selection (the paper's rules, Appendix B): on one SFT trajectory where the validation loss and the
validation ROUGE-L pick different steps, a run selecting by ROUGE-L keeps the ROUGE-L step and a run selecting by
loss keeps the loss step. Both runs share seed and data order, so they train the same weights step by step; the
kept checkpoint is identified by measuring it again after it is reloaded (the `selection` record)."""

from pathlib import Path

import pytest

from tests.driver_runs import run_driver

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

SHORT = [
    "method=sft",
    "learner.sft_steps=12",
    "learner.sft_eval_every=3",
    "eval.num_prompts=64",
    "eval.kl_prompts=16",
    "eval.max_new_tokens=32",
    "data.max_valid_examples=120",
]


def _run(out: Path, rule: str) -> list[dict]:
    return run_driver(out, *SHORT, f"learner.baseline_select_by={rule}")[0]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("selection")


@pytest.fixture(scope="module")
def runs(root, tiny_models):
    return {rule: _run(root / rule, rule) for rule in ("rouge_l", "valid_loss")}


def _evals(records: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in records if r["phase"] == "sft" and "valid_loss" in r}


def _kept_loss(records: list[dict]) -> float:
    (kept,) = [r["kept_valid_loss"] for r in records if r["phase"] == "selection" and r["of"] == "sft"]
    return kept


def test_loss_and_rouge_disagree_on_one_trajectory(runs):
    by_rouge, by_loss = _evals(runs["rouge_l"]), _evals(runs["valid_loss"])
    assert sorted(by_rouge) == sorted(by_loss) == [3, 6, 9, 12]
    for step in by_rouge:  # the same weights at every evaluation point
        assert by_rouge[step]["valid_loss"] == pytest.approx(by_loss[step]["valid_loss"], rel=1e-6, abs=0)
    loss_step = min(by_rouge, key=lambda s: by_rouge[s]["valid_loss"])
    rouge = {s: r["eval_rouge_l"] for s, r in by_rouge.items()}
    print(f"valid loss by step {[(s, round(r['valid_loss'], 4)) for s, r in by_rouge.items()]}, ROUGE-L {rouge}")
    assert max(rouge.values()) > rouge[loss_step], "this setup no longer separates the rules: the test checks nothing"


def test_rouge_rule_keeps_the_rouge_step(runs):
    records = runs["rouge_l"]
    evals = _evals(records)
    start = next(r["eval_rouge_l"] for r in records if r.get("label") == "sft-start")
    best_step = max(evals, key=lambda s: (evals[s]["eval_rouge_l"], -s))  # the first of equals is kept
    assert evals[best_step]["eval_rouge_l"] > start  # a trained step, not the initial student
    assert [s for s, r in evals.items() if r.get("best")][-1] == best_step
    assert _kept_loss(records) == pytest.approx(evals[best_step]["valid_loss"], rel=1e-6, abs=0)
    # the kept weights evaluated again give the ROUGE-L they were kept for (validation sampling is seeded)
    final = next(r for r in records if r.get("label") == "sft-best")
    assert final["eval_rouge_l"] == pytest.approx(evals[best_step]["eval_rouge_l"], abs=1e-9)


def test_loss_rule_keeps_the_loss_step(runs):
    records = runs["valid_loss"]
    evals = _evals(records)
    best_step = min(evals, key=lambda s: (evals[s]["valid_loss"], s))
    assert [s for s, r in evals.items() if r.get("best")][-1] == best_step
    assert _kept_loss(records) == pytest.approx(evals[best_step]["valid_loss"], rel=1e-6, abs=0)
    assert not any("eval_rouge_l" in r for r in evals.values())  # this rule never samples during the phase


def test_rouge_rule_also_keeps_the_lowest_loss_weights_for_minillm(runs, root):
    """The paper starts MiniLLM from the SFT weights of lowest validation loss and selects the SFT baseline by
    ROUGE-L: one SFT run under the ROUGE-L rule keeps both (checkpoints/lowest_valid_loss for the former)."""
    evals = _evals(runs["rouge_l"])
    loss_step = min(evals, key=lambda s: (evals[s]["valid_loss"], s))
    assert [s for s, r in evals.items() if r.get("lowest_valid_loss")][-1] == loss_step
    kept = root / "rouge_l" / "checkpoints" / "lowest_valid_loss"
    assert (kept / "config.json").exists() and (kept / "model.safetensors").exists()
    assert not (root / "valid_loss" / "checkpoints" / "lowest_valid_loss").exists()  # there `best` is that already


def test_start_that_does_not_compete_is_never_kept(root, tiny_models):
    """learner.start_competes=false (the paper's rule for a run that starts from a trained model): the phase keeps
    its best trained checkpoint even when it does not beat the start. Here the random tiny student and its first
    update at lr 1.0 both score ROUGE-L 0; under the default rule that tie keeps the start."""
    records = run_driver(
        root / "no-start",
        *SHORT[:1],
        "learner.sft_steps=2",
        "learner.sft_eval_every=1",
        "learner.sft_lr=1.0",
        "learner.baseline_select_by=rouge_l",
        "learner.start_competes=false",
        "eval.num_prompts=16",
        "eval.kl_prompts=4",
        "eval.max_new_tokens=16",
    )[0]
    start = next(r for r in records if r.get("label") == "sft-start")
    assert "best" not in start
    evals = _evals(records)
    assert evals[1]["eval_rouge_l"] <= start["eval_rouge_l"], "the start no longer wins: the test checks nothing"
    assert sorted(evals) == [1, 2] and evals[1].get("best")  # the first trained checkpoint is the first candidate
    best_step = max(evals, key=lambda s: (evals[s]["eval_rouge_l"], -s))
    assert _kept_loss(records) == pytest.approx(evals[best_step]["valid_loss"], rel=1e-6, abs=0)
    print(f"start ROUGE-L {start['eval_rouge_l']:.2f}, trained {[evals[s]['eval_rouge_l'] for s in (1, 2)]}")
