"""Full training state, saved atomically, and resume.

A checkpoint is the folder `output_dir/checkpoints/state/step-XXXXXXX/` (XXXXXXX: the run's global step):

* `__0_0.distcp`, ... and `.metadata`: the learner's model and AdamW state through `torch.distributed.checkpoint`
  (DCP), every rank writing its own FSDP2 shards (resharding on load is DCP's: any number of ranks can read it);
* `rank-R.pt`: each learner rank's counters (optimizer steps taken, which seed the PPO mini-batch shuffle; skipped
  updates) and its RNGs (torch CPU and CUDA, numpy, python: dropout draws from torch's);
* `checkpoint.json`, written LAST (temp name, fsync, rename): the driver's state (phase, step, weight version,
  best-so-far score, data-iterator positions, metrics.jsonl length, its RNGs) and the size of every other file.

A folder without `checkpoint.json`, or with a file missing or of another size than recorded (a crash mid-write, a
truncated copy), is partial: `resume=auto` skips it with a warning and takes the newest complete one.

The learner-side functions run inside the learner actors through Ray's `__ray_call__` (a function applied to the
actor's instance), so the worker and group classes need no methods of their own for this.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.config import ConfigError

METADATA = "checkpoint.json"
FORMAT = 1


class CheckpointError(ConfigError):
    """resume=PATH names something that is not a complete checkpoint (bad input: exit code 2)."""


# ===== learner side (runs inside each learner actor) ==================================================
def save_learner_state(worker: Any, path: str) -> dict[str, Any]:
    """Collective over the learner ranks: DCP-save the sharded model (and the AdamW state, once it has any) into
    `path`, and this rank's counters and RNGs into rank-R.pt. Returns the rank's counters."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    worker._reshard()
    # a fresh optimizer has no state; get_state_dict would create it with a zero-lr step (step count 1), which
    # changes AdamW's bias correction: save the model alone then, and the resumed run starts a fresh optimizer too
    has_optim = bool(worker.optimizer.state)
    if has_optim:
        model_sd, optim_sd = get_state_dict(worker.model, worker.optimizer)
        state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    else:
        state = {"model": get_model_state_dict(worker.model)}
    dcp.save(state, checkpoint_id=path)
    mine = {
        "rank": worker.rank,
        "steps": worker.steps,
        "skipped": worker.skipped,
        "has_optim": has_optim,
        "lr": worker.optimizer.param_groups[0]["lr"],
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy_rng": np.random.get_state(),
        "python_rng": random.getstate(),
    }
    target = Path(path) / f"rank-{worker.rank}.pt"
    tmp = target.with_name(target.name + ".tmp")
    torch.save(mine, tmp)
    os.replace(tmp, target)
    return {k: mine[k] for k in ("rank", "steps", "skipped", "has_optim")}


def load_learner_state(worker: Any, path: str) -> dict[str, Any]:
    """Collective: the inverse of save_learner_state. The optimizer must already be the phase's (set_lr first):
    its state and learning rate are overwritten here."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    mine = torch.load(Path(path) / f"rank-{worker.rank}.pt", weights_only=False)
    worker._reshard()
    if mine["has_optim"]:
        model_sd, optim_sd = get_state_dict(worker.model, worker.optimizer)  # templates DCP loads into, in place
        state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(worker.model, worker.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        state = {"model": get_model_state_dict(worker.model)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(worker.model, state["model"])
        worker.set_optimizer(mine["lr"])  # fresh, as it was when saved
    worker.steps, worker.skipped = mine["steps"], mine["skipped"]
    torch.set_rng_state(mine["torch_rng"])
    if mine["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(mine["cuda_rng"])
    np.random.set_state(mine["numpy_rng"])
    random.setstate(mine["python_rng"])
    return {"rank": worker.rank, "steps": worker.steps, "skipped": worker.skipped}


# ===== driver side ===================================================================================
@dataclass
class ResumePoint:
    """The driver's part of a checkpoint (checkpoint.json), plus where it was read from."""

    path: Path
    phase: str  # the phase to continue: "sft" / "kd" / "seqkd" / "minillm"
    phase_step: int  # updates of that phase done
    global_step: int
    version: int  # weight version the samplers held
    best: float | None  # the phase's best-so-far score (its own sign convention)
    bad_in_row: int
    prompt_batches: int  # batches drawn from the phase's prompt / example iterator
    pretrain_batches: int  # batches drawn from the pre-training iterator
    metrics_bytes: int  # metrics.jsonl's length at the save: a resumed run truncates to it, then appends
    sft_dir: str | None = None
    start: dict[str, float] | None = None  # MiniLLM's start / latest validation (ValidationResult fields)
    last: dict[str, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def read(path: Path) -> ResumePoint:
        meta = json.loads((path / METADATA).read_text())
        d = meta["driver"]
        return ResumePoint(path=path, **d)

    def driver_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("path")
        return d


def step_dir(root: Path, global_step: int) -> Path:
    return root / f"step-{global_step:07d}"


def check_complete(path: Path) -> str | None:
    """None when `path` is a complete checkpoint, else why not."""
    meta_file = path / METADATA
    if not meta_file.is_file():
        return f"no {METADATA} (the save did not finish)"
    try:
        meta = json.loads(meta_file.read_text())
        files = meta["files"]
    except (ValueError, KeyError, OSError) as exc:
        return f"{METADATA} unreadable ({exc})"
    if meta.get("format") != FORMAT:
        return f"format {meta.get('format')} (this code reads {FORMAT})"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} recorded"
    return None


