"""Durable storage (`storage.path`): a local folder or an fsspec URL (`file://`, `s3://`, `gs://`, ...).

Every location is a string: a local one is its absolute path (so os, torch and transformers read it as they are),
any other one `protocol://path`. Writes are atomic on both kinds of filesystem:

* a local (POSIX) filesystem has rename: a file goes to `NAME.tmp`, is fsynced and renamed; a folder is written as
  `NAME.tmp` and swapped in (`replace_dir`: the old one renamed to `NAME.old` first, removed last);
* an object store has no rename, but one object's PUT is atomic: a file is one PUT; a folder is complete when its
  marker `_COMPLETE`, written last, is there. Replacing a folder uploads `NAME.tmp/` (marker last), then copies it
  over `NAME/` (marker removed first, written last); `recover_dir` finishes a swap that a crash interrupted.

Pure: imports no Ray.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MARKER = "_COMPLETE"


def _fs(url: str | os.PathLike[str]) -> tuple[Any, str]:
    from fsspec.core import url_to_fs

    return url_to_fs(str(url))


def _is_local_fs(fs: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def canonical(url: str | os.PathLike[str]) -> str:
    """A local folder (a path or `file://`) -> its absolute path; anything else -> `protocol://path`."""
    fs, path = _fs(url)
    if _is_local_fs(fs):
        return str(Path(path).resolve())
    return str(fs.unstrip_protocol(path)).rstrip("/")


def is_local(url: str | os.PathLike[str]) -> bool:
    """Whether `url` is on a filesystem of this node (a local disk or a mount): it has rename and fsync."""
    return _is_local_fs(_fs(url)[0])


def join(url: str | os.PathLike[str], *parts: str) -> str:
    return "/".join([str(url).rstrip("/"), *parts])


def name(url: str | os.PathLike[str]) -> str:
    return str(url).rstrip("/").rsplit("/", 1)[-1]


def exists(url: str | os.PathLike[str]) -> bool:
    fs, path = _fs(url)
    return bool(fs.exists(path))


def isdir(url: str | os.PathLike[str]) -> bool:
    fs, path = _fs(url)
    return bool(fs.isdir(path))


def makedirs(url: str | os.PathLike[str]) -> None:
    fs, path = _fs(url)
    fs.makedirs(path, exist_ok=True)


def listdir(url: str | os.PathLike[str]) -> list[str]:
    """Names in a folder (files and folders); [] when it does not exist."""
    fs, path = _fs(url)
    if not fs.isdir(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def subdirs(url: str | os.PathLike[str]) -> list[str]:
    fs, path = _fs(url)
    if not fs.isdir(path):
        return []
    entries = fs.ls(path, detail=True)
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")


def file_sizes(url: str | os.PathLike[str]) -> dict[str, int]:
    """Every file under a folder (recursively), by path relative to it, with its size in bytes."""
    fs, path = _fs(url)
    root = path.rstrip("/") + "/"
    found = fs.find(path, detail=True) if fs.isdir(path) else {}
    return {
        p[len(root) :] if p.startswith(root) else p.rsplit("/", 1)[-1]: int(info["size"])
        for p, info in sorted(found.items())
        if info["type"] == "file"
    }


def read_bytes(url: str | os.PathLike[str]) -> bytes:
    fs, path = _fs(url)
    return bytes(fs.cat_file(path))


def read_text(url: str | os.PathLike[str]) -> str:
    return read_bytes(url).decode("utf-8")


def write_bytes(url: str | os.PathLike[str], data: bytes) -> None:
    """Atomically: readers see the old content or the new one, never a part."""
    fs, path = _fs(url)
    if not _is_local_fs(fs):
        fs.pipe_file(path, data)  # one PUT: an object appears whole or not at all
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def write_text(url: str | os.PathLike[str], text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def remove(url: str | os.PathLike[str]) -> None:
    """Delete a file or a folder with everything in it; nothing when it is not there."""
    fs, path = _fs(url)
    if _is_local_fs(fs):
        p = Path(path)
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        return
    if fs.exists(path):
        fs.rm(path, recursive=True)


def move(src: str, dst: str) -> None:
    """Rename (local) or copy then delete (object stores)."""
    fs, path = _fs(src)
    fs.mv(path, _fs(dst)[1], recursive=True)


# ===== folders published whole ========================================================================
def replace_dir(tmp: Path, dst: Path) -> None:
    """Local: put the finished folder `tmp` in place of `dst`. The old one is renamed aside first and removed last, so
    a crash leaves either the old or the new folder (or the old one as DST.old, which `recover_dir` puts back)."""
    old = dst.with_name(dst.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)
    if old.exists():
        shutil.rmtree(old)


def is_complete_dir(url: str | os.PathLike[str]) -> bool:
    """A folder published by publish_dir / copy_dir is there whole (local: renamed in; object store: its marker)."""
    fs, path = _fs(url)
    if _is_local_fs(fs):
        return bool(fs.isdir(path))
    return bool(fs.exists(path.rstrip("/") + "/" + MARKER))


def _remote_swap(fs: Any, tmp: str, dst: str) -> None:
    """Object store: the complete folder `tmp` (marker last) -> `dst`. dst's marker goes first and comes back last,
    so a crash in between leaves dst incomplete and tmp complete: recover_dir redoes the copy."""
    if fs.exists(dst + "/" + MARKER):
        fs.rm(dst + "/" + MARKER)
    if fs.exists(dst):
        fs.rm(dst, recursive=True)
    for src_file in sorted(fs.find(tmp)):
        rel = src_file[len(tmp.rstrip("/")) + 1 :]
        if rel != MARKER:
            fs.copy(src_file, dst + "/" + rel)
    fs.pipe_file(dst + "/" + MARKER, b"")
    fs.rm(tmp, recursive=True)


def publish_dir(src: Path, url: str) -> None:
    """Put the local folder `src` (finished) in place of the folder `url` of durable storage, atomically."""
    fs, dst = _fs(url)
    dst = dst.rstrip("/")
    tmp = dst + ".tmp"
    if fs.exists(tmp):
        fs.rm(tmp, recursive=True)
    if _is_local_fs(fs):
        shutil.copytree(src, tmp)
        replace_dir(Path(tmp), Path(dst))
        return
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        fs.put_file(str(f), tmp + "/" + f.relative_to(src).as_posix())
    fs.pipe_file(tmp + "/" + MARKER, b"")
    _remote_swap(fs, tmp, dst)


def copy_dir(src: str, url: str) -> None:
    """Copy the folder `src` (a local folder, or one in the same storage as `url`) to `url`, atomically."""
    src_fs, src_path = _fs(src)
    if _is_local_fs(src_fs):
        publish_dir(Path(src_path), url)
        return
    fs, dst = _fs(url)
    dst, src_path = dst.rstrip("/"), src_path.rstrip("/")
    tmp = dst + ".tmp"
    if fs.exists(tmp):
        fs.rm(tmp, recursive=True)
    for f in sorted(fs.find(src_path)):
        rel = f[len(src_path) + 1 :]
        if rel != MARKER:
            fs.copy(f, tmp + "/" + rel)  # server-side: nothing passes through this process
    fs.pipe_file(tmp + "/" + MARKER, b"")
    _remote_swap(fs, tmp, dst)


def recover_dir(url: str | os.PathLike[str]) -> None:
    """After a crash mid-swap: the last complete folder goes back in place (local: DST.old; object store: DST.tmp)."""
    fs, dst = _fs(url)
    dst = dst.rstrip("/")
    if _is_local_fs(fs):
        old = Path(dst + ".old")
        if old.is_dir() and not Path(dst).exists():
            old.rename(dst)
        return
    tmp = dst + ".tmp"
    if not fs.exists(dst + "/" + MARKER) and fs.exists(tmp + "/" + MARKER):
        _remote_swap(fs, tmp, dst)


@contextmanager
def local_copy(url: str | os.PathLike[str]) -> Iterator[Path]:
    """A folder of durable storage as a local path: itself when it is local, else a download into this node's
    scratch (a temporary folder, removed on exit)."""
    fs, path = _fs(url)
    if _is_local_fs(fs):
        yield Path(path)
        return
    if not is_complete_dir(url):
        raise FileNotFoundError(f"{url}: no complete folder there (no {MARKER} marker)")
    with tempfile.TemporaryDirectory(prefix="minillm-storage-") as tmp:
        root = path.rstrip("/")
        for f in sorted(fs.find(root)):
            rel = f[len(root) + 1 :]
            if rel != MARKER:
                (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f, str(Path(tmp) / rel))
        yield Path(tmp)
