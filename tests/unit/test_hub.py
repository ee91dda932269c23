"""Models by Hub id: ids resolve offline through a Hub cache built on disk (HF_HUB_CACHE, HF_HUB_OFFLINE=1), the
commit is recorded; a wrong id or revision is a one-line error naming the field (exit 2 from the driver)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common.config import dump_config, load_config
from common.hub import parse_hub_id, resolve_model
from common.models import ModelError
from common.preflight import one_line, preflight
from tests.bad_inputs import build_setup
from tests.hub_cache import add_model, commit_hash

ROOT = Path(__file__).resolve().parents[2]
TEACHER, STUDENT = "toy-org/toy-teacher", "toy-org/toy-student"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    setup = build_setup(root / "setup")
    cache = root / "hf" / "hub"
    commits = {TEACHER: commit_hash("teacher-v1"), STUDENT: commit_hash("student-v1")}
    add_model(cache, TEACHER, setup.teacher, commits[TEACHER])
    add_model(cache, STUDENT, setup.student, commits[STUDENT])
    add_model(cache, STUDENT, setup.teacher, commit_hash("student-v0"), branch="v0")  # a tag at an older commit
    return setup, root / "hf", commits


@pytest.fixture
def offline(hub, monkeypatch):
    """huggingface_hub reads its environment at import: set both the variables and the constants they became."""
    from huggingface_hub import constants

    _, home, _ = hub
    for key, value in (("HF_HOME", home), ("HF_HUB_CACHE", home / "hub"), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(key, str(value))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def test_what_reads_as_a_hub_id():
    assert parse_hub_id("Qwen/Qwen2.5-1.5B-Instruct") == ("Qwen/Qwen2.5-1.5B-Instruct", None)
    assert parse_hub_id("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_hub_id("/abs/folder") is None and parse_hub_id("./org/name") is None
    assert parse_hub_id("configs/x") is None  # configs/ is a folder of the repository: a path
    assert parse_hub_id("a/b/c") is None


def test_ids_resolve_offline_to_their_snapshots(offline):
    setup, home, commits = offline
    got = resolve_model(TEACHER)
    assert got.commit == commits[TEACHER] and got.pinned == f"{TEACHER}@{commits[TEACHER]}"
    assert got.path == home / "hub" / "models--toy-org--toy-teacher" / "snapshots" / commits[TEACHER]
    assert (got.path / "config.json").read_bytes() == (setup.teacher / "config.json").read_bytes()
    assert resolve_model(f"{TEACHER}@{commits[TEACHER]}").path == got.path  # by commit
    assert resolve_model(f"{STUDENT}@v0").commit == commit_hash("student-v0")  # by tag
    assert resolve_model(str(setup.student)).repo_id is None  # a folder stays a folder


def test_preflight_takes_ids_and_records_commits(offline, tmp_path):
    setup, _, commits = offline
    argv = [a for a in setup.argv(tmp_path / "run") if not a.startswith(("models.teacher", "models.student"))]
    argv += [f"models.teacher={TEACHER}", f"models.student={STUDENT}@main"]
    ready = preflight(load_config(None, argv), cwd=tmp_path)
    assert ready.assets.teacher_dir.endswith(commits[TEACHER])
    recorded = yaml.safe_load(dump_config(ready.recorded))["models"]
    assert recorded["teacher"] == f"{TEACHER}@{commits[TEACHER]}"
    assert recorded["student"] == f"{STUDENT}@{commits[STUDENT]}"


@pytest.mark.parametrize(
    "name, message",
    [
        ("toy-org/no-such-model", "toy-org/no-such-model is not a folder, nor in the Hugging Face cache"),
        (f"{TEACHER}@no-such-branch", f"{TEACHER} at revision 'no-such-branch' is not a folder, nor in the Hugging"),
    ],
)
def test_wrong_id_or_revision_is_one_line(offline, name, message):
    with pytest.raises(ModelError) as err:
        resolve_model(name)
    assert message in one_line(err.value) and "HF_HUB_OFFLINE is set" in str(err.value)


@pytest.mark.parametrize("field, name", [("teacher", "toy-org/no-such-model"), ("student", f"{STUDENT}@v9")])
def test_the_driver_exits_2_naming_the_field(hub, tmp_path, field, name):
    setup, home, _ = hub
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HF_HOME=str(home), HF_HUB_CACHE=str(home / "hub"), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "learner.main", *setup.argv(tmp_path / "run"), f"models.{field}={name}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]  # beside library warnings
    assert len(lines) == 1 and lines[0].startswith(f"error: models.{field}: "), proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == lines[0]  # no traceback after it
    assert name.split("@")[0] in lines[0]
    print(lines[0])
