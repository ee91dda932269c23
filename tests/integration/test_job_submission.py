"""The way the user runs it: a local Ray head on loopback, `ray job submit --working-dir . -- python -m
learner.main`, the dashboard's actor list, and the custom metrics on Ray's metrics endpoint."""

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from common.engine_env import IN_PROCESS_ENGINE

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
SHORT = [
    "learner.sft_steps=10",
    "learner.sft_eval_every=5",
    "learner.minillm_steps=6",
    "eval.every_steps=3",
    "eval.num_prompts=16",
    "eval.kl_prompts=16",
    "data.max_valid_examples=120",
]
METRICS = [
    "ray_distill_sampled_tokens_total",
    "ray_distill_teacher_scored_tokens_total",
    "ray_distill_learner_step_seconds",
    "ray_distill_queue_depth",
    "ray_distill_weight_version_lag",
    "ray_distill_loss_single",
    "ray_distill_reverse_kl",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job_state(cli_output: str) -> str:
    """`ray job status` prints e.g. "Job 'raysubmit_x' succeeded" (coloured): return the state word."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", cli_output).lower()
    for state in ("succeeded", "failed", "stopped", "running", "pending"):
        if re.search(rf"job '[^']+' (is currently |was |has )?{state}", text):
            return state
    return "unknown"


def _ray(*args, env, timeout=300, check=True):
    proc = subprocess.run(
        [shutil.which("ray"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"ray {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    temp = tmp_path_factory.mktemp("rayhead")
    # every port this head binds by default is its own, so that it can run beside a user's Ray on the machine
    gcs, dash, metrics, agent, client = (_free_port() for _ in range(5))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_AUTH_MODE": "token", **IN_PROCESS_ENGINE, "WANDB_MODE": "offline"})
    _ray(
        "start",
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(gcs),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash),
        "--metrics-export-port",
        str(metrics),
        "--dashboard-agent-listen-port",
        str(agent),
        "--ray-client-server-port",
        str(client),
        "--num-cpus",
        "2",
        "--temp-dir",
        str(temp),
        "--disable-usage-stats",
        env=env,
    )
    try:
        yield {
            "env": env,
            "dashboard": f"http://127.0.0.1:{dash}",
            "metrics": f"http://127.0.0.1:{metrics}/metrics",
            "gcs": f"127.0.0.1:{gcs}",
        }
    finally:
        _stop_head(temp, gcs)


def _stop_head(temp: Path, gcs_port: int) -> None:
    """Stop this test's head and nothing else: `ray stop --force` would kill every Ray process on the machine,
    including a user's own cluster or job running beside the tests. The head's services name its temp dir (or,
    for the client proxy, its GCS address) on their command line; workers and the job's driver descend from them."""
    marks = (str(temp), f"127.0.0.1:{gcs_port}")
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if any(mark in line for mark in marks):
            roots.append(proc)
    procs = {p.pid: p for p in roots}
    for root in roots:
        try:
            procs.update({c.pid: c for c in root.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    for proc in procs.values():
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=15)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def test_job_submit_runs_the_service_and_exports_metrics(head, tmp_path, tiny_models):
    out = tmp_path / "job-run"
    env = head["env"]
    submit = _ray(
        "job",
        "submit",
        "--address",
        head["dashboard"],
        "--working-dir",
        ".",
        "--no-wait",
        "--",
        "python",
        "-m",
        "learner.main",
        "--config",
        "configs/tiny.yaml",
        f"output_dir={out}",
        *SHORT,
        env=env,
    )
    job_id = next(line.split("'")[1] for line in submit.stdout.splitlines() if "submitted successfully" in line)
    seen_metrics: set[str] = set()
    actors: set[str] = set()
    deadline = time.time() + 600
    status = ""
    while time.time() < deadline:
        status = _job_state(_ray("job", "status", "--address", head["dashboard"], job_id, env=env).stdout)
        try:
            with urllib.request.urlopen(head["metrics"], timeout=10) as resp:
                text = resp.read().decode()
            seen_metrics |= {m for m in METRICS if m in text}
        except OSError:
            pass
        listing = _ray(
            "list", "actors", "--address", head["gcs"], "--format", "json", "--limit", "100", env=env, check=False
        )
        if listing.returncode == 0 and listing.stdout.strip().startswith("["):
            actors |= {a.get("name") for a in json.loads(listing.stdout) if a.get("name")}
        if status in ("succeeded", "failed", "stopped"):
            break
        time.sleep(5)
    logs = _ray("job", "logs", "--address", head["dashboard"], job_id, env=env).stdout
    assert status == "succeeded", f"job did not succeed: {status}\n{logs[-4000:]}"
    assert "[minillm] step 6/6" in logs and "[sft] step 10/10" in logs  # progress shows in the job's logs
    assert (out / "summary.json").is_file() and (out / "checkpoints" / "final" / "config.json").is_file()
    assert {"sampler-0", "teacher-0", "learner-0", "rollout-queue"} <= actors, actors
    # metrics may be scraped after the job ends (export interval): poll a little longer
    for _ in range(12):
        if set(METRICS) <= seen_metrics:
            break
        time.sleep(5)
        with urllib.request.urlopen(head["metrics"], timeout=10) as resp:
            text = resp.read().decode()
        seen_metrics |= {m for m in METRICS if m in text}
    assert set(METRICS) <= seen_metrics, set(METRICS) - seen_metrics
