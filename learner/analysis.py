"""The paper's analysis measures, computed in-process with torch (no Ray): per-position exact KLs between a
student q and a teacher p along given responses, and the LM loss of references (test-set LM loss, B.4).

Every KL here is Rao-Blackwellised: at each position of a response the exact KL over the whole (shared)
vocabulary is taken, so its sum over a response sampled from q is an unbiased, low-variance estimate of the
sequence-level KL[q || p]; over a response sampled from p, of KL[p || q]."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from common.data import collate_prompt_response
from common.logprobs import vocab_log_softmax
from learner.objectives import reverse_kl_per_token, word_kd_token_losses


@dataclass(frozen=True)
class PositionKLs:
    reverse: list[list[float]]  # KL[q(.|y<t) || p(.|y<t)] for each response position
    forward: list[list[float]]  # KL[p(.|y<t) || q(.|y<t)]

    @staticmethod
    def _means(rows: list[list[float]]) -> tuple[float, float]:
        tokens = sum(len(r) for r in rows)
        total = sum(sum(r) for r in rows)
        return total / max(len(rows), 1), total / max(tokens, 1)

    def reverse_means(self) -> tuple[float, float]:
        """(per response, per token)"""
        return self._means(self.reverse)

    def forward_means(self) -> tuple[float, float]:
        return self._means(self.forward)


def _response_logprobs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
    return vocab_log_softmax(logits, vocab_size)


@torch.no_grad()
def position_kls(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    prompts: Sequence[list[int]],
    responses: Sequence[list[int]],
    vocab_size: int,
    pad_id: int,
    batch_size: int = 8,
) -> PositionKLs:
    """Exact reverse and forward KL at every response position (the distributions that predict each
    response token), in the order given. Empty responses give empty rows."""
    reverse: list[list[float]] = []
    forward: list[list[float]] = []
    for start in range(0, len(prompts), batch_size):
        pairs = list(zip(prompts[start : start + batch_size], responses[start : start + batch_size], strict=True))
        batch = collate_prompt_response(pairs, pad_id)
        logq = _response_logprobs(student, batch.input_ids, batch.attention_mask, vocab_size)
        logp = _response_logprobs(teacher, batch.input_ids, batch.attention_mask, vocab_size)
        mask = batch.loss_mask  # already aligned with the predicting positions
        rev = reverse_kl_per_token(logq, logp, mask)  # log-probs are logits too: log_softmax is idempotent
        fwd = word_kd_token_losses(logq, logp, mask)
        mask = mask.bool()
        for i in range(len(pairs)):
            reverse.append(rev[i][mask[i]].tolist())
            forward.append(fwd[i][mask[i]].tolist())
    return PositionKLs(reverse, forward)


@torch.no_grad()
def lm_loss(
    model: torch.nn.Module,
    prompts: Sequence[list[int]],
    responses: Sequence[list[int]],
    vocab_size: int,
    pad_id: int,
    batch_size: int = 8,
) -> float:
    """Mean token NLL (nats) of the responses given their prompts: the test-set LM loss of Appendix B.4."""
    total, tokens = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        pairs = list(zip(prompts[start : start + batch_size], responses[start : start + batch_size], strict=True))
        batch = collate_prompt_response(pairs, pad_id)
        logq = _response_logprobs(model, batch.input_ids, batch.attention_mask, vocab_size)
        targets = batch.input_ids[:, 1:]
        mask = batch.loss_mask.bool()  # already aligned with the predicting positions
        nll = -logq.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        total += float(nll[mask].sum())
        tokens += int(mask.sum())
    return total / max(tokens, 1)
