"""The paper's protocol and numerics in the learner (one in-process worker, FSDP2 over a gloo group of one, no Ray):
PPO collections, micro-batch accumulation, learner-side old log-probs, bf16 compute with fp32 master weights."""

import socket

import pytest
import torch
import torch.distributed as dist

from common.config import LearnerConfig, ObjectiveConfig
from common.rollout import concat_shards
from learner.worker import LearnerWorker
from tests.toy_models import build_llama_dir, random_rollout_batch, to_shards

pytestmark = pytest.mark.integration

VOCAB, EOS = 64, 2


@pytest.fixture(scope="module")
def make_worker(tmp_path_factory):
    student = tmp_path_factory.mktemp("ppo") / "student"
    build_llama_dir(student, VOCAB, seed=0)
    # an in-process vLLM engine of an earlier module may own the default group: tearing it down here would leave
    # vLLM's world group pointing at a destroyed group, and every later engine in this process fails at start
    owned = not dist.is_initialized()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        init = f"tcp://127.0.0.1:{s.getsockname()[1]}"

    def make(
        dtype: str = "float32", lr: float = 1e-3, objective: ObjectiveConfig | None = None, **learner
    ) -> LearnerWorker:
        cfg = LearnerConfig(lr=lr, grad_clip=None, **learner)
        return LearnerWorker(str(student), cfg, objective or ObjectiveConfig(), VOCAB, 0, 1, init, dtype=dtype, seed=0)

    yield make
    if owned and dist.is_initialized():
        dist.destroy_process_group()


def _params(w: LearnerWorker) -> dict[str, torch.Tensor]:
    w._reshard()
    return {
        n: p.detach().full_tensor().float().clone() if hasattr(p, "full_tensor") else p.detach().float().clone()
        for n, p in w.model.named_parameters()
    }


def _collection(seeds=(1, 2)):
    """Two sampled batches of four rollouts with unequal response lengths, as the learner's shards."""
    return [to_shards(*random_rollout_batch(VOCAB, EOS, seed=s)[:2])[0] for s in seeds]


def test_one_epoch_one_minibatch_is_the_single_update(make_worker):
    """ppo_epochs = 1 with one mini-batch per collection is today's update on the concatenated batch."""
    shards = _collection()
    a = make_worker()
    (m_collection,) = a.minillm_collection(0.2, 1, 8, 8, [None], *shards)
    b = make_worker()
    m_single = b.minillm_step(concat_shards(shards), 0.2, None)
    pa, pb = _params(a), _params(b)
    assert max((pa[k] - pb[k]).abs().max().item() for k in pa) == 0.0
    assert m_collection["loss"] == pytest.approx(m_single["loss"], rel=1e-7)


def test_micro_batches_equal_one_batch(make_worker):
    """Gradient accumulation over micro-batches of unequal token counts equals one pass (token normalisation by the
    mini-batch's total, not each micro-batch's)."""
    shards = _collection()
    grads = []
    for micro in (8, 2):
        w = make_worker(lr=1e-9)  # the gradients are compared; the step barely moves anything
        w.minillm_collection(0.2, 1, 8, micro, [None], *shards)
        grads.append({n: p.grad.detach().clone() for n, p in w.model.named_parameters() if p.grad is not None})
    for name in grads[0]:
        scale = max(1.0, grads[0][name].abs().max().item())
        assert (grads[1][name] - grads[0][name]).abs().max().item() <= 1e-6 * scale, name


def test_ppo_epochs_start_at_rho_one_and_then_clip(make_worker):
    """old_logprobs = learner: the first update of a collection has q_theta = q_old exactly (rho = 1 at alpha = 0),
    later epochs move away and the clip acts."""
    w = make_worker(lr=2e-2, objective=ObjectiveConfig(old_logprobs="learner", alpha=0.0))
    updates = w.minillm_collection(0.0, 4, 4, 4, [None] * 8, *_collection())
    assert len(updates) == 8  # 4 epochs x 2 mini-batches
    first = updates[0]
    assert first["rho_min"] == pytest.approx(1.0, abs=1e-6) and first["rho_max"] == pytest.approx(1.0, abs=1e-6)
    assert first["clip_sum"] == 0.0
    assert first["gap_max"] > 0.0  # the toy's "sampler" log-probs are made up: the learner's own replace them
    assert sum(u["clip_sum"] for u in updates[2:]) > 0  # after the first epoch some ratios leave [0.8, 1.2]


def test_bf16_compute_with_fp32_master_weights_keeps_small_updates(make_worker):
    """At lr 5e-6 an Adam step is below bf16 resolution for most weights: fp32 master weights keep it, pure bf16
    training loses it."""
    shards = _collection()
    start = _params(make_worker())
    runs = {}
    for name, dtype, master in (
        ("fp32", "float32", "float32"),
        ("mixed", "bfloat16", "float32"),
        ("pure_bf16", "bfloat16", "compute"),
    ):
        w = make_worker(dtype=dtype, lr=5e-6, master_weights=master)
        own_start = _params(w)  # pure bf16 starts from the rounded weights
        after_one = None
        for step in range(3):
            w.minillm_step(shards[step % 2], 0.2, None)
            if step == 0:
                after_one = _params(w)
        runs[name] = (after_one, _params(w), own_start)

    def changed(name):
        after, _, own = runs[name]
        return {k: (after[k] != own[k]) for k in own}

    fp32_changed = changed("fp32")
    total = sum(int(m.sum()) for m in fp32_changed.values())

    def share(name):
        got = changed(name)
        return sum(int((got[k] & fp32_changed[k]).sum()) for k in start) / total

    print(
        f"weights changed by one step at lr 5e-6, as a share of those fp32 changes: mixed {share('mixed'):.4f}, "
        f"pure bf16 {share('pure_bf16'):.4f}"
    )
    assert share("mixed") >= 0.99
    assert share("pure_bf16") < 0.5  # the old path: most updates are rounded away

    # after 3 steps the mixed run's update points where the fp32 run's does (bf16 noise in the gradients flips the
    # sign of some tiny Adam steps); pure bf16's does not
    def update(name):
        _, after, own = runs[name]
        return torch.cat([(after[k] - own[k]).flatten() for k in own])

    ref = update("fp32")
    cos_mixed = torch.nn.functional.cosine_similarity(update("mixed"), ref, dim=0).item()
    cos_pure = torch.nn.functional.cosine_similarity(update("pure_bf16"), ref, dim=0).item()
    print(f"after 3 steps, cosine of the update with fp32's: mixed {cos_mixed:.4f}, pure bf16 {cos_pure:.4f}")
    assert cos_mixed > 0.9 and cos_pure < cos_mixed


def test_non_finite_update_is_skipped_and_counted(make_worker):
    """A poisoned batch (a NaN sampler log-prob makes the reward and the loss NaN) skips the optimizer step: the
    weights and the optimizer state stay as they were, the update says so, and the next good batch trains."""
    good, poisoned = _collection()
    poisoned.packed.old_logprobs[0, 0] = float("nan")
    w = make_worker()
    before = _params(w)
    m = w.minillm_step(poisoned, 0.2, None)
    assert m["skipped"] == 1.0 and w.skipped == 1 and w.steps == 0
    after = _params(w)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not w.optimizer.state  # AdamW never stepped: no moments from the NaN gradient
    m = w.minillm_step(good, 0.2, None)
    assert m["skipped"] == 0.0 and w.steps == 1
    assert any(not torch.equal(_params(w)[k], before[k]) for k in before)
