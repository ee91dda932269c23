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


# ---- the learner with its copy of the teacher's output layer: hidden == dense (float32) ----------------------
@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    import socket

    import torch.distributed as dist

    root = tmp_path_factory.mktemp("hidden-pair")
    build_llama_dir(root / "teacher", VOCAB, seed=5, hidden=64)
    build_llama_dir(root / "student", VOCAB, seed=6, hidden=64, tied=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        init = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    owned = not dist.is_initialized()  # a group an in-process vLLM engine made is not ours to destroy
    yield root, init
    if owned and dist.is_initialized():
        dist.destroy_process_group()


def _worker(pair, hidden: bool, lr: float = 0.0, chunk: int = 4):
    from common.config import LearnerConfig, ObjectiveConfig
    from learner.worker import LearnerWorker

    root, init = pair
    cfg = LearnerConfig(lr=max(lr, 1e-9), grad_clip=None, logit_chunk_tokens=chunk)
    teacher_dir = str(root / "teacher") if hidden else None
    w = LearnerWorker(str(root / "student"), cfg, ObjectiveConfig(), VOCAB, 0, 1, init, seed=0, teacher_dir=teacher_dir)
    for group in w.optimizer.param_groups:
        group["lr"] = lr
    return w


def _scored(pair, transport: str, seed: int = 0):
    root, _ = pair
    teacher = Teacher(str(root / "teacher"), VOCAB, EOS, batch_size=3, chunk_tokens=5, transport=transport)
    rollouts = _rollouts(VOCAB, seed)
    g = torch.Generator().manual_seed(seed + 100)
    rollouts.old_logprobs = [(-torch.rand(len(r), generator=g) * 3 - 0.5).tolist() for r in rollouts.response_ids]
    _, shard = teacher.score(rollouts)
    return shard


def _grads(w) -> dict:
    return {n: p.grad.detach().clone() for n, p in w.model.named_parameters() if p.grad is not None}


def _assert_rel(got: dict, want: dict, tol: float = 1e-6) -> None:
    assert got.keys() == want.keys() and len(want) > 5
    for name in want:
        scale = want[name].abs().max().item()
        assert (got[name] - want[name]).abs().max().item() <= tol * max(scale, 1e-12), name


def test_minillm_step_hidden_equals_dense(pair):
    dense, hidden = _scored(pair, "dense"), _scored(pair, "hidden")
    assert torch.equal(dense.teacher_token_logprobs, hidden.teacher_token_logprobs)  # rewards: the same inputs
    pt = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(9))
    wd = _worker(pair, hidden=False)
    md, gd = wd.minillm_step(dense, 0.2, pt), _grads(wd)
    wh = _worker(pair, hidden=True)
    mh, gh = wh.minillm_step(hidden, 0.2, pt), _grads(wh)
    _assert_rel(gh, gd)
    for key in ("loss", "loss_single", "loss_long", "loss_pt", "kl_sum", "rho_sum", "rho_min", "rho_max", "tokens"):
        assert mh[key] == pytest.approx(md[key], rel=1e-6, abs=1e-9), key
    assert hidden.teacher_bytes * 1.4 < dense.teacher_bytes  # d = 64 + 0 vs V = 96 floats a token here
    kl_d, kl_h = wd.reverse_kl(dense), wh.reverse_kl(hidden)  # the in-run evaluation's reverse KL
    assert kl_h[0] == pytest.approx(kl_d[0], rel=1e-6) and kl_h[1:] == kl_d[1:]


def test_kd_step_hidden_equals_dense(pair):
    from common.data import LMBatch

    root, _ = pair
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (4, 10), generator=g)
    batch = LMBatch(ids, torch.ones_like(ids), (torch.rand(4, 9, generator=g) > 0.4).float())
    targets = {
        t: Teacher(str(root / "teacher"), VOCAB, EOS, batch_size=3, chunk_tokens=5, transport=t).score_lm(batch)
        for t in ("dense", "hidden")
    }
    assert isinstance(targets["hidden"], TeacherHidden)
    wd = _worker(pair, hidden=False)
    md, gd = wd.kd_step(batch, targets["dense"]), _grads(wd)
    wh = _worker(pair, hidden=True)
    mh, gh = wh.kd_step(batch, targets["hidden"]), _grads(wh)
    _assert_rel(gh, gd)
    for key in ("loss", "kd_sum", "nll_sum", "tokens"):
        assert mh[key] == pytest.approx(md[key], rel=1e-6), key


def test_several_minillm_steps_hidden_equal_dense(pair):
    """Four updates with a real learning rate on the same sampled batches: every loss equal (float32)."""
    shards = {t: [_scored(pair, t, seed) for seed in range(4)] for t in ("dense", "hidden")}
    losses = {}
    for transport in ("dense", "hidden"):
        w = _worker(pair, hidden=transport == "hidden", lr=1e-2)
        losses[transport] = [w.minillm_step(s, 0.2)["loss"] for s in shards[transport]]
    assert losses["hidden"] == pytest.approx(losses["dense"], rel=1e-6)
    assert len(set(losses["dense"])) == 4  # the weights moved between the steps
