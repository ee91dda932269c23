"""Padded vocabularies (embedding rows past the tokenizer, as Qwen2.5's): the mixture sampler never draws a padded
row, its tokens follow alpha*p + (1-alpha)*q over the real rows (chi-square, as tests/integration/test_sampler.py),
and q_old is the learner's log-prob over the real rows, forced and pass. The padded rows of both heads are made
likely (large weights), so without the mask they would be drawn often and every log-prob would be off."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from actors.sampler import Sampler, SamplerSpec
from tests.integration.test_sampler import EOS, LIMIT, PROMPT, TOL
from tests.mixture_stats import pit_p_value
from tests.toy_models import build_llama_dir

pytestmark = pytest.mark.integration

REAL, ROWS, N = 12, 16, 600


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    root = tmp_path_factory.mktemp("padded")
    models = {}
    for name, seed in (("student", 0), ("teacher", 9)):
        model = build_llama_dir(root / name, ROWS, seed=seed, head_std=0.3)
        with torch.no_grad():
            model.lm_head.weight[REAL:].normal_(0.0, 1.5)  # padded rows: high logits unless masked
        model.save_pretrained(str(root / name))
        models[name] = model.eval()
    spec = SamplerSpec(
        student_dir=str(root / "student"),
        teacher_dir=str(root / "teacher"),
        eos_token_id=EOS,
        max_new_tokens=LIMIT,
        kv_cache_mb=64,
        seed=77,
        max_model_len=64,
        vocab_size=REAL,
    )
    return Sampler(spec), models


@torch.no_grad()
def _real_probs(model, responses: list[list[int]]) -> list[torch.Tensor]:
    """Next-token distributions over the real rows only (the learner's vocab_log_softmax)."""
    width = len(PROMPT) + max(len(r) for r in responses)
    ids = torch.full((len(responses), width), EOS)
    for b, r in enumerate(responses):
        ids[b, : len(PROMPT) + len(r)] = torch.tensor(PROMPT + r)
    probs = model(input_ids=ids).logits[..., :REAL].double().softmax(-1)
    return [probs[b, len(PROMPT) - 1 : len(PROMPT) - 1 + len(r)] for b, r in enumerate(responses)]


def test_padded_rows_never_drawn_and_mixture_exact(padded):
    sampler, models = padded
    with torch.no_grad():  # the premise: unmasked, the padded rows would take much of the mass
        logits = models["student"](input_ids=torch.tensor([PROMPT])).logits[0, -1]
        assert logits.softmax(-1)[REAL:].sum() > 0.2
    rollouts = sampler.sample([PROMPT] * N, alpha=0.2)
    drawn = np.concatenate([np.array(r) for r in rollouts.response_ids])
    assert drawn.max() < REAL
    q = _real_probs(models["student"], rollouts.response_ids)
    p = _real_probs(models["teacher"], rollouts.response_ids)
    p_value = pit_p_value(q, p, rollouts.response_ids, 0.2)
    print(f"padded rows: chi-square p={p_value:.3f} over {rollouts.num_tokens} tokens")
    assert p_value > 1e-3
    assert pit_p_value(q, p, rollouts.response_ids, 0.7) < 1e-3  # power


@pytest.mark.parametrize("scoring", ["forced", "pass"])
def test_old_logprobs_normalised_over_real_rows(padded, scoring):
    sampler, models = padded
    spec = sampler.spec
    sampler.spec = replace(spec, score_teacher_tokens=scoring)
    try:
        rollouts = sampler.sample([PROMPT] * 48, alpha=0.5)
    finally:
        sampler.spec = spec
    q = _real_probs(models["student"], rollouts.response_ids)
    worst, teacher_tokens = 0.0, 0
    for probs, resp, lps, own in zip(q, rollouts.response_ids, rollouts.old_logprobs, rollouts.owners, strict=True):
        ref = probs[torch.arange(len(resp)), torch.tensor(resp)].log()
        worst = max(worst, float((torch.tensor(lps, dtype=torch.float64) - ref).abs().max()))
        teacher_tokens += sum(own)
    assert teacher_tokens > 20 and worst < TOL, (scoring, worst)
