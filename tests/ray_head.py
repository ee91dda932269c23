"""A private `ray start --head` on loopback with free ports and its own temp dir, stopped without touching any other
Ray on the machine (its services name its temp dir or GCS address on their command line; workers and job drivers
descend from them). Used by the monitoring tests, which need the metrics endpoint and the discovery file."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Head:
    env: dict[str, str]
    temp: Path
    gcs: str
    dashboard: str
    metrics_port: int

    def discovery_file(self) -> Path:
        """Ray's Prometheus service-discovery file of this head's session."""
        return self.temp / "prom_metrics_service_discovery.json"


@contextmanager
def ray_head(temp: Path, num_cpus: int = 2) -> Iterator[Head]:
    gcs, dash, metrics, agent, client = (free_port() for _ in range(5))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # token authentication on (Ray's default for `ray start`), with this head's own token: no file in ~/.ray
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)})
    env.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "WANDB_MODE": "offline"})
    args = [
        *("start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs)),
        *("--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--metrics-export-port", str(metrics)),
        *("--dashboard-agent-listen-port", str(agent), "--ray-client-server-port", str(client)),
        *("--num-cpus", str(num_cpus), "--temp-dir", str(temp), "--disable-usage-stats"),
    ]
    try:
        proc = subprocess.run([shutil.which("ray") or "ray", *args], cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        yield Head(env, temp, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", metrics)
    finally:
        stop_head(temp, gcs)


def stop_head(temp: Path, gcs_port: int) -> None:
    marks = (str(temp), f"127.0.0.1:{gcs_port}")
    roots = [p for p in psutil.process_iter(["cmdline"]) if any(m in " ".join(p.info["cmdline"] or []) for m in marks)]
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
