"""The run folder in durable storage (storage.path): resolved config, metrics.jsonl (one JSON object per line),
summary.json; and the driver's local scratch (output_dir): wandb's offline files.

On a local filesystem (a disk or a shared mount) metrics.jsonl is appended and flushed record by record in storage.
An object store has no append: the driver keeps it in its scratch and uploads it whole (one atomic PUT) at every
training-state checkpoint (before the checkpoint lands, so the length it records is durable) and at the end.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common import storage
from common.config import DistillConfig, dump_config


class RunStopped(RuntimeError):
    """The run cannot go on (e.g. learner.max_bad_steps non-finite updates in a row); the message says why."""


def prepare_run_dir(path: str | os.PathLike[str], resume: bool = False) -> str:
    """Create the run folder in storage (a local path or a URL; returned canonical). A previous run there is moved
    aside (never deleted or overwritten; on an object store a move is a copy), unless this run resumes it (`resume`:
    it writes on into the same folder)."""
    url = storage.canonical(path)
    if not resume and storage.listdir(url):
        aside = f"{url}.{time.strftime('%Y%m%d-%H%M%S')}"
        storage.move(url, aside)
        print(f"[run] an earlier run in {url} was moved to {aside}", flush=True)
    storage.makedirs(storage.join(url, "checkpoints"))
    return url


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; null marks it
    return value


class RunLogger:
    def __init__(self, run_dir: str | os.PathLike[str], cfg: DistillConfig, scratch: Path | None = None):
        """`run_dir`: the run's folder in storage; `scratch`: the driver's local folder (default: run_dir, which
        must then be local)."""
        self.run_dir = storage.canonical(run_dir)
        self.scratch = scratch if scratch is not None else Path(self.run_dir)
        self.scratch.mkdir(parents=True, exist_ok=True)
        storage.write_text(storage.join(self.run_dir, "config.yaml"), dump_config(cfg))
        self._metrics_url = storage.join(self.run_dir, "metrics.jsonl")
        self._upload = not storage.is_local(self.run_dir)
        local = Path(self._metrics_url) if not self._upload else self.scratch / "metrics.jsonl"
        if self._upload:  # continue what storage holds (a resumed run's, cut back to its checkpoint), else empty
            local.write_bytes(storage.read_bytes(self._metrics_url) if storage.exists(self._metrics_url) else b"")
        self._metrics = local.open("a", encoding="utf-8")
        self._t0 = time.time()
        self._cfg = cfg
        self._wandb = None
        if cfg.logging.wandb_mode != "disabled":
            try:
                import wandb

                os.environ.setdefault("WANDB_SILENT", "true")
                self._wandb = wandb.init(
                    project=cfg.logging.wandb_project,
                    dir=str(self.scratch),
                    mode=cfg.logging.wandb_mode,
                    config=cfg.model_dump(mode="json"),
                    name=storage.name(self.run_dir),
                )
            except Exception as exc:  # noqa: BLE001 - logging must never stop training
                print(f"[run] wandb disabled: {exc}", flush=True)

    def log(self, record: dict[str, Any]) -> None:
        record = {k: _clean(v) for k, v in record.items()}
        record.setdefault("time", round(time.time() - self._t0, 3))
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        self._export(record)
        if self._wandb is not None:
            step = record.get("global_step")
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, int | float)}, step=step)

    def _export(self, record: dict[str, Any]) -> None:
        """The record's progress, faults and validation results as the driver's Ray metrics (Prometheus/Grafana)."""
        try:
            import ray

            if not ray.is_initialized():
                return
            from actors import telemetry

            total = self._cfg.learner.minillm_steps if record.get("phase") == "minillm" else self._cfg.learner.sft_steps
            telemetry.record_run(record, total)
        except Exception:  # noqa: BLE001 - metrics must never stop training
            pass

    def metrics_bytes(self) -> int:
        """metrics.jsonl's length so far (a checkpoint records it: a resumed run continues from there)."""
        return self._metrics.tell()

    def sync(self) -> None:
        """metrics.jsonl into storage as it is now (an object store's; a local one is always up to date)."""
        if self._upload:
            self._metrics.flush()
            storage.write_bytes(self._metrics_url, Path(self._metrics.name).read_bytes())

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        storage.write_text(storage.join(self.run_dir, name), json.dumps(data, indent=2))

    def close(self) -> None:
        self.sync()
        self._metrics.close()
        if self._wandb is not None:
            self._wandb.finish()


def copy_checkpoint(src: str, dst: str) -> None:
    """An HF folder (a local input or one in storage) copied into storage: never a moment without a complete dst."""
    storage.copy_dir(src, dst)


def driver_rss_mb() -> float:
    """The driver's resident memory (it must stay flat: tensors never come through the driver)."""
    import psutil

    return round(psutil.Process().memory_info().rss / 2**20, 1)


class Sections:
    """Named wall-time sections of a loop; `pop()` hands back `<name>_seconds` and starts over."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0

    def pop(self) -> dict[str, float]:
        out = {f"{k}_seconds": round(v, 4) for k, v in self.seconds.items()}
        self.seconds.clear()
        return out


def minillm_update_record(
    step: int,
    global_step: int,
    inner: int,
    m: dict[str, float],
    info: Any,
    taken: list,
    version: int,
    lag: int,
    failures: int,
) -> dict[str, Any]:
    """metrics.jsonl's record of MiniLLM update `step` (the `inner`-th of its collection): the update's statistics,
    its collection's rollouts (`info`, a merged BatchInfo), the queue and weight versions, the batches consumed."""
    return {
        "phase": "minillm",
        "global_step": global_step,
        "step": step,
        "inner_step": inner,
        **m,
        **info.as_dict(),
        "learner_tokens_per_s": m["tokens"] / max(m["step_seconds"], 1e-9),
        "queue_depth": taken[-1].depth,
        "dropped_stale": taken[-1].dropped_stale,
        "weight_version": version,
        "rollout_version": info.weight_version,
        "version_lag": lag,
        "batch_ids": [t.info.batch_id for t in taken],
        "failures": failures,
    }


def print_minillm_progress(record: dict[str, Any], steps: int, progress: str) -> None:
    """One MiniLLM update's line; `progress` is the elapsed/rate/time-left tail (common.progress)."""
    r = record
    print(
        f"[minillm] step {r['step']}/{steps} loss {r['loss']:.3f} (single {r['loss_single']:.3f} "
        f"long {r['loss_long']:.3f} pt {r['loss_pt']:.3f}) rKL {r['reverse_kl']:.3f} "
        f"len {r['mean_response_tokens']:.1f} rho [{r['rho_min']:.2f}, {r['rho_max']:.2f}] "
        f"clip {r['clip_fraction']:.2f} lag {r['version_lag']} {progress}",
        flush=True,
    )
