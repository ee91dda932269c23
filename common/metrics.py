"""Evaluation metrics as pure functions: ROUGE-L (best reference), Dist-n, sequence-level KL estimates."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from statistics import mean, pstdev


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    # the paper's setup: ROUGE-L F-measure with Porter stemming
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F1 in [0, 100] against the best-matching reference."""
    if not references:
        raise ValueError("rouge_l needs at least one reference")
    scorer = _scorer()
    return 100.0 * max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def rouge_l_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """ROUGE-L of each prediction against its own reference set."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference sets")
    return [rouge_l(p, r) for p, r in zip(predictions, references, strict=True)]


def corpus_rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    scores = rouge_l_scores(predictions, references)
    return mean(scores) if scores else 0.0


def distinct_n(token_lists: Sequence[Sequence[int | str]], n: int = 4) -> float:
    """Dist-n: unique n-grams / total n-grams over a set of generations, in [0, 100] (0 when no n-gram)."""
    grams = [tuple(toks[i : i + n]) for toks in token_lists for i in range(len(toks) - n + 1)]
    return 100.0 * len(set(grams)) / len(grams) if grams else 0.0


def mean_and_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (the spread across evaluation seeds)."""
    if not values:
        raise ValueError("no values")
    return mean(values), pstdev(values) if len(values) > 1 else 0.0


def exposure_accumulated_error(
    kl_student_prefix: Sequence[Sequence[float]], kl_teacher_prefix: Sequence[Sequence[float]], length: int
) -> float:
    """ExAccErr(l) of Arora et al. (2022), as in MiniLLM's Appendix B.5, in percent.

    Inputs are per-position forward KLs KL[p(.|y<t) || q(.|y<t)] along prefixes sampled from the student
    (`kl_student_prefix`) and from the teacher (`kl_teacher_prefix`), one list per sample.
    R(l) = sum_{t<=l} E_{y<t ~ q}[KL_t] (regret accumulated on the model's own prefixes);
    eps(l) = (1/l) sum_{t<=l} E_{y<t ~ p}[KL_t] (per-step error on the teacher's prefixes);
    ExAccErr(l) = (R(l) - l eps(l)) / (l eps(l)) * 100: the extra error due to exposure bias.
    Samples shorter than l contribute to the positions they have (averaged per position).
    """

    def per_position_sum(rows: Sequence[Sequence[float]]) -> float:
        total = 0.0
        for t in range(length):
            vals = [r[t] for r in rows if len(r) > t]
            if vals:
                total += sum(vals) / len(vals)
        return total

    regret = per_position_sum(kl_student_prefix)
    l_eps = per_position_sum(kl_teacher_prefix)
    if l_eps <= 0:
        raise ValueError("the per-step error on teacher prefixes is 0: ExAccErr is undefined")
    return 100.0 * (regret - l_eps) / l_eps
