"""On a cluster of two nodes, a storage.path only the driver's node sees is refused with one line; one both see
passes. The second node is a real Ray worker node started in a mount namespace of its own (`unshare -m`) with an
empty tmpfs over the driver's folder: it is the same machine, but that folder is node-local to the driver."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.integration.test_job_submission import _free_port, _stop_head

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
PROBE = """
import sys
import ray
from common.config import ConfigError, load_config
from common.preflight import Assets
from learner.shared_paths import check_shared_paths

cfg = load_config(None, [])
ray.init(address=sys.argv[1])
for store, models in zip(sys.argv[2::2], sys.argv[3::2]):
    try:
        check_shared_paths(cfg, store, Assets(teacher_dir=models, student_dir=models, tokenizer_dir=models))
        print("RESULT ok", flush=True)
    except ConfigError as exc:
        print("RESULT refused:", exc, flush=True)
"""


def _can_unshare() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot make a mount namespace here: {probe.stderr.strip()[:200]}"
    return None


@pytest.fixture(scope="module")
def two_nodes():
    why = _can_unshare()
    if why:
        pytest.skip(f"a node that does not see the driver's folder: {why}")
    base = Path(tempfile.mkdtemp(prefix="shp", dir="/tmp"))
    hidden, shared, home = base / "driver-only", base / "shared", base / "home"
    for d in (hidden, shared, home):
        d.mkdir()
    # what the check reads of a model folder: its config.json, on every node or on the driver's only
    for models in (shared / "teacher", hidden / "teacher"):
        models.mkdir()
        (models / "config.json").write_text('{"model_type": "llama"}')
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"HOME": str(home), "RAY_AUTH_MODE": "token", "PYTHONPATH": str(ROOT)})
    gcs, dash, agent, client, worker_agent = (_free_port() for _ in range(5))
    head_temp, worker_temp = base / "rh", base / "rw"
    ray = shutil.which("ray")
    try:
        subprocess.run([ray, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
        _check(
            [ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--num-cpus", "0"]
            + ["--dashboard-port", str(dash), "--dashboard-agent-listen-port", str(agent)]
            + ["--ray-client-server-port", str(client), "--temp-dir", str(head_temp), "--disable-usage-stats"],
            env,
        )
        worker = (
            f"mount -t tmpfs none {hidden} && exec {ray} start --address 127.0.0.1:{gcs} --node-ip-address 127.0.0.1"
            f" --num-cpus 1 --dashboard-agent-listen-port {worker_agent} --temp-dir {worker_temp} --disable-usage-stats"
        )
        _check(["unshare", "-m", "sh", "-c", worker], env)
        yield {"env": env, "gcs": f"127.0.0.1:{gcs}", "hidden": hidden, "shared": shared}
    finally:
        _stop_head(head_temp, gcs)
        _stop_head(worker_temp, gcs)
        shutil.rmtree(base, ignore_errors=True)


def _check(cmd: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{cmd[:3]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def answers(two_nodes):
    """One driver asks the three questions (storage.path, model folder): each test reads its answer."""
    hidden, shared = two_nodes["hidden"], two_nodes["shared"]
    cases = {
        "driver-only storage": (hidden / "run", shared / "teacher"),
        "shared": (shared / "run", shared / "teacher"),
        "driver-only models": (shared / "run", hidden / "teacher"),
    }
    args = [str(p) for pair in cases.values() for p in pair]
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, two_nodes["gcs"], *args],
        cwd=ROOT,
        env=two_nodes["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert len(lines) == len(cases), proc.stdout[-2000:] + proc.stderr[-3000:]
    return dict(zip(cases, lines, strict=True))


def test_node_local_storage_is_refused_on_two_nodes(two_nodes, answers):
    result = answers["driver-only storage"]
    assert result.startswith("RESULT refused: storage.path: "), result
    assert "is on this node only" in result and "2-node cluster" in result and "\n" not in result
    assert not any(p.name.startswith(".minillm-visible") for p in two_nodes["hidden"].iterdir())  # probe removed


def test_a_folder_every_node_sees_passes(answers):
    assert answers["shared"] == "RESULT ok"


def test_a_model_folder_only_the_driver_has_is_refused(two_nodes, answers):
    result = answers["driver-only models"]
    assert result.startswith("RESULT refused: models.tiny.cache_dir: "), result  # configs/tiny.yaml: source tiny
    assert str(two_nodes["hidden"] / "teacher") in result
