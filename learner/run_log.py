"""The run folder: resolved config, metrics.jsonl (one JSON object per line, flushed), wandb (offline)."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from common.config import DistillConfig, dump_config


class RunStopped(RuntimeError):
    """The run cannot go on (e.g. learner.max_bad_steps non-finite updates in a row); the message says why."""


def prepare_run_dir(path: Path, resume: bool = False) -> Path:
    """Create the run folder. A previous run there is moved aside (never deleted or overwritten), unless this run
    resumes it (`resume`: it writes on into the same folder)."""
    if not resume and path.exists() and any(path.iterdir()):
        aside = path.with_name(f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}")
        path.rename(aside)
        print(f"[run] an earlier run in {path} was moved to {aside}", flush=True)
    path.mkdir(parents=True, exist_ok=True)
    (path / "checkpoints").mkdir(exist_ok=True)
    return path


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; null marks it
    return value


class RunLogger:
    def __init__(self, run_dir: Path, cfg: DistillConfig):
        self.run_dir = run_dir
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        self._metrics = (run_dir / "metrics.jsonl").open("a", encoding="utf-8")
        self._t0 = time.time()
        self._wandb = None
        if cfg.logging.wandb_mode != "disabled":
            try:
                import wandb

                os.environ.setdefault("WANDB_SILENT", "true")
                self._wandb = wandb.init(
                    project=cfg.logging.wandb_project,
                    dir=str(run_dir),
                    mode=cfg.logging.wandb_mode,
                    config=cfg.model_dump(mode="json"),
                    name=run_dir.name,
                )
            except Exception as exc:  # noqa: BLE001 - logging must never stop training
                print(f"[run] wandb disabled: {exc}", flush=True)

    def log(self, record: dict[str, Any]) -> None:
        record = {k: _clean(v) for k, v in record.items()}
        record.setdefault("time", round(time.time() - self._t0, 3))
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self._wandb is not None:
            step = record.get("global_step")
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, int | float)}, step=step)

    def metrics_bytes(self) -> int:
        """metrics.jsonl's length so far (a checkpoint records it: a resumed run continues from there)."""
        return self._metrics.tell()

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        tmp = self.run_dir / f".{name}.tmp"
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.run_dir / name)

    def close(self) -> None:
        self._metrics.close()
        if self._wandb is not None:
            self._wandb.finish()


def copy_checkpoint(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    from learner.checkpoint import replace_dir

    replace_dir(tmp, dst)  # never a moment without a complete dst (or dst.old)