def latest_complete(root: Path) -> Path | None:
    """The newest complete checkpoint under `root` (checkpoints/state); newer partial ones are reported."""
    if not root.is_dir():
        return None
    for path in sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True):
        why = check_complete(path)
        if why is None:
            return path
        print(f"[checkpoint] warning: skipping partial checkpoint {path}: {why}", flush=True)
    return None


def find_resume(resume: str | None, run_dir: Path) -> ResumePoint | None:
    """What `resume` names: None; "auto" -> the newest complete checkpoint in the run folder, or None; a path ->
    that checkpoint (CheckpointError when it is not a complete one)."""
    if resume is None:
        return None
    if resume == "auto":
        path = latest_complete(run_dir / "checkpoints" / "state")
        if path is None:
            print(f"[checkpoint] resume=auto: no complete checkpoint in {run_dir}, starting afresh", flush=True)
            return None
    else:
        path = Path(resume).expanduser().resolve()
        why = check_complete(path) if path.is_dir() else "not a folder"
        if why is not None:
            raise CheckpointError(f"resume: {path} is not a complete checkpoint: {why}")
    return ResumePoint.read(path)


def truncate_metrics(run_dir: Path, size: int) -> None:
    """metrics.jsonl continues from the checkpoint: records logged after it (by the run that died) go, the resumed
    run writes them again."""
    f = run_dir / "metrics.jsonl"
    if f.is_file() and f.stat().st_size > size:
        with f.open("r+b") as fh:
            fh.truncate(size)


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


class Checkpointer:
    """Writes the training state into checkpoints/state/ and keeps the newest `keep` complete checkpoints."""

    def __init__(self, run_dir: Path, every_steps: int, keep: int, config_text: str = ""):
        self.root = run_dir / "checkpoints" / "state"
        self.every, self.keep, self.config_text = every_steps, keep, config_text
        self.timings: list[dict[str, float]] = []

    def due(self, before: int, after: int, last: int | None = None) -> bool:
        """Whether a save follows the updates before+1..after of a phase: they cross a multiple of every_steps, or
        reach the phase's `last` update."""
        return self.every > 0 and (after // self.every > before // self.every or after == last)

    def launch_limit(self, step: int, steps: int, updates_per: int, batches_per: int, consumed: int) -> int:
        """How many MiniLLM batches may have been launched in all, so that none is in flight at the next save: the
        pipeline drains there, and a resumed run, which starts with nothing in flight, does what the uninterrupted
        run did (a batch in flight would have been sampled with weights the checkpoint does not hold)."""
        if self.every <= 0:
            return 1 << 62
        k, end = 0, step
        while end < steps:
            k, before, end = k + 1, end, min(steps, end + updates_per)
            if self.due(before, end, steps):
                break
        return consumed + k * batches_per

    def save(self, learner: Any, driver: ResumePoint) -> Path:
        """Collective save: every learner rank writes its shards, then checkpoint.json lands last."""
        import ray

        t0 = time.perf_counter()
        path = step_dir(self.root, driver.global_step)
        if path.exists():  # a partial one, or one a resume from an earlier checkpoint is redoing
            shutil.rmtree(path)
        path.mkdir(parents=True)
        ranks = ray.get([a.__ray_call__.remote(save_learner_state, str(path)) for a in learner.actors])
        files = {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}
        meta = {
            "format": FORMAT,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "driver": driver.driver_dict(),
            "learner": ranks,
            "files": files,
            "config": self.config_text,
        }
        _fsync_write(path / METADATA, json.dumps(meta, indent=1))
        seconds = time.perf_counter() - t0
        size = sum(files.values())
        self.timings.append({"global_step": driver.global_step, "seconds": seconds, "bytes": size})
        print(
            f"[checkpoint] step {driver.global_step} ({driver.phase} {driver.phase_step}) -> {path} "
            f"({size / 2**20:.1f} MiB, {seconds:.2f}s)",
            flush=True,
        )
        self.prune()
        return path

    def prune(self) -> None:
        """Keep the newest `keep` complete checkpoints; partial ones older than the newest complete one go too."""
        paths = sorted((p for p in self.root.glob("step-*") if p.is_dir()), reverse=True)
        kept = 0
        for p in paths:
            complete = check_complete(p) is None
            if complete and kept < self.keep:
                kept += 1
                continue
            if kept == 0:  # newer than every complete one: leave it for inspection (resume skips it)
                continue
            shutil.rmtree(p, ignore_errors=True)


def replace_dir(tmp: Path, dst: Path) -> None:
    """Put the finished folder `tmp` in place of `dst`: the old one is renamed aside first and removed last, so a
    crash leaves either the old or the new folder (or the old one as DST.old, which `recover_dir` puts back)."""
    old = dst.with_name(dst.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)
    if old.exists():
        shutil.rmtree(old)


def recover_dir(dst: Path) -> None:
    """After a crash between replace_dir's two renames: DST.old is the last complete folder."""
    old = dst.with_name(dst.name + ".old")
    if old.is_dir() and not dst.exists():
        old.rename(dst)


def response_ids(rollouts: Any) -> list[list[int]]:
    """A batch's sampled token ids (logging.sampled_ids), fetched by a zero-CPU Ray task: ints, never tensors."""
    return [list(r) for r in rollouts.response_ids]


def restore_learner(learner: Any, point: ResumePoint) -> None:
    """Every learner rank loads its state from the checkpoint (collective)."""
    import ray

    ray.get([a.__ray_call__.remote(load_learner_state, str(point.path)) for a in learner.actors])
