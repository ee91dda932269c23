"""The driver refuses bad input before anything starts: `python -m learner.main` in a subprocess exits 2 with one
`error:` line, no traceback, no Ray, and no run folder. A subset of the table in tests/bad_inputs.py (every row is
checked in-process by tests/unit/test_preflight.py; each run here costs seconds of imports), plus the one check
that needs the cluster."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bad_inputs import CASES, build_setup

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
# one case of each kind through the driver process (each costs its imports); tests/unit/test_preflight.py runs all
THROUGH_THE_DRIVER = ["unknown-key", "train-not-utf8", "vocabulary-mismatch"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_setup(tmp_path_factory.mktemp("setup"))


def _main(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-m", "learner.main", *args],
        cwd=ROOT,
        env={**env, "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
        timeout=600,
    )


def _refused(proc: subprocess.CompletedProcess, message: str, out: Path) -> None:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))  # no checkpoints, no metrics, no folder


@pytest.mark.parametrize("case", THROUGH_THE_DRIVER)
def test_refused_before_ray_starts(case, setup, tmp_path):
    (tmp_path / "case").mkdir()
    extra, message = CASES[case][1](setup, tmp_path / "case")
    proc = _main(*setup.argv(tmp_path / "run"), *extra)
    _refused(proc, message, tmp_path / "run")
    assert "[ray]" not in proc.stdout  # refused before connect_ray


def test_default_config_with_a_missing_train_file(tmp_path):
    """The embedded default (tiny models) checks its data too."""
    proc = _main(f"output_dir={tmp_path / 'run'}", f"data.train={tmp_path / 'none.jsonl'}")
    _refused(proc, f"data.train: data file not found: {tmp_path / 'none.jsonl'}", tmp_path / "run")


def test_impossible_resource_request(setup, tmp_path):
    """Needs the cluster's resources: checked after Ray starts, still before any actor or the run folder."""
    proc = _main(*setup.argv(tmp_path / "run"), "cluster.learner_gpus=1")
    _refused(proc, "impossible resource request (cluster.*_cpus/_gpus x actor counts): ", tmp_path / "run")
    assert "GPUs requested" in proc.stderr
