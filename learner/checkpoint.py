"""Full training state, saved atomically, and resume.

A checkpoint is the folder `STORAGE/checkpoints/state/step-XXXXXXX/` (STORAGE: storage.path, a local folder or an
fsspec URL; XXXXXXX: the run's global step):

* `__0_0.distcp`, ... and `.metadata`: the learner's model and AdamW state through `torch.distributed.checkpoint`
  (DCP), every rank writing its own FSDP2 shards (resharding on load is DCP's: any number of ranks can read it);
* `rank-R.pt`: each learner rank's counters (optimizer steps taken, which seed the PPO mini-batch shuffle; skipped
  updates) and its RNGs (torch CPU and CUDA, numpy, python: dropout draws from torch's);
* `checkpoint.json`, written LAST (local: temp name, fsync, rename; object store: one PUT): the driver's state
  (phase, step, weight version, best-so-far score, data-iterator positions, metrics.jsonl length, its RNGs) and the
  size of every other file.

A folder without `checkpoint.json`, or with a file missing or of another size than recorded (a crash mid-write, a
truncated copy), is partial: `resume=auto` skips it with a warning and takes the newest complete one.

Every file is written by the process that has it (each rank its shards and rank file, the driver checkpoint.json),
straight into storage: nothing passes through a node's scratch or another node's disk.

The learner-side functions run inside the learner actors through Ray's `__ray_call__` (a function applied to the
actor's instance), so the worker and group classes need no methods of their own for this.
"""

from __future__ import annotations

import io
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common import storage
from common.config import ConfigError

METADATA = "checkpoint.json"
FORMAT = 1


class CheckpointError(ConfigError):
    """resume=PATH names something that is not a complete checkpoint (bad input: exit code 2)."""


# ===== learner side (runs inside each learner actor) ==================================================
def _writer(path: str) -> Any:
    """DCP's writer for a location of durable storage: plain files locally, fsspec for an object store."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    return FileSystemWriter(path) if storage.is_local(path) else FsspecWriter(path)


def _reader(path: str) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FileSystemReader(path) if storage.is_local(path) else FsspecReader(path)


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
    dcp.save(state, storage_writer=_writer(path))
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
    buf = io.BytesIO()
    torch.save(mine, buf)
    storage.write_bytes(storage.join(path, f"rank-{worker.rank}.pt"), buf.getvalue())
    return {k: mine[k] for k in ("rank", "steps", "skipped", "has_optim")}


def load_learner_state(worker: Any, path: str) -> dict[str, Any]:
    """Collective: the inverse of save_learner_state. The optimizer must already be the phase's (reset_optimizer first):
    its state and learning rate are overwritten here."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    mine = torch.load(io.BytesIO(storage.read_bytes(storage.join(path, f"rank-{worker.rank}.pt"))), weights_only=False)
    worker._reshard()
    if mine["has_optim"]:
        model_sd, optim_sd = get_state_dict(worker.model, worker.optimizer)  # templates DCP loads into, in place
        state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, storage_reader=_reader(path))
        set_state_dict(worker.model, worker.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        state = {"model": get_model_state_dict(worker.model)}
        dcp.load(state, storage_reader=_reader(path))
        set_model_state_dict(worker.model, state["model"])
        worker.reset_optimizer(mine["lr"])  # fresh, as it was when saved
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

    path: str  # a location in durable storage (common/storage.py)
    phase: str  # the phase to continue: "sft" / "kd" / "seqkd" / "heal" / "minillm"
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
    def read(path: str) -> ResumePoint:
        meta = json.loads(storage.read_text(storage.join(path, METADATA)))
        d = meta["driver"]
        return ResumePoint(path=path, **d)

    def driver_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("path")
        return d


def step_dir(root: str, global_step: int) -> str:
    return storage.join(root, f"step-{global_step:07d}")


def check_complete(path: str | os.PathLike[str]) -> str | None:
    """None when `path` is a complete checkpoint, else why not."""
    try:
        meta = json.loads(storage.read_text(storage.join(path, METADATA)))
    except FileNotFoundError:
        return f"no {METADATA} (the save did not finish)"
    except (ValueError, OSError) as exc:
        return f"{METADATA} unreadable ({exc})"
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict):
        return f"{METADATA} unreadable (no file list)"
    if meta.get("format") != FORMAT:
        return f"format {meta.get('format')} (this code reads {FORMAT})"
    there = storage.file_sizes(path)  # one listing: an object store answers sizes without reading the files
    for name, size in files.items():
        if name not in there:
            return f"{name} missing"
        if there[name] != size:
            return f"{name} has {there[name]} bytes, {size} recorded"
    return None


