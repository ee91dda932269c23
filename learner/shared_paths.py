"""On a cluster of several nodes, the run's folder and the model folders must be the same on every node.

Learner ranks write into `storage.path` and every actor loads its model by path, on whatever node Ray placed it. A
folder on the driver's disk alone (the default `output_dir`, the tiny default's `~/.cache`, a model folder copied to
one machine) would fail there, late and deep in an actor. So, right after Ray starts, the driver writes a probe
file into the nearest existing folder of `storage.path` and asks one task on every other node whether it sees the
probe and the model folders' `config.json` with the same size; what a node does not see stops the run with one
line. A single-node cluster, and a storage URL (`s3://`, `gs://`, ...), need no check.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from common.config import ConfigError, DistillConfig
from common.preflight import Assets

PROBE_TIMEOUT_S = 180.0


def _sees(files: dict[str, tuple[str, int]]) -> list[str]:
    """On one node: the fields whose file is missing or has another size here."""
    missing = []
    for field, (path, size) in files.items():
        try:
            if os.path.getsize(path) != size:
                missing.append(field)
        except OSError:
            missing.append(field)
    return missing


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _model_files(cfg: DistillConfig, assets: Assets) -> dict[str, str]:
    """The models' config.json (or tokenizer file) by the field a user changes to fix a folder only one node has."""
    if cfg.models.source == "tiny":  # one built folder holds all three
        folders = [("models.tiny.cache_dir", assets.teacher_dir)]
    else:
        folders = [
            ("models.teacher", assets.teacher_dir),
            ("models.student", assets.student_dir),
            ("models.tokenizer", assets.tokenizer_dir),
        ]
    files = {}
    for field, folder in folders:
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            candidate = Path(folder) / name
            if candidate.is_file():  # a local folder on the driver (a Hub id or a URL is no path here)
                files[field] = str(candidate)
                break
    return files


def check_shared_paths(cfg: DistillConfig, store: str, assets: Assets) -> None:
    """Refuse, with one line, a local `store` or model folder that another alive node of the cluster cannot see."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from common import storage

    here = ray.get_runtime_context().get_node_id()
    others = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
    if not others:
        return
    files = {field: (path, os.path.getsize(path)) for field, path in _model_files(cfg, assets).items()}
    probe: Path | None = None
    if storage.is_local(store):
        probe = _nearest_existing(Path(store)) / f".minillm-visible-{uuid.uuid4().hex}"
        probe.write_text(probe.name)
        files["storage.path"] = (str(probe), probe.stat().st_size)
    if not files:
        return
    sees = ray.remote(num_cpus=0, max_retries=0)(_sees)
    try:
        refs = [
            sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(files)
            for n in others
        ]
        answers = ray.get(refs, timeout=PROBE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError as exc:
        raise ConfigError(
            f"cluster: a node did not answer the shared-folder check within {PROBE_TIMEOUT_S:.0f} s"
        ) from exc
    finally:
        if probe is not None:
            probe.unlink(missing_ok=True)
    for node, missing in zip(others, answers, strict=True):
        if not missing:
            continue
        field = missing[0]
        where = store if field == "storage.path" else str(Path(files[field][0]).parent)
        fix = (
            "use a bucket URL (s3://, gs://) or a folder every node mounts at the same path"
            if field == "storage.path"
            else "put the models where every node reads them (a shared mount, or baked into the image)"
        )
        if field == "models.tiny.cache_dir":
            fix = (
                "set models.tiny.cache_dir to a folder every node mounts, or use models.source=local with shared models"
            )
        raise ConfigError(
            f"{field}: {where} is on this node only (node {node.get('NodeManagerAddress')} of a {len(others) + 1}-node "
            f"cluster does not see it): {fix}"
        )
