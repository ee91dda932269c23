"""Exact measures of how a model's response distribution sits against a teacher's and the ground truth of a
synthetic language (common/synthetic.py): sequence-level KLs split into an exact part on the known support and an
unbiased Monte-Carlo part off it, precision, coverage of modes, and the fit of a model to the ground truth.

No Ray: torch and common/synthetic.py only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from common.synthetic import TopicIds, response_logprobs, sample_responses


@dataclass(frozen=True)
class Estimate:
    """An exact part (summed over the known support) plus an unbiased Monte-Carlo part (off the support)."""

    exact: float
    off_support: float
    stderr: float  # of the Monte-Carlo part; 0 when no sample left the support

    @property
    def value(self) -> float:
        return self.exact + self.off_support


def split_kl(
    support_loga: torch.Tensor,
    support_logb: torch.Tensor,
    sample_loga: torch.Tensor,
    sample_logb: torch.Tensor,
    sample_on_support: torch.Tensor,
) -> Estimate:
    """KL[a || b] = sum_{y in S} a(y) log(a(y)/b(y)) + E_{y~a}[1{y not in S} log(a(y)/b(y))].

    The first sum runs over the known support S exactly; the second is the mean over samples drawn from `a`
    (their exact log-probs under both models), counting only those outside S. Both parts are unbiased, so the
    total is; its only noise is the off-support part's standard error."""
    a = support_loga.double()
    exact = float((a.exp() * (a - support_logb.double())).sum())
    off = (~sample_on_support).double() * (sample_loga.double() - sample_logb.double())
    n = off.numel()
    mean = float(off.mean()) if n else 0.0
    stderr = float(off.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0
    return Estimate(exact, mean, stderr)


def precision(sample_logprob: torch.Tensor, threshold: float) -> float:
    """Share of samples whose probability (under the ground truth or the teacher) is at least `threshold`."""
    return float((sample_logprob >= math.log(threshold)).double().mean()) if sample_logprob.numel() else 0.0


def exact_precision(support_logq: torch.Tensor, gt_probs: Sequence[float], threshold: float) -> float:
    """P_{y~q}[g(y) >= threshold] exactly: q's mass on the support responses the ground truth g gives at least
    `threshold` (g is 0 off the support, so nothing else can count)."""
    keep = torch.tensor([g >= threshold for g in gt_probs], dtype=torch.bool)
    return float(support_logq.double().exp()[keep].sum())


def coverage(samples: Sequence[Sequence[int]], modes: Sequence[Sequence[int]]) -> float:
    """Share of the modes that occur at least once among the samples."""
    seen = {tuple(s) for s in samples}
    return sum(tuple(m) in seen for m in modes) / len(modes) if modes else 0.0


def expected_coverage(mode_logq: torch.Tensor, n: int) -> float:
    """E[coverage] of n independent samples from q, exactly: the mean over modes of 1 - (1 - q(m))^n."""
    q = mode_logq.double().exp().clamp(0, 1)
    return float((1 - (1 - q) ** n).mean()) if q.numel() else 0.0


def measure(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    topics: Sequence[TopicIds],
    vocab_size: int,
    eos_id: int,
    samples_per_topic: int = 256,
    coverage_samples: int = 32,
    max_new_tokens: int = 12,
    seed: int = 0,
    threshold: float = 1e-3,
) -> dict[str, float]:
    """Every measure of `student` (q) against `teacher` (p) and the ground truth (g), averaged over topics (each
    topic's prompt equally likely; EOS is the padding id, as in build_tokenizer).

    reverse_kl = KL[q||p] and forward_kl = KL[p||q] per response (split_kl: exact on the support, the rest from
    `samples_per_topic` samples of q, resp. p); precision_exact = q(g >= threshold), exact; precision = the share
    of q's samples with g >= threshold and precision_teacher with p >= threshold; coverage = share of g's modes
    among the first `coverage_samples` samples of q of each topic, coverage_expected its exact expectation;
    rare_coverage_expected the same for g's rare responses.
    Same seed, same draws: models are compared on identical random numbers."""
    if not 0 < coverage_samples <= samples_per_topic:
        raise ValueError("coverage_samples must be in [1, samples_per_topic]")
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for t in topics:
        sq = response_logprobs(student, t.prompt, t.support, vocab_size, eos_id)
        sp = response_logprobs(teacher, t.prompt, t.support, vocab_size, eos_id)
        gt = {tuple(s): g for s, g in zip(t.support, t.gt_probs, strict=True)}
        ys = sample_responses(student, t.prompt, samples_per_topic, max_new_tokens, eos_id, vocab_size, gen)
        yp = sample_responses(teacher, t.prompt, samples_per_topic, max_new_tokens, eos_id, vocab_size, gen)
        ys_q = response_logprobs(student, t.prompt, ys, vocab_size, eos_id)
        ys_p = response_logprobs(teacher, t.prompt, ys, vocab_size, eos_id)
        yp_q = response_logprobs(student, t.prompt, yp, vocab_size, eos_id)
        yp_p = response_logprobs(teacher, t.prompt, yp, vocab_size, eos_id)
        ys_g = torch.tensor([math.log(gt[tuple(y)]) if tuple(y) in gt else -math.inf for y in ys])
        on_s = torch.tensor([tuple(y) in gt for y in ys])
        on_p = torch.tensor([tuple(y) in gt for y in yp])
        rev = split_kl(sq, sp, ys_q, ys_p, on_s)
        fwd = split_kl(sp, sq, yp_p, yp_q, on_p)
        modes = t.support[: t.num_modes]
        rows.append(
            {
                "reverse_kl": rev.value,
                "reverse_kl_off_support": rev.off_support,
                "reverse_kl_stderr": rev.stderr,
                "forward_kl": fwd.value,
                "forward_kl_off_support": fwd.off_support,
                "forward_kl_stderr": fwd.stderr,
                "precision_exact": exact_precision(sq, t.gt_probs, threshold),
                "precision": precision(ys_g, threshold),
                "precision_teacher": precision(ys_p, threshold),
                "coverage": coverage(ys[:coverage_samples], modes),
                "coverage_expected": expected_coverage(sq[: t.num_modes], coverage_samples),
                "rare_coverage_expected": expected_coverage(sq[t.num_modes :], coverage_samples),
                "mode_mass": float(sq[: t.num_modes].exp().sum()),
                "rare_mass": float(sq[t.num_modes :].exp().sum()),
                "teacher_support_mass": float(sp.exp().sum()),
                "response_tokens": sum(len(y) for y in ys) / len(ys),
            }
        )
    out = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    # standard errors of a mean over topics (independent draws) combine in quadrature
    for k in ("reverse_kl_stderr", "forward_kl_stderr"):
        out[k] = math.sqrt(sum(r[k] ** 2 for r in rows)) / len(rows)
    return out


def ground_truth_fit(model: torch.nn.Module, topics: Sequence[TopicIds], vocab_size: int, pad_id: int) -> dict:
    """How close a model is to the ground truth on the support, exactly: KL[g || model] restricted to the
    support (the part of the forward KL that needs no samples: g is 0 elsewhere, so it is the whole KL[g||m]),
    the total variation between g and the model over responses (the model's mass off the support included), and
    the worst ratio model(y)/g(y) over the modes."""
    kls, tvs, ratios = [], [], []
    for t in topics:
        lm = response_logprobs(model, t.prompt, t.support, vocab_size, pad_id)
        g = torch.tensor(t.gt_probs, dtype=torch.float64)
        kls.append(float((g * (g.log() - lm)).sum()))
        m = lm.exp()
        tvs.append(0.5 * (float((g - m).abs().sum()) + (1 - float(m.sum()))))
        ratios.extend((m[: t.num_modes] / g[: t.num_modes]).tolist())
    return {
        "forward_kl_to_model": sum(kls) / len(kls),
        "total_variation": sum(tvs) / len(tvs),
        "mode_ratio_min": min(ratios),
        "mode_ratio_max": max(ratios),
    }
