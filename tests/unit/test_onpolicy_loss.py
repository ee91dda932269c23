"""The learner's objective dispatch: each kind's terms are its pure function's, lmops' whitening statistics cover
the micro-batch up to its longest response."""

import pytest
import torch

from common.config import load_config
from learner.objectives import minillm_token_losses
from learner.objectives_lmops import lmops_returns, lmops_rewards, whiten_local
from learner.objectives_onpolicy import divergence_token_losses, sampled_rkl_token_losses
from learner.onpolicy_loss import sequence_signal, teacher_transport, token_terms, update_weights
from tests.unit.test_objectives import _random_case


def _flat(seed=3):
    logits, teacher, tokens, mask, old = _random_case(seed=seed, spans=((0, 5), (0, 3), (0, 1), (0, 4)))
    teacher_y = teacher.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return logits, teacher, tokens, mask, old, teacher_y


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["objective.variant=lmops"],
        ["objective.kind=gkd", "objective.beta=0.3"],
        ["objective.kind=skew_kl"],
        ["objective.kind=skew_rkl", "objective.skew=0.2"],
        ["objective.kind=sampled_rkl", "objective.discount=0.5"],
    ],
)
def test_terms_are_the_kinds_functions(overrides):
    obj = load_config(overrides=overrides).objective
    logits, teacher, tokens, mask, old, teacher_y = _flat()
    signal = sequence_signal(obj, teacher_y, old, mask)
    where = mask > 0
    flat_signal = signal[where] if signal is not None else None
    terms = token_terms(
        obj, logits[where], teacher[where], tokens[where], old[where], teacher_y[where], flat_signal, 0.2
    )
    if obj.kind == "minillm" and obj.variant == "paper":
        ref = minillm_token_losses(logits, teacher, tokens, mask, old, 0.2, obj.clip_eps)
        torch.testing.assert_close(terms.single, ref.single[where])
        torch.testing.assert_close(terms.long, ref.long[where])
    elif obj.kind == "sampled_rkl":
        ref = sampled_rkl_token_losses(logits, tokens, mask, old, teacher_y, 0.2, obj.clip_eps, 0.5)
        torch.testing.assert_close(terms.long, ref.loss[where])
        assert (terms.single == 0).all()
    elif obj.kind != "minillm":
        param = obj.beta if obj.kind == "gkd" else obj.skew
        ref = divergence_token_losses(
            obj.kind,
            param,
            logits,
            teacher,
            mask,
            tokens=tokens,
            old_logprobs=old,
            teacher_token_logprobs=teacher_y,
            alpha=0.2,
        )
        torch.testing.assert_close(terms.single, ref.loss[where])
        assert (terms.long == 0).all()
    assert terms.kl.shape == terms.rho.shape == (int(mask.sum()),)


def test_lmops_signal_is_whitened_over_the_micro_batch_up_to_its_longest_response():
    obj = load_config(overrides=["objective.variant=lmops"]).objective
    logits, teacher, tokens, mask, old, teacher_y = _flat()
    wide_mask = torch.cat([mask, torch.zeros(4, 3, dtype=mask.dtype)], 1)  # the collection is wider
    wide = lambda x: torch.cat([x, torch.zeros(4, 3, dtype=x.dtype)], 1)  # noqa: E731
    signal = sequence_signal(obj, wide(teacher_y), wide(old), wide_mask)
    expected = whiten_local(lmops_returns(lmops_rewards(teacher_y, old, mask), mask, 0.95)) * mask
    torch.testing.assert_close(signal[:, :5], expected)
    assert (signal[:, 5:] == 0).all()


def test_weights_and_transport():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    paper = load_config().objective
    lmops = load_config(overrides=["objective.variant=lmops"]).objective
    torch.testing.assert_close(update_weights(paper, mask, (6.0, 4.0), 2), mask / 6)
    torch.testing.assert_close(update_weights(lmops, mask, (6.0, 4.0), 2), mask / 3 / 2)
    sampled = load_config(overrides=["objective.kind=sampled_rkl"]).objective
    assert teacher_transport(sampled, "dense") == "token" and teacher_transport(paper, "topk") == "topk"
