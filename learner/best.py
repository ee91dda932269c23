"""Keeping the best checkpoint of a phase: its score so far, which direction is better, and the folder that holds
the weights that scored it."""

from __future__ import annotations

from typing import Any

from learner.validation import ValidationResult

HIGHER_IS_BETTER = {"rouge_l": True, "valid_loss": False, "reverse_kl": False}


def score_of(result: ValidationResult, metric: str) -> float:
    """A validation's score under a selection rule (learner.minillm_select_by)."""
    return result.rouge_l if metric == "rouge_l" else result.reverse_kl_token


class BestCheckpoint:
    """The best score of a phase under one metric, and the HF folder `path` holding its weights."""

    def __init__(self, path: str, metric: str, score: float | None = None, save_dtype: str | None = None):
        self.path, self.metric, self.score = path, metric, score
        self.higher_is_better = HIGHER_IS_BETTER[metric]
        self.save_dtype = save_dtype

    def beaten_by(self, score: float) -> bool:
        if self.score is None:
            return True
        return score > self.score if self.higher_is_better else score < self.score

    def save(self, score: float, learner: Any, tokenizer_dir: str | None) -> None:
        """Keep the learner's weights as the best, with their score."""
        self.score = score
        learner.save(self.path, tokenizer_dir, self.save_dtype)

    def save_if_better(self, score: float, learner: Any, tokenizer_dir: str | None) -> bool:
        """Save the learner's weights when `score` beats the best so far; returns whether it did."""
        if not self.beaten_by(score):
            return False
        self.save(score, learner, tokenizer_dir)
        return True
