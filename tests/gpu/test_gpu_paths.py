"""The GPU paths, run for real where a CUDA GPU is present (skipped elsewhere): the FSDP learner on NCCL against
the same update on CPU/gloo, and the collective weight push from GPU tensors (NCCL between GPUs, gloo to a CPU
sampler). Plain processes, no Ray or vLLM: these check the torch.distributed side that the actors wrap."""

import socket

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

VOCAB, EOS = 64, 2


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_update(backend: str, student_dir: str, out: str) -> None:
    """Spawned: a 1-worker learner on `backend` (nccl: cuda, gloo: cpu); one MiniLLM and one SFT step."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from common.config import LearnerConfig, ObjectiveConfig
    from common.data import collate_prompt_response
    from learner.worker import LearnerWorker
    from tests.toy_models import random_rollout_batch, to_shards

    cfg = LearnerConfig(lr=1e-2, grad_clip=None, backend=backend)
    worker = LearnerWorker(student_dir, cfg, ObjectiveConfig(), VOCAB, 0, 1, f"tcp://127.0.0.1:{_port()}")
    assert worker.device.type == ("cuda" if backend == "nccl" else "cpu")
    packed, teacher, pt = random_rollout_batch(VOCAB, EOS)
    m = worker.minillm_step(to_shards(packed, teacher)[0], 0.2, pt)
    m_sft = worker.sft_step(collate_prompt_response([([1, 5, 9, 4], [7, 8, 2]), ([3, 6], [11, 12, 13, 2])], EOS))
    state = {k: v.detach().float().cpu() for k, v in worker.full_state_dict().items()}
    torch.save({"state": state, "loss": m["loss"], "sft_loss": m_sft["loss"]}, out)
    worker.close()


def test_fsdp_learner_on_nccl_matches_cpu_gloo(tmp_path):
    from tests.toy_models import build_llama_dir

    build_llama_dir(tmp_path / "student", VOCAB, seed=0)
    ctx = mp.get_context("spawn")
    for backend in ("nccl", "gloo"):
        p = ctx.Process(target=_one_update, args=(backend, str(tmp_path / "student"), str(tmp_path / backend)))
        p.start()
        p.join(timeout=300)
        assert p.exitcode == 0, backend
    gpu, cpu = torch.load(tmp_path / "nccl"), torch.load(tmp_path / "gloo")
    worst = max((gpu["state"][k] - cpu["state"][k]).abs().max().item() for k in cpu["state"])
    print(
        f"GPU/NCCL vs CPU/gloo after one MiniLLM + one SFT step: max |param diff| {worst:.2e}, "
        f"loss {gpu['loss']:.6f} vs {cpu['loss']:.6f}"
    )
    assert gpu["loss"] == pytest.approx(cpu["loss"], rel=1e-4, abs=1e-5)
    assert worst < 1e-4


def _three_small_steps(backend: str, dtype: str, student_dir: str, out: str) -> None:
    """Spawned: 3 MiniLLM steps at lr 5e-6 (the paper's Phase 2 lr) with `dtype` compute and fp32 master weights."""
    torch.backends.cuda.matmul.allow_tf32 = False
    from common.config import LearnerConfig, ObjectiveConfig
    from learner.worker import LearnerWorker
    from tests.toy_models import random_rollout_batch, to_shards

    cfg = LearnerConfig(lr=5e-6, grad_clip=None, backend=backend)
    worker = LearnerWorker(student_dir, cfg, ObjectiveConfig(), VOCAB, 0, 1, f"tcp://127.0.0.1:{_port()}", dtype=dtype)
    start = {k: v.detach().float().cpu().clone() for k, v in worker.full_state_dict().items()}
    for step in range(3):
        packed, teacher, pt = random_rollout_batch(VOCAB, EOS, seed=step)
        worker.minillm_step(to_shards(packed, teacher)[0], 0.2, pt)
    state = {k: v.detach().float().cpu() for k, v in worker.full_state_dict().items()}
    torch.save({"start": start, "state": state}, out)
    worker.close()


def test_mixed_precision_learner_on_cuda_matches_cpu_fp32(tmp_path):
    """bf16 compute with fp32 master weights on CUDA (NCCL) against the fp32 learner on CPU (gloo): after 3 steps at
    lr 5e-6 every weight moved, and the update points where the fp32 one does (bf16 noise aside)."""
    from tests.toy_models import build_llama_dir

    build_llama_dir(tmp_path / "student", VOCAB, seed=0)
    ctx = mp.get_context("spawn")
    for backend, dtype in (("nccl", "bfloat16"), ("gloo", "float32")):
        out = str(tmp_path / f"{backend}-{dtype}")
        p = ctx.Process(target=_three_small_steps, args=(backend, dtype, str(tmp_path / "student"), out))
        p.start()
        p.join(timeout=300)
        assert p.exitcode == 0, backend
    gpu, cpu = torch.load(tmp_path / "nccl-bfloat16"), torch.load(tmp_path / "gloo-float32")
    keys = list(cpu["state"])
    d_gpu = torch.cat([(gpu["state"][k] - gpu["start"][k]).flatten() for k in keys])
    d_cpu = torch.cat([(cpu["state"][k] - cpu["start"][k]).flatten() for k in keys])
    moved = ((d_gpu != 0) & (d_cpu != 0)).sum().item() / max((d_cpu != 0).sum().item(), 1)
    cos = torch.nn.functional.cosine_similarity(d_gpu, d_cpu, dim=0).item()
    print(
        f"CUDA bf16+fp32 master vs CPU fp32, 3 steps at lr 5e-6: {moved:.4f} of the weights fp32 moved also moved; "
        f"update cosine {cos:.4f}; max |update diff| {(d_gpu - d_cpu).abs().max().item():.2e} "
        f"(fp32 update max {d_cpu.abs().max().item():.2e})"
    )
    assert moved >= 0.99 and cos > 0.9


def _state(device: str) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [
        ("w", torch.randn(300, 70, generator=g).to(device)),
        ("b", torch.randn(70, generator=g).to(device)),
        ("h", torch.randn(5, 3, generator=g).half().to(device)),
    ]


def _push_peer(rank: int, world: int, port: int, backend: str, devices: list[str], queue) -> None:
    from common.weight_sync import WeightGroup, WeightReceiver, WeightSender

    torch.cuda.set_device(0 if devices[rank] == "cpu" else int(devices[rank].split(":")[1]))
    group = WeightGroup("127.0.0.1", port, rank, world, backend, timeout_s=120)
    if rank == 0:
        WeightSender(group).send(_state(devices[0]), version=1)
    else:
        version, named = WeightReceiver(group).receive()
        queue.put((rank, version, str(named[0][1].device), [(n, t.cpu()) for n, t in named]))
    group.close()


def _run_push(backend: str, devices: list[str]) -> list:
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _port()
    procs = [
        ctx.Process(target=_push_peer, args=(r, len(devices), port, backend, devices, queue))
        for r in range(len(devices))
    ]
    for p in procs:
        p.start()
    got = [queue.get(timeout=180) for _ in devices[1:]]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return got


def test_weight_push_from_gpu_learner_to_cpu_sampler_over_gloo():
    ((rank, version, device, named),) = _run_push("gloo", ["cuda:0", "cpu"])
    assert version == 1 and device == "cpu"
    for (n, a), (m, b) in zip(_state("cpu"), named, strict=True):
        assert n == m and torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank")
def test_weight_push_gpu_to_gpu_over_nccl():
    ((rank, version, device, named),) = _run_push("nccl", ["cuda:0", "cuda:1"])
    assert version == 1 and device == "cuda:1"
    for (n, a), (m, b) in zip(_state("cpu"), named, strict=True):
        assert n == m and torch.equal(a, b)


def test_nccl_weight_group_builds_and_sends_on_one_gpu():
    """World size 1 (a single GPU cannot hold two NCCL ranks): the NCCL group, header and bucket broadcasts run."""
    from common.weight_sync import WeightGroup, WeightSender

    group = WeightGroup("127.0.0.1", _port(), 0, 1, "nccl", timeout_s=60)
    sender = WeightSender(group)
    sender.send(_state("cuda:0"), version=1, background=True)
    sender.wait()
    assert sender.last_version == 1
    group.close()
