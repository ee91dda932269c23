"""The FSDP learner through Ray: 2 workers == 1 worker on the same batch; weight push to a sampler."""

import pytest
import ray
import torch

from actors.remote import make_sampler
from actors.sampler import SamplerSpec
from common.config import LearnerConfig, ObjectiveConfig
from learner.group import LearnerGroup
from tests.learner_steps import minillm_step, wait_push
from tests.toy_models import build_llama_dir, random_rollout_batch, to_shards

pytestmark = pytest.mark.integration

VOCAB, EOS = 64, 2


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("learner") / "student"
    build_llama_dir(path, VOCAB, seed=0)
    return path


def _student_logprobs(sampler, seq: list[int], start: int) -> list[float]:
    """A sampler actor's student engine's log-prob of seq[start:] (checks what a weight push loaded)."""
    return ray.get(sampler.__ray_call__.remote(lambda s: s.student.prompt_logprobs([seq], [start])))[0]


def _batch(seed: int = 0):
    return random_rollout_batch(VOCAB, EOS, seed)


def _state_after_one_step(n_workers: int, student_dir, lcfg, ocfg):
    group = LearnerGroup(n_workers, 0.5, 0.0, str(student_dir), lcfg, ocfg, VOCAB, "float32", seed=0)
    try:
        packed, teacher, pt = _batch()
        metrics = minillm_step(group, to_shards(packed, teacher, n_workers), 0.2, pt)
        state = ray.get(group.state_dict_ref())
    finally:
        group.shutdown()
    return metrics, state


def test_two_workers_equal_one_worker(ray_session, student_dir):
    lcfg = LearnerConfig(lr=1e-2, grad_clip=None)
    ocfg = ObjectiveConfig()
    m1, s1 = _state_after_one_step(1, student_dir, lcfg, ocfg)
    m2, s2 = _state_after_one_step(2, student_dir, lcfg, ocfg)
    assert s1.keys() == s2.keys()
    init = build_llama_dir(student_dir.parent / "again", VOCAB, seed=0).state_dict()
    moved = max((s1[k] - init[k]).abs().max().item() for k in s1)
    assert moved > 1e-4  # the step changed the weights
    worst = max((s1[k] - s2[k]).abs().max().item() for k in s1)
    print(f"max |param(1 worker) - param(2 workers)| = {worst:.2e} (step moved weights by up to {moved:.2e})")
    # Adam's first step is about lr * sign(g): float noise in near-zero gradients shows up at ~1e-5 of a 1e-2 step.
    # The ranks hold 6 and 9 response tokens, so a per-rank mean would weigh the tokens differently.
    assert worst < 5e-5
    assert m1["tokens"] == m2["tokens"] == 15
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5, abs=1e-6)


def test_weight_push_reaches_sampler(ray_session, student_dir, tmp_path):
    lcfg = LearnerConfig(lr=5e-2, grad_clip=None)
    group = LearnerGroup(1, 0.5, 0.0, str(student_dir), lcfg, ObjectiveConfig(), VOCAB, "float32", seed=0)
    sampler = make_sampler(
        SamplerSpec(
            student_dir=str(student_dir),
            teacher_dir=None,
            eos_token_id=EOS,
            max_new_tokens=4,
            kv_cache_mb=32,
            max_model_len=64,
        ),
        0,
        1.0,
        0.0,
    )
    try:
        seq, start = [1, 5, 9, 11, 20, 33, 4, 7], 3
        before = _student_logprobs(sampler, seq, start)
        packed, teacher, pt = _batch()
        minillm_step(group, to_shards(packed, teacher), 0.2, pt)
        state = group.state_dict_ref()
        assert ray.get(sampler.load_weights.remote(state, 1)) == 1
        after = _student_logprobs(sampler, seq, start)
        group.save(str(tmp_path / "ckpt"), None)
        from common.models import load_model

        model = load_model(tmp_path / "ckpt")
        with torch.no_grad():
            ref = model(torch.tensor([seq])).logits[0].log_softmax(-1)
        learner_lp = [ref[j - 1, seq[j]].item() for j in range(start, len(seq))]
        diff = max(abs(a - b) for a, b in zip(after, learner_lp, strict=True))
        print(f"sampler vs learner log-probs after push: max diff {diff:.2e}")
        assert diff < 1e-4
        assert max(abs(a - b) for a, b in zip(after, before, strict=True)) > 1e-3
        assert ray.get(sampler.get_version.remote()) == 1

        # a failed push is an error, and the version does not move
        bad = {k: v for k, v in ray.get(state).items()}
        bad["model.embed_tokens.weight"] = torch.zeros(3, 3)
        with pytest.raises(ray.exceptions.RayTaskError, match="shape"):
            ray.get(sampler.load_weights.remote(bad, 2))
        assert ray.get(sampler.get_version.remote()) == 1
        with pytest.raises(ray.exceptions.RayTaskError, match="version"):
            ray.get(sampler.load_weights.remote(state, 1))
    finally:
        group.shutdown()
        ray.kill(sampler)


