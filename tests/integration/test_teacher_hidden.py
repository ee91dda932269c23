"""teacher.transport=hidden: the teacher actor's hidden states and the learner's copy of its output layer give the
dense transport's log-probs (float32), soft-capped heads included; heads that cannot be reproduced are refused.
Plain Teacher objects (no Ray): the actor class is a plain class made remote at construction."""

import json

import pytest
import torch
import transformers

from actors.teacher import Teacher
from common.logprobs import TeacherHidden
from common.models import ModelError
from common.rollout import Rollouts
from common.teacher_head import OutputTransform, TeacherHead, check_head_matches, expand_teacher, output_transform
from tests.toy_models import build_llama_dir

pytestmark = pytest.mark.integration

VOCAB, EOS = 96, 2


def _rollouts(vocab: int, seed: int = 0) -> Rollouts:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in (3, 7, 4, 5)]
    responses = [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in (9, 2, 6, 0)]
    return Rollouts(prompts, responses, [[-1.0] * len(r) for r in responses], [[0] * len(r) for r in responses], 0)


@pytest.mark.parametrize("tied", [False, True])
def test_hidden_expands_to_dense(tmp_path, tied):
    build_llama_dir(tmp_path / "t", VOCAB, seed=3, tied=tied)
    rollouts = _rollouts(VOCAB)
    kw = dict(batch_size=3, chunk_tokens=4)  # several sub-batches and chunks
    _, *dense = Teacher(str(tmp_path / "t"), VOCAB, EOS, transport="dense", **kw).score(rollouts, num_shards=2)
    _, *hidden = Teacher(str(tmp_path / "t"), VOCAB, EOS, transport="hidden", **kw).score(rollouts, num_shards=2)
    head = TeacherHead.from_folder(tmp_path / "t", VOCAB, torch.float32)
    for d, h in zip(dense, hidden, strict=True):
        assert isinstance(h.teacher, TeacherHidden) and h.teacher.hidden.shape == (d.num_tokens, 64)
        assert torch.equal(d.teacher_token_logprobs, h.teacher_token_logprobs)  # exact, whatever the transport
        got = torch.cat([expand_teacher(h.teacher[i : i + 5], head) for i in range(0, d.num_tokens, 5)])
        torch.testing.assert_close(got, d.teacher, rtol=1e-6, atol=1e-6)
        assert h.teacher_bytes == d.num_tokens * 64 * 4 and d.teacher_bytes == d.num_tokens * VOCAB * 4


def test_score_lm_and_lm_nll_hidden(tmp_path):
    from common.data import LMBatch

    build_llama_dir(tmp_path / "t", VOCAB, seed=4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (5, 9), generator=g)
    mask = (torch.rand(5, 8, generator=g) > 0.3).float()
    batch = LMBatch(ids, torch.ones_like(ids), mask)
    dense_t = Teacher(str(tmp_path / "t"), VOCAB, EOS, batch_size=2, chunk_tokens=3, transport="dense")
    hidden_t = Teacher(str(tmp_path / "t"), VOCAB, EOS, batch_size=2, chunk_tokens=3, transport="hidden")
    dense, hidden = dense_t.score_lm(batch), hidden_t.score_lm(batch)
    head = TeacherHead.from_folder(tmp_path / "t", VOCAB, torch.float32)
    torch.testing.assert_close(expand_teacher(hidden, head), dense, rtol=1e-6, atol=1e-6)
    targets = ids[:, 1:][mask > 0]
    want = -dense.gather(-1, targets.unsqueeze(-1)).sum().item()
    assert hidden_t.lm_nll(batch) == pytest.approx((want, float(targets.numel())), rel=1e-6)


def test_softcapped_head_applied_exactly(tmp_path):
    """A Gemma-2-shaped teacher (final_logit_softcapping): dense and hidden both apply the cap, equal to HF's."""
    cfg = transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, final_logit_softcapping=3.0, max_position_embeddings=64,
        eos_token_id=EOS, pad_token_id=EOS, bos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)  # logits well past the cap, so capping matters
    model.save_pretrained(str(tmp_path / "g"))
    head = TeacherHead.from_folder(tmp_path / "g", VOCAB, torch.float32)
    assert head.transform == OutputTransform(1.0, 3.0)
    assert check_head_matches(model, head) < 1e-5
    uncapped = TeacherHead(head.weight, None, OutputTransform(), VOCAB)
    with pytest.raises(ModelError, match="use dense"):
        check_head_matches(model, uncapped)
    rollouts = _rollouts(VOCAB, seed=2)
    _, d = Teacher(str(tmp_path / "g"), VOCAB, EOS, transport="dense").score(rollouts)
    _, h = Teacher(str(tmp_path / "g"), VOCAB, EOS, transport="hidden").score(rollouts)
    torch.testing.assert_close(expand_teacher(h.teacher, head), d.teacher, rtol=1e-6, atol=1e-6)


def test_output_transforms_from_config():
    assert output_transform({"model_type": "llama"}).identity
    assert output_transform({"model_type": "cohere", "logit_scale": 0.0625}) == OutputTransform(0.0625)
    assert output_transform({"model_type": "granite", "logits_scaling": 8.0}) == OutputTransform(0.125)
    gemma = {"model_type": "gemma3", "text_config": {"final_logit_softcapping": 30.0}}
    assert output_transform(gemma) == OutputTransform(1.0, 30.0)
    with pytest.raises(ModelError, match="minicpm"):
        output_transform({"model_type": "minicpm"})
    with pytest.raises(ModelError, match="logit_scale"):
        output_transform(json.loads('{"logit_scale": -1}'))
