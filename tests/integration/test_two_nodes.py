"""Two nodes, no shared scratch: a Ray cluster of a head (the driver, no CPUs for actors) and a worker (every actor),
on one machine, each node with its own scratch folder (Ray temp dir and TMPDIR). A short run (SFT then MiniLLM) with
storage.path a file:// folder standing for a bucket completes; every artifact is in storage.path; neither node's
scratch holds a run artifact (so none was read from there: the driver reads only storage, the actors get weights by
push or from storage); every actor ran on the worker."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from common import storage
from learner.checkpoint import check_complete

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ("model.safetensors", ".distcp", "checkpoint.json", "metrics.jsonl", "summary.json", "config.yaml")


def _artifacts_under(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and p.name.endswith(ARTIFACTS)]


@pytest.fixture
def two_nodes():
    """(cluster, head scratch, worker scratch). Short /tmp paths: Ray's socket paths live under its temp dir."""
    from ray.cluster_utils import Cluster

    base = Path(tempfile.mkdtemp(prefix="mls2n-", dir="/tmp"))
    head, worker = base / "head", base / "worker"
    for d in (head, worker):
        d.mkdir()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "temp_dir": str(head / "ray"), "include_dashboard": False},
    )
    cluster.add_node(num_cpus=3, temp_dir=str(worker / "ray"), env_vars={"TMPDIR": str(worker)})
    try:
        yield cluster, head, worker
    finally:
        cluster.shutdown()
        shutil.rmtree(base, ignore_errors=True)


def test_two_nodes_no_shared_scratch(two_nodes, tiny_models, tmp_path):
    cluster, head, worker = two_nodes
    bucket = tmp_path / "bucket"  # a shared folder standing for s3://bucket: only its URL is given
    run_url = f"file://{bucket}/run"
    args = [
        sys.executable,
        "-m",
        "learner.main",
        f"output_dir={head / 'run'}",  # the driver's scratch, on the head
        f"storage.path={run_url}",
        "learner.sft_steps=2",
        "learner.sft_eval_every=2",  # sft_best/ saved, then loaded back by the learner (from storage)
        "learner.minillm_steps=2",
        "learner.batch_size=4",
        "learner.sft_batch_size=4",
        "learner.pretrain_batch_size=2",
        "sampler.max_new_tokens=8",
        "eval.max_new_tokens=8",
        "eval.num_prompts=4",
        "eval.kl_prompts=4",
        "data.max_valid_examples=20",
        "data.max_train_examples=100",
        "checkpoint.every_steps=2",
        "cluster.replay_cpus=0.5",  # the replay queue asks for a CPU too: only the worker has any
        "cluster.torch_threads=1",
        "logging.wandb_mode=disabled",
    ]
    env = {
        **os.environ,
        "RAY_ADDRESS": cluster.address,
        "TMPDIR": str(head),  # the driver's own temporary files stay on the head
        "WANDB_MODE": "disabled",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    t0 = time.time()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-3000:])
    print(f"[two nodes] run took {time.time() - t0:.0f}s")
    assert proc.returncode == 0, proc.stderr[-4000:]

    run = bucket / "run"
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        assert (run / name).is_file(), name
    for name in ("sft_best", "best", "final"):
        assert (run / "checkpoints" / name / "model.safetensors").is_file(), name
    states = sorted((run / "checkpoints" / "state").glob("step-*"))
    assert states and all(check_complete(s) is None for s in states)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["sft_checkpoint"] == storage.join(str(run), "checkpoints", "sft_best")
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["phase"] == "minillm"] == [1, 2]

    # nothing of the run in either node's scratch: nothing could have been read from another node's
    assert _artifacts_under(head) == [] and _artifacts_under(worker) == []

    # where the actors ran, asked in a fresh process: this one may hold another Ray session (earlier tests')
    probe = (
        "import json, sys, ray\n"
        "ray.init(address=sys.argv[1])\n"
        "worker = next(n['NodeID'] for n in ray.nodes() if n['Resources'].get('CPU', 0) > 0)\n"
        "actors = ray._private.state.state.actor_table(None).values()  # the finished run's actors, dead now\n"
        "print(json.dumps([worker, {a['ActorClassName']: a['Address']['NodeID'] for a in actors}]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, cluster.address], capture_output=True, text=True, timeout=300, check=True
    )
    worker_id, placed = json.loads(out.stdout.strip().splitlines()[-1])
    for cls in ("LearnerActor", "SamplerActor", "TeacherActor", "RolloutQueueActor"):
        assert any(c.endswith(cls) for c in placed), (cls, sorted(placed))
    assert set(placed.values()) == {worker_id}, placed
