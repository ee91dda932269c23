"""Watching a run as a user does: `deploy/local_head.sh start` (a loopback Ray head, and a real Prometheus where the
binary is installed), one short run of the default config on it, then:
- Prometheus, configured by deploy/monitoring/prometheus.yml, found the head through Ray's service-discovery file
  and its HTTP API returns samples of the service's series;
- every query of the Grafana dashboard names series the run really exported, and every exported series is plotted;
- the run's console holds none of the library noise silenced by common/quiet.py, and its progress lines give the
  rate and time left;
- the driver wrote report.html at the end, with every plot it references."""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.ray_head import free_port, stop_head

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
SHORT = [
    "learner.sft_steps=10",
    "learner.sft_eval_every=5",
    "learner.minillm_steps=6",
    "logging.progress_every=5",
    "eval.every_steps=3",
    "eval.num_prompts=16",
    "eval.kl_prompts=16",
    "data.max_valid_examples=120",
]
# the noise of issue 29 (each silenced at its source by common/quiet.py)
NOISE = [
    "Triton is installed, but doesn't include CPU backend",
    "FutureWarning",
    "NUMA",
    "Loading weights",
    "Writing model shards",
    "Token indices sequence length is longer than the specified maximum",
]
SERIES = re.compile(r"^(ray_distill_[a-z_]+)[{ ]", re.M)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory, tiny_models):
    temp, mon, out = (tmp_path_factory.mktemp(n) for n in ("ray", "monitoring", "run"))
    gcs, dash, metrics, prom, agent, client = (free_port() for _ in range(6))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": os.urandom(16).hex(),  # this head's own token: no file in ~/.ray
            "DASHBOARD_PORT": str(dash),
            "METRICS_PORT": str(metrics),
            "PROMETHEUS_PORT": str(prom),
            "NUM_CPUS": "2",
            "RAY_TEMP_DIR": str(temp),
            "MONITORING_DIR": str(mon),
            "RAY_START_ARGS": f"--port {gcs} --dashboard-agent-listen-port {agent} --ray-client-server-port {client}",
            "WANDB_MODE": "offline",
        }
    )
    try:
        started = subprocess.run(
            ["bash", "deploy/local_head.sh", "start"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
        )
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        t0 = time.time()
        driver = subprocess.Popen(
            [sys.executable, "-m", "learner.main", f"output_dir={out}", *SHORT],
            cwd=ROOT,
            env={**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        seen: set[str] = set()
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(driver.stdout), daemon=True)
        reader.start()
        while driver.poll() is None and time.time() - t0 < 900:
            try:  # gauges of actors that ended vanish from the endpoint: collect them while the run goes on
                seen |= set(SERIES.findall(_get(f"http://127.0.0.1:{metrics}/metrics")))
            except OSError:
                pass
            time.sleep(3)
        if driver.poll() is None:
            driver.kill()
        driver.wait()
        reader.join(timeout=30)
        console = "".join(lines)
        assert driver.returncode == 0, console[-5000:]
        yield {
            "console": console,
            "seen": seen,
            "prometheus": f"http://127.0.0.1:{prom}" if shutil.which("prometheus") else None,
            "discovery": temp / "prom_metrics_service_discovery.json",
            "run": out,
            "started": started.stdout,
        }
    finally:
        subprocess.run(["bash", "deploy/local_head.sh", "stop-monitoring"], cwd=ROOT, env=env, timeout=60)
        stop_head(temp, gcs)


def _dashboard_series() -> set[str]:
    board = json.loads((ROOT / "deploy" / "monitoring" / "grafana_dashboard.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert exprs
    return {name for e in exprs for name in re.findall(r"\bray_distill_[a-z_]+", e)}


def test_grafana_dashboard_plots_the_series_the_run_exports(watched_run):
    plotted, seen = _dashboard_series(), watched_run["seen"]
    assert plotted - seen == set(), f"queries name series the run never exported: {sorted(plotted - seen)}"
    assert seen - plotted == set(), f"exported series without a panel: {sorted(seen - plotted)}"


def test_prometheus_scrapes_the_run_through_rays_discovery_file(watched_run):
    if watched_run["prometheus"] is None:
        pytest.skip("the prometheus binary is not installed (Debian: apt-get install prometheus)")
    prom = watched_run["prometheus"]
    assert "prometheus: http://127.0.0.1:" in watched_run["started"]
    targets = json.loads(_get(f"{prom}/api/v1/targets"))["data"]["activeTargets"]
    from_file = [t for t in targets if t["discoveredLabels"].get("__meta_filepath") == str(watched_run["discovery"])]
    assert from_file and any(t["health"] == "up" for t in from_file), targets
    for series in ("ray_distill_reverse_kl", "ray_distill_queue_depth"):
        query = urllib.parse.quote(f"max_over_time({series}[1h])")
        result = json.loads(_get(f"{prom}/api/v1/query?query={query}"))["data"]["result"]
        assert result, f"Prometheus holds no sample of {series}"
        assert all(float(r["value"][1]) >= 0 for r in result)


def test_console_is_the_services_lines(watched_run):
    console = watched_run["console"]
    assert [n for n in NOISE if n in console] == [], console[-6000:]
    # progress lines with the phase's rate and time left
    assert re.search(r"\[sft\] step 10/10 .*(step/s|s/step)", console), console[-3000:]
    assert re.search(r"\[minillm\] step 6/6 .*\((\d+)s, .*(step/s|s/step), 0s left\)", console), console[-3000:]


def test_driver_writes_the_report(watched_run):
    run = watched_run["run"]
    page = (run / "report.html").read_text()
    referenced = set(re.findall(r"src='plots/([^']+)'", page))
    written = {p.name for p in (run / "plots").glob("*.png")}
    assert referenced == written
    assert {"losses.png", "reverse_kl.png", "validation.png", "pipeline.png", "throughput.png"} <= written
    assert all((run / "plots" / f).stat().st_size > 1000 for f in written)
    assert f"[report] {run}/report.html" in watched_run["console"]
