"""The learner's chunked head: losses, metrics and gradients do not depend on learner.logit_chunk_tokens, dense or
top-k. One in-process worker (FSDP2 over a gloo group of one), no Ray."""

import socket

import pytest
import torch
import torch.distributed as dist

from common.config import LearnerConfig, ObjectiveConfig
from learner.worker import LearnerWorker
from tests.toy_models import build_llama_dir, random_rollout_batch, to_shards

pytestmark = pytest.mark.integration

VOCAB, EOS = 64, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def worker_factory(tmp_path_factory):
    student = tmp_path_factory.mktemp("chunked") / "student"
    build_llama_dir(student, VOCAB, seed=0)
    init = f"tcp://127.0.0.1:{_free_port()}"
    made: list[LearnerWorker] = []
    owned = not dist.is_initialized()  # a group an in-process vLLM engine made is not ours to destroy

    def make(chunk: int) -> LearnerWorker:
        cfg = LearnerConfig(lr=1e-3, grad_clip=None, logit_chunk_tokens=chunk)
        w = LearnerWorker(str(student), cfg, ObjectiveConfig(), VOCAB, 0, 1, init, seed=0)
        made.append(w)
        return w

    yield make
    if owned and dist.is_initialized():
        dist.destroy_process_group()


def assert_same_grads(got: dict, want: dict) -> None:
    """Equal to 1e-6 of each gradient's scale (float32: only the summation order differs between chunkings)."""
    assert got.keys() == want.keys() and len(want) > 5
    for name in want:
        scale = max(1.0, want[name].abs().max().item())
        worst = (got[name] - want[name]).abs().max().item()
        assert worst <= 1e-6 * scale, f"{name}: max diff {worst:.2e} at gradient scale {scale:.2e}"


def _grads_after(worker: LearnerWorker, fn) -> tuple[dict, dict]:
    """Run one step through `fn` with the optimiser stepping a zero lr, return metrics and gradients."""
    for group in worker.optimizer.param_groups:
        group["lr"] = 0.0
    metrics = fn(worker)
    grads = {n: p.grad.detach().clone() for n, p in worker.model.named_parameters() if p.grad is not None}
    return metrics, grads


@pytest.mark.parametrize("top_k", [None, 5])
def test_chunked_minillm_step_equals_unchunked(worker_factory, top_k):
    packed, teacher, pt = random_rollout_batch(VOCAB, EOS, seed=1)
    (shard,) = to_shards(packed, teacher, 1, top_k)

    def step(w):
        return w.minillm_step(shard, 0.2, pt)

    m_whole, g_whole = _grads_after(worker_factory(10_000), step)
    m_chunk, g_chunk = _grads_after(worker_factory(3), step)  # 15 response tokens, 32 PT tokens: many chunks
    assert_same_grads(g_chunk, g_whole)
    for key in ("loss", "loss_single", "loss_long", "loss_pt", "kl_sum", "rho_sum", "rho_min", "rho_max", "tokens"):
        assert m_chunk[key] == pytest.approx(m_whole[key], rel=1e-6, abs=1e-6), key


def test_chunked_sft_and_kd_equal_unchunked(worker_factory):
    from common.data import collate_prompt_response

    g = torch.Generator().manual_seed(4)
    pairs = [
        (torch.randint(3, VOCAB, (n,), generator=g).tolist(), torch.randint(3, VOCAB, (m,), generator=g).tolist())
        for n, m in ((3, 5), (6, 2), (2, 7))
    ]
    batch = collate_prompt_response(pairs, EOS)
    n_targets = int(batch.loss_mask.sum())
    kd_teacher = torch.log_softmax(torch.randn(n_targets, VOCAB, generator=g) * 2, -1)
    for fn in (lambda w: w.sft_step(batch), lambda w: w.kd_step(batch, kd_teacher)):
        m_whole, g_whole = _grads_after(worker_factory(10_000), fn)
        m_chunk, g_chunk = _grads_after(worker_factory(4), fn)
        assert_same_grads(g_chunk, g_whole)
        assert m_chunk["loss"] == pytest.approx(m_whole["loss"], rel=1e-6)
