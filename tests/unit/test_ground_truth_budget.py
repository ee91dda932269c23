"""The ground-truth bench's budget of a run (learner/reports/ground_truth.py: run_budget) from a metrics.jsonl."""

import json
from pathlib import Path

from learner.reports.ground_truth import ON_POLICY, run_budget


def test_budget_counts_only_the_on_policy_updates(tmp_path: Path) -> None:
    recs = [
        {"phase": "sft", "step": 1, "loss": 1.0, "tokens": 500},
        {"phase": "minillm", "step": 1, "loss": 1.0, "tokens": 100, "teacher_bytes_per_token": 40},
        {"phase": "minillm", "step": 2, "loss": 1.0, "tokens": 90, "teacher_bytes_per_token": 20},
        {"phase": "minillm", "step": 2, "reverse_kl": 0.1},  # an evaluation record: no update
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert run_budget(tmp_path) == {"updates": 2, "trained_tokens": 190, "teacher_bytes_per_token": 30}
    assert run_budget(tmp_path / "missing") == {"updates": 0, "trained_tokens": 0, "teacher_bytes_per_token": 0}


def test_every_on_policy_label_is_a_valid_config() -> None:
    from common.config import load_config

    for label, overrides in ON_POLICY.items():
        cfg = load_config("configs/ground_truth.yaml", ["method=minillm", *overrides])
        assert cfg.method == "minillm", label


def test_prefix_statistics_of_a_model_against_itself() -> None:
    from common.synthetic import LanguageSpec, build_language, build_tokenizer, tokenize_language
    from learner.reports.ground_truth import Measuring, prefix_statistics
    from tests.unit.test_synthetic import _tiny_llama

    lang = build_language(LanguageSpec(num_topics=2, num_words=4, num_rare=4, mode_len=(2, 3), rare_len=(1, 3)))
    tok = build_tokenizer(lang)
    topics = tokenize_language(lang, tok)
    model = _tiny_llama(6, vocab=len(tok))
    how = Measuring(samples_per_topic=16, max_new_tokens=5)
    out = prefix_statistics(model, model, topics, len(tok), tok.eos_token_id, how)
    assert 0 < out["void_prefix_share"] < 1  # an untrained model leaves the support, not at its first token
    assert out["forward_kl_on_support"] == 0 and out["forward_kl_off_support"] == 0
    assert out["p_entropy_off_support"] == out["q_entropy_off_support"] > 0