def test_collective_weight_push_reaches_every_sampler(ray_session, student_dir, tmp_path):
    """learner.weight_sync=collective: rank 0 broadcasts one packed push over gloo (NCCL on GPUs) to two
    samplers; each then scores exactly like the learner, at the new version."""
    lcfg = LearnerConfig(lr=5e-2, grad_clip=None)
    group = LearnerGroup(1, 0.25, 0.0, str(student_dir), lcfg, ObjectiveConfig(), VOCAB, "float32", seed=0)
    spec = SamplerSpec(
        student_dir=str(student_dir),
        teacher_dir=None,
        eos_token_id=EOS,
        max_new_tokens=4,
        kv_cache_mb=32,
        max_model_len=64,
    )
    samplers = [make_sampler(spec, i, 0.5, 0.0) for i in range(2)]
    try:
        host, port = group.weight_sync_address()
        ray.get(
            [
                group.init_weight_sender(host, port, 3, "gloo"),
                *[s.join_weight_group.remote(host, port, 1 + i, 3, "gloo") for i, s in enumerate(samplers)],
            ]
        )
        seq, start = [1, 5, 9, 11, 20, 33, 4, 7], 3
        before = _student_logprobs(samplers[0], seq, start)
        for version in (1, 2):
            packed, teacher, pt = _batch(version)
            minillm_step(group, to_shards(packed, teacher), 0.2, pt)
            refs = [s.receive_weights.remote() for s in samplers]
            group.push_weights(version)
            assert ray.get(refs) == [version, version]
        wait_push(group)
        group.save(str(tmp_path / "ckpt"), None)
        from common.models import load_model

        with torch.no_grad():
            ref = load_model(tmp_path / "ckpt")(torch.tensor([seq])).logits[0].log_softmax(-1)
        learner_lp = [ref[j - 1, seq[j]].item() for j in range(start, len(seq))]
        for s in samplers:
            after = _student_logprobs(s, seq, start)
            diff = max(abs(a - b) for a, b in zip(after, learner_lp, strict=True))
            print(f"sampler vs learner log-probs after collective push: max diff {diff:.2e}")
            assert diff < 1e-4
            assert max(abs(a - b) for a, b in zip(after, before, strict=True)) > 1e-3
    finally:
        group.shutdown()
        for s in samplers:
            ray.kill(s)


def test_reload_of_a_tied_embedding_student(ray_session, tmp_path):
    """SmolLM2-style students tie the head to the embeddings; the SFT phase reloads its best checkpoint right after
    an evaluation."""
    tied = tmp_path / "tied"
    build_llama_dir(tied, VOCAB, seed=3, tied=True)
    group = LearnerGroup(
        1, 0.5, 0.0, str(tied), LearnerConfig(lr=5e-2, grad_clip=None), ObjectiveConfig(), VOCAB, "float32", seed=0
    )
    try:
        before = ray.get(group.state_dict_ref())
        packed, teacher, pt = _batch()
        minillm_step(group, to_shards(packed, teacher), 0.2, pt)
        assert max((ray.get(group.state_dict_ref())[k] - before[k]).abs().max().item() for k in before) > 1e-4
        group.reverse_kl(to_shards(packed, teacher))  # an evaluation forward leaves the root unsharded
        group.load_state(str(tied))
        after = ray.get(group.state_dict_ref())
        assert all(torch.equal(after[k], before[k]) for k in before)
    finally:
        group.shutdown()
