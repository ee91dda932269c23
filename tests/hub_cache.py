"""An offline Hugging Face Hub cache built on disk from local model folders, in the layout huggingface_hub reads:
models--ORG--NAME/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/<branch>}."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def add_model(cache: Path, repo_id: str, folder: Path, commit: str, branch: str = "main") -> Path:
    """Put `folder`'s files into `cache` as `repo_id` at `commit` (`branch` points at it); returns the snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for src in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(src, blob)
        link = snapshot / src.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    return snapshot


def commit_hash(seed: str) -> str:
    return hashlib.sha1(seed.encode()).hexdigest()
