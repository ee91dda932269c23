"""The driver fails fast with a clear message (exit code 2, no traceback) on bad input."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]


def _main(*args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-m", "learner.main", f"output_dir={tmp_path / 'run'}", *args],
        cwd=ROOT,
        env={**env, "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_impossible_resource_request(tiny_models, tmp_path):
    proc = _main("cluster.learner_gpus=1", tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "impossible resource request" in proc.stderr and "GPUs requested" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.train=/nonexistent/train.jsonl", "data file not found: /nonexistent/train.jsonl"),
        ("learner.lrr=1", "learner.lrr: unknown key"),
        ("models.source=local", "needs both models.teacher and models.student"),
    ],
)
def test_bad_config_or_data(override, message, tmp_path, tiny_models):
    proc = _main(override, tmp_path=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_vocabulary_mismatch(tiny_models, tmp_path):
    from common.models import build_llama, save_hf, small_llama_config
    from common.tiny import train_tokenizer

    other = train_tokenizer(["entirely different corpus words zebra"] * 10, 300)
    cfg = small_llama_config(len(other), 64, 1, 2, 64, 128, other.eos_token_id, other.eos_token_id)
    save_hf(build_llama(cfg, 0), other, tmp_path / "alien")
    proc = _main(
        "models.source=local",
        f"models.teacher={tiny_models.teacher}",
        f"models.student={tmp_path / 'alien'}",
        f"models.tokenizer={tiny_models.tokenizer}",
        tmp_path=tmp_path,
    )
    assert proc.returncode == 2 and "vocabulary mismatch" in proc.stderr, proc.stderr[-2000:]
