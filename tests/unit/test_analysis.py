"""The evaluate CLI's analysis measures against brute force: per-position exact KLs and the LM loss, computed
prefix by prefix with single-sequence forwards (no padding, no batching)."""

import math

import pytest
import torch

from learner.analysis import lm_loss, position_kls
from tests.toy_models import build_llama_dir

VOCAB = 40


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    student = build_llama_dir(root / "s", VOCAB, seed=1)
    teacher = build_llama_dir(root / "t", VOCAB + 8, seed=2)  # padded rows beyond the shared vocabulary
    return student, teacher


def _probs(model, prefix):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prefix])).logits[0, -1, :VOCAB].double()
    return logits.log_softmax(-1)


PROMPTS = [[5, 6, 7], [9], [3, 4, 5, 6, 8, 10]]
RESPONSES = [[11, 12, 2], [13, 14, 15, 16, 17], []]


def test_position_kls_match_brute_force(pair):
    student, teacher = pair
    kls = position_kls(student, teacher, PROMPTS, RESPONSES, VOCAB, pad_id=2, batch_size=2)
    assert [len(r) for r in kls.reverse] == [3, 5, 0] and [len(r) for r in kls.forward] == [3, 5, 0]
    for b, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        for t in range(len(response)):
            prefix = prompt + response[:t]
            logq, logp = _probs(student, prefix), _probs(teacher, prefix)
            rev = float((logq.exp() * (logq - logp)).sum())
            fwd = float((logp.exp() * (logp - logq)).sum())
            assert kls.reverse[b][t] == pytest.approx(rev, rel=1e-4, abs=1e-6)
            assert kls.forward[b][t] == pytest.approx(fwd, rel=1e-4, abs=1e-6)
    seq, tok = kls.reverse_means()
    total = sum(map(sum, kls.reverse))
    assert seq == pytest.approx(total / 3) and tok == pytest.approx(total / 8)


def test_kl_of_a_model_with_itself_is_zero(pair):
    student, _ = pair
    kls = position_kls(student, student, PROMPTS, RESPONSES, VOCAB, pad_id=2)
    assert max(abs(v) for row in kls.reverse + kls.forward for v in row) < 1e-5


def test_lm_loss_matches_brute_force(pair):
    student, _ = pair
    total, n = 0.0, 0
    for prompt, response in zip(PROMPTS, RESPONSES, strict=True):
        for t, tok in enumerate(response):
            total -= float(_probs(student, prompt + response[:t])[tok])
            n += 1
    got = lm_loss(student, PROMPTS, RESPONSES, VOCAB, pad_id=2, batch_size=2)
    assert got == pytest.approx(total / n, rel=1e-5)
    assert math.isfinite(got) and got > 0
