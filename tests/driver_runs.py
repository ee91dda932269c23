"""`python -m learner.main` in a subprocess, as a user runs it (local Ray, offline wandb), and its metrics.jsonl."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_driver(out: Path, *overrides: str, timeout: int = 900) -> tuple[list[dict], str]:
    """Run the driver into `out`; assert it succeeded; return its metrics records and its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private local Ray, not a caller's cluster
    proc = subprocess.run(
        [sys.executable, "-m", "learner.main", f"output_dir={out}", *overrides],
        cwd=ROOT,
        env={**env, "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], proc.stdout
