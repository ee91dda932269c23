"""The run report of runs that are not the happy path: an SFT-only run (no MiniLLM curves) and a MiniLLM run whose
driver was SIGKILLed mid-phase (no summary.json, possibly a cut last line). Each gets report.html referencing every
plot written, each plot non-empty. (The finished MiniLLM run's report: tests/integration/test_monitoring.py.)"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.driver_runs import run_driver

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["eval.num_prompts=16", "eval.kl_prompts=16", "data.max_valid_examples=120"]


def _check_report(run: Path) -> set[str]:
    page = (run / "report.html").read_text()
    referenced = set(re.findall(r"src='plots/([^']+)'", page))
    written = {p.name for p in (run / "plots").glob("*.png")}
    assert referenced == written and written
    assert all((run / "plots" / f).stat().st_size > 1000 for f in written)
    return written


def test_sft_only_run_gets_a_report(tmp_path, tiny_models):
    out = tmp_path / "sft"
    _, stdout = run_driver(out, "method=sft", "learner.sft_steps=6", "learner.sft_eval_every=3", *SMALL)
    assert f"[report] {out}/report.html" in stdout
    written = _check_report(out)
    assert {"losses.png", "validation.png"} <= written
    assert not written & {"rho_clip.png", "pipeline.png", "busy.png"}  # no MiniLLM phase, no MiniLLM curves


def test_report_of_a_run_killed_mid_phase(tmp_path, tiny_models):
    out = tmp_path / "killed"
    args = [
        sys.executable,
        "-m",
        "learner.main",
        f"output_dir={out}",
        "learner.sft_steps=4",
        "learner.sft_eval_every=4",
    ]
    args += ["learner.minillm_steps=40", "logging.progress_every=1", "eval.every_steps=20", *SMALL]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        env={**env, "WANDB_MODE": "offline"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines, t0 = [], time.time()
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "[minillm] step 2/40" in line:
            children = psutil.Process(proc.pid).children(recursive=True)
            os.kill(proc.pid, signal.SIGKILL)  # a real kill: no clean-up, no summary, no report
            break
        assert time.time() - t0 < 900, "the run never reached MiniLLM's second step"
    else:
        pytest.fail("the driver ended before the kill point:\n" + "".join(lines[-40:]))
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(children, timeout=30)
    for p in alive:  # its local Ray, started by this test's run
        p.kill()
    assert not (out / "summary.json").exists() and not (out / "report.html").exists()
    cli = subprocess.run(
        [sys.executable, "-m", "learner.report", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    written = _check_report(out)
    assert {"losses.png", "reverse_kl.png", "pipeline.png"} <= written
    assert "did not finish" in (out / "report.html").read_text()
