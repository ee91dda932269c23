"""A clone with nothing beside it runs the embedded default: the repository alone (`git ls-files`) copied into an
empty temporary folder, then preflight and a short `python -m learner.main` there, its own code on PYTHONPATH. As on
a fresh machine, the tiny models are built from the clone's data into an empty cache (a short teacher training keeps
the test short; the shared cache of the other tests is not touched)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]


def _clone(dest: Path) -> Path:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    for name in filter(None, listed.stdout.decode().split("\0")):
        src = ROOT / name
        if src.is_file():  # a file deleted in the working tree but still listed is skipped
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def test_fresh_clone_runs_the_default(tmp_path):
    clone = _clone(tmp_path / "clone")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clone"]  # nothing beside the clone (the cache comes later)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(clone), WANDB_MODE="offline")

    # every data path of the default config is a file inside the clone (not a fallback to an installed project)
    check = (
        "from common.config import load_config, REPO_ROOT; c = load_config(); "
        "paths = [c.data.train, c.data.valid, c.data.pretrain, c.heal.contexts_from, *c.heal.text_files]; "
        "print(REPO_ROOT); [print((REPO_ROOT / p).resolve()) for p in paths]"
    )
    out = subprocess.run([sys.executable, "-c", check], cwd=clone, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    root, *paths = out.stdout.split()
    assert Path(root) == clone.resolve()
    for p in paths:
        assert Path(p).is_file() and Path(p).is_relative_to(clone.resolve()), p

    run = tmp_path / "clone" / "runs" / "short"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "learner.main",
            f"output_dir={run}",
            f"models.tiny.cache_dir={tmp_path / 'cache'}",
            "models.tiny.teacher_train_steps=10",
            "learner.sft_steps=4",
            "learner.sft_eval_every=4",
            "learner.minillm_steps=2",
            "eval.every_steps=2",
            "eval.num_prompts=4",
            "eval.kl_prompts=4",
            "eval.max_new_tokens=8",
            "sampler.max_new_tokens=8",
            "data.max_valid_examples=16",
        ],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "[minillm] step 2/2" in proc.stdout
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/final/config.json"):
        assert (run / name).is_file(), name
