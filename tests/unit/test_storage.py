"""Durable storage (common/storage.py) on both kinds of filesystem: a local folder (rename) and an object store
(no rename: fsspec's in-process memory:// stands for s3:// here), and the checkpoint logic on top of it."""

import uuid
from pathlib import Path

import pytest

from common import storage
from common.config import ConfigError, load_config, storage_url
from learner.checkpoint import METADATA, StateCheckpointer, check_complete, find_resume, latest_complete
from learner.run_log import prepare_run_dir
from tests.fake_checkpoints import fake_checkpoint


@pytest.fixture(params=["local", "object"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return storage.canonical(f"file://{tmp_path}/store")
    return storage.canonical(f"memory://bucket-{uuid.uuid4().hex}/runs")


def _hf_folder(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(text)
    (path / "sub").mkdir()
    (path / "sub" / "w.bin").write_bytes(b"w" * 7)
    return path


def test_canonical_locations(tmp_path):
    assert storage.canonical(f"file://{tmp_path}") == str(tmp_path.resolve())  # file:// is a plain local path
    assert storage.is_local(str(tmp_path)) and not storage.is_local("memory://b/x")
    assert storage.canonical("memory://b/x/").startswith("memory://") and not storage.canonical(
        "memory://b/x/"
    ).endswith("/")


def test_files_folders_and_sizes(root):
    storage.write_text(storage.join(root, "a", "config.yaml"), "x: 1\n")
    storage.write_bytes(storage.join(root, "a", "b", "blob"), b"12345")
    assert storage.read_text(storage.join(root, "a", "config.yaml")) == "x: 1\n"
    assert storage.file_sizes(storage.join(root, "a")) == {"b/blob": 5, "config.yaml": 5}
    assert storage.subdirs(storage.join(root, "a")) == ["b"]
    assert storage.listdir(storage.join(root, "missing")) == []
    storage.remove(storage.join(root, "a"))
    assert not storage.exists(storage.join(root, "a"))


def test_publish_copy_and_recover_a_folder(root, tmp_path):
    best = storage.join(root, "checkpoints", "best")
    storage.publish_dir(_hf_folder(tmp_path / "v1", "one"), best)
    assert storage.is_complete_dir(best)
    storage.publish_dir(_hf_folder(tmp_path / "v2", "two"), best)  # replaces: the old files go
    with storage.local_copy(best) as folder:
        assert (folder / "config.json").read_text() == "two" and (folder / "sub" / "w.bin").read_bytes() == b"w" * 7
        assert not (folder / storage.MARKER).exists()
    final = storage.join(root, "checkpoints", "final")
    storage.copy_dir(best, final)
    assert storage.is_complete_dir(final) and storage.read_text(storage.join(final, "config.json")) == "two"
    assert not storage.exists(best + ".tmp") and not storage.exists(best + ".old")


def test_an_object_store_folder_is_complete_only_with_its_marker(tmp_path):
    url = storage.canonical(f"memory://bucket-{uuid.uuid4().hex}/best")
    storage.publish_dir(_hf_folder(tmp_path / "v1", "one"), url)
    storage.publish_dir(_hf_folder(tmp_path / "v2", "two"), url + ".tmp")  # a swap whose copy a crash cut short:
    storage.remove(storage.join(url, storage.MARKER))  # dst lost its marker, the complete new folder is in .tmp
    assert not storage.is_complete_dir(url)
    with pytest.raises(FileNotFoundError, match="no complete folder"), storage.local_copy(url):
        pass
    storage.recover_dir(url)
    assert storage.is_complete_dir(url) and storage.read_text(storage.join(url, "config.json")) == "two"


def _fake_checkpoint(root: str, step: int, complete: bool = True) -> str:
    return fake_checkpoint(root, step, complete)


def test_checkpoints_in_storage_resume_and_prune(root):
    for step in (1, 2, 3):
        _fake_checkpoint(root, step)
    partial = _fake_checkpoint(root, 4, complete=False)
    assert check_complete(partial) == f"no {METADATA} (the save did not finish)"
    point = find_resume("auto", root)
    assert point is not None and point.path.endswith("/step-0000003") and point.phase_step == 3
    storage.write_bytes(storage.join(point.path, "rank-0.pt"), b"y" * 3)  # a truncated upload
    assert check_complete(point.path) == "rank-0.pt has 3 bytes, 10 recorded"
    assert latest_complete(storage.join(root, "checkpoints", "state")).endswith("/step-0000002")
    StateCheckpointer(root, every_steps=1, keep=1).prune()  # keeps step 2 (newest complete) and the newer partials
    assert storage.subdirs(storage.join(root, "checkpoints", "state")) == [f"step-000000{s}" for s in (2, 3, 4)]


def test_prepare_run_dir_moves_an_earlier_run_aside(root):
    run = storage.join(root, "run")
    storage.write_text(storage.join(run, "metrics.jsonl"), "{}\n")
    assert prepare_run_dir(run) == run
    assert storage.listdir(run) == ["checkpoints"]
    assert any(n.startswith("run.") for n in storage.listdir(root))
    storage.write_text(storage.join(run, "metrics.jsonl"), "{}\n")
    prepare_run_dir(run, resume=True)  # a resumed run writes on in it
    assert storage.read_text(storage.join(run, "metrics.jsonl")) == "{}\n"


def test_storage_path_config(tmp_path):
    assert storage_url(load_config(overrides=[f"output_dir={tmp_path}/run"])) == str(tmp_path / "run")  # default
    cfg = load_config(overrides=[f"output_dir={tmp_path}/run", f"storage.path=file://{tmp_path}/bucket/run"])
    assert storage_url(cfg) == str(tmp_path / "bucket" / "run")
    for value, message in [
        ("memory://x", "storage.path: .*memory:// lives in one process"),
        ("nosuchfs://x/y", "storage.path: .*unknown filesystem nosuchfs://"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(overrides=[f"storage.path={value}"])
