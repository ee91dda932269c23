"""A state checkpoint's files without a model behind them, in any storage (a folder or an fsspec URL): shard and rank
files of known sizes, and the metadata that makes it complete (left out for one that died mid-save)."""

import json

from common import storage
from learner.checkpoint import FORMAT, METADATA

FILES = {"__0_0.distcp": 100, "rank-0.pt": 10}


def fake_checkpoint(run_dir: str, step: int, complete: bool = True) -> str:
    path = storage.join(run_dir, "checkpoints", "state", f"step-{step:07d}")
    for name, size in FILES.items():
        storage.write_bytes(storage.join(path, name), name[-1].encode() * size)
    if complete:
        driver = dict(
            phase="minillm",
            phase_step=step,
            global_step=step,
            version=step,
            best=None,
            bad_in_row=0,
            prompt_batches=step,
            pretrain_batches=step,
            metrics_bytes=0,
        )
        meta = {"format": FORMAT, "driver": driver, "files": FILES}
        storage.write_text(storage.join(path, METADATA), json.dumps(meta))
    return path
