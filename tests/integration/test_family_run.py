"""A Qwen2.5-shaped pair with padded embedding rows (tests/family_models.py: 151,665 tokens, 152,064 teacher and
151,936 student rows, scaled down) through `python -m learner.main` with `teacher.transport=hidden`, activation
checkpointing and token micro-batches: MiniLLM end to end on CPU. No padded id is ever sampled, every update's
terms are finite, and the run writes its checkpoints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.family_models import QWEN25, build_family_pair
from tests.integration.test_family_configs import _texts

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3


def test_qwen_shaped_pair_runs_minillm_with_hidden_transport(tmp_path):
    pair = build_family_pair(QWEN25, tmp_path / "qwen", _texts())
    out = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline"}
    env.pop("RAY_ADDRESS", None)
    overrides = [
        f"output_dir={out}",
        "models.source=local",
        f"models.teacher={pair['teacher']}",
        f"models.student={pair['student']}",
        f"models.tokenizer={pair['tokenizer']}",
        f"models.sft_checkpoint={pair['student']}",  # MiniLLM only: no SFT phase
        "teacher.transport=hidden",
        "learner.activation_checkpointing=true",
        "learner.micro_batch_size=2",
        "learner.micro_batch_tokens=256",
        "learner.logit_chunk_tokens=16",  # several head chunks per micro-batch
        f"learner.minillm_steps={STEPS}",
        "learner.batch_size=4",
        "learner.pretrain_batch_size=2",
        "sampler.max_new_tokens=16",
        "data.max_train_examples=100",
        "data.max_valid_examples=16",
        "eval.at_start=false",
        "eval.every_steps=100",
        "eval.num_prompts=4",
        "eval.kl_prompts=4",
        "eval.max_new_tokens=8",
        "logging.sampled_ids=true",
        "logging.wandb_mode=disabled",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "learner.main", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["phase"] == "minillm" and "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    real = QWEN25.regular_tokens + len(QWEN25.specials)
    for r in steps:
        for key in ("loss", "loss_single", "loss_long", "reverse_kl", "grad_norm", "peak_memory_mb"):
            assert r[key] == r[key] and abs(r[key]) < float("inf"), (key, r[key])  # finite
        assert r["reverse_kl"] > 0
        ids = [t for sample in r["sampled_ids"] for row in sample for t in row]
        assert ids and max(ids) < real  # padded rows never drawn
    assert (out / "checkpoints" / "final" / "config.json").is_file()
