"""The teacher's payload count (common/rollout.py wire_bytes): what the teacher sends per batch, in every wire format,
is the bytes of the tensors that travel, counted from their shapes and dtypes by hand here."""

import torch

from common.logprobs import TeacherHidden, TopKLogprobs
from common.rollout import wire_bytes


def test_dense_topk_hidden_and_token_payloads():
    n, vocab, k, d = 7, 50, 4, 16
    assert wire_bytes(torch.zeros(n, vocab)) == n * vocab * 4  # float32 log-probs
    assert wire_bytes(torch.zeros(n, vocab, dtype=torch.bfloat16)) == n * vocab * 2
    top = TopKLogprobs(torch.zeros(n, k, dtype=torch.long), torch.zeros(n, k), torch.zeros(n))
    assert wire_bytes(top) == n * k * 8 + n * k * 4 + n * 4  # ids, log-probs, tail mass
    assert wire_bytes(TeacherHidden(torch.zeros(n, d, dtype=torch.bfloat16))) == n * d * 2
    assert wire_bytes(torch.zeros(n, 0)) == 0  # transport "token" (sampled_rkl): no vocabulary rows at all