def _steps(root: str) -> list[str]:
    """Checkpoint folders under `root`, newest first."""
    return [storage.join(root, d) for d in sorted(storage.subdirs(root), reverse=True) if d.startswith("step-")]


def latest_complete(root: str | os.PathLike[str]) -> str | None:
    """The newest complete checkpoint under `root` (checkpoints/state); newer partial ones are reported."""
    for path in _steps(storage.canonical(root)):
        why = check_complete(path)
        if why is None:
            return path
        print(f"[checkpoint] warning: skipping partial checkpoint {path}: {why}", flush=True)
    return None


def find_resume(resume: str | None, run_dir: str | os.PathLike[str]) -> ResumePoint | None:
    """What `resume` names: None; "auto" -> the newest complete checkpoint in the run folder (in storage), or None; a
    path or URL -> that checkpoint (CheckpointError when it is not a complete one)."""
    if resume is None:
        return None
    if resume == "auto":
        found = latest_complete(storage.join(storage.canonical(run_dir), "checkpoints", "state"))
        if found is None:
            print(f"[checkpoint] resume=auto: no complete checkpoint in {run_dir}, starting afresh", flush=True)
            return None
        path = found
    else:
        path = storage.canonical(os.path.expanduser(resume) if "://" not in resume else resume)
        why = check_complete(path) if storage.isdir(path) else "not a folder"
        if why is not None:
            raise CheckpointError(f"resume: {path} is not a complete checkpoint: {why}")
    return ResumePoint.read(path)


def truncate_metrics(run_dir: str | os.PathLike[str], size: int) -> None:
    """metrics.jsonl continues from the checkpoint: records logged after it (by the run that died) go, the resumed
    run writes them again."""
    f = storage.join(storage.canonical(run_dir), "metrics.jsonl")
    if storage.exists(f):
        data = storage.read_bytes(f)
        if len(data) > size:
            storage.write_bytes(f, data[:size])


class StateCheckpointer:
    """Writes the training state into checkpoints/state/ and keeps the newest `keep` complete checkpoints."""

    def __init__(self, run_dir: str | os.PathLike[str], every_steps: int, keep: int, config_text: str = ""):
        self.root = storage.join(storage.canonical(run_dir), "checkpoints", "state")
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

    def save(self, learner: Any, driver: ResumePoint) -> str:
        """Collective save: every learner rank writes its shards into storage, then checkpoint.json lands last. A rank
        that dies meanwhile raises LearnerFailed (learner/group.py), like any other call on the ranks."""
        t0 = time.perf_counter()
        path = step_dir(self.root, driver.global_step)
        storage.remove(path)  # a partial one, or one a resume from an earlier checkpoint is redoing
        storage.makedirs(path)
        ranks = learner.call_each(save_learner_state, path)
        files = storage.file_sizes(path)
        meta = {
            "format": FORMAT,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "driver": driver.driver_dict(),
            "learner": ranks,
            "files": files,
            "config": self.config_text,
        }
        storage.write_text(storage.join(path, METADATA), json.dumps(meta, indent=1))
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
        kept = 0
        for p in _steps(self.root):
            complete = check_complete(p) is None
            if complete and kept < self.keep:
                kept += 1
                continue
            if kept == 0:  # newer than every complete one: leave it for inspection (resume skips it)
                continue
            storage.remove(p)


def response_ids(rollouts: Any) -> list[list[int]]:
    """A batch's sampled token ids (logging.sampled_ids), fetched by a zero-CPU Ray task: ints, never tensors."""
    return [list(r) for r in rollouts.response_ids]


def restore_learner_state(learner: Any, point: ResumePoint) -> None:
    """Every learner rank loads its state from the checkpoint (collective, through the group: a rank that dies raises
    LearnerFailed)."""
    learner.call_each(load_learner_state, point.path)
