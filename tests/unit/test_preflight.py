"""Bad input is refused before any actor starts: every row of tests/bad_inputs.py through load_config + preflight,
in-process, with its exact one-line message; and the valid setup the rows start from passes."""

import subprocess
import sys
from pathlib import Path

import pytest

from common.config import load_config
from common.errors import one_line_error
from common.preflight import INPUT_ERRORS, preflight
from learner.main import parse_args
from tests.bad_inputs import CASES, build_setup

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_setup(tmp_path_factory.mktemp("setup"))


def _check(argv: list[str], cwd: Path):
    config_path, overrides = parse_args(argv)
    return preflight(load_config(config_path, overrides), cwd=cwd)


def test_the_valid_setup_passes(setup, tmp_path):
    ready = _check(setup.argv(tmp_path / "run"), tmp_path)
    assert len(ready.train[1]) == 24 and len(ready.valid[1]) == 8 and ready.vocab.tokenizer_size > 300
    assert ready.assets.student_dir == str(setup.student)
    assert not (tmp_path / "run").exists()  # the preflight writes nothing


def test_at_least_fifteen_cases():
    assert len(CASES) >= 15


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, setup, tmp_path):
    error, make = CASES[case]
    (tmp_path / "case").mkdir()
    extra, message = make(setup, tmp_path / "case")
    with pytest.raises(INPUT_ERRORS) as info:
        _check(setup.argv(tmp_path / "run") + extra, tmp_path)
    line = one_line_error(info.value, with_type=False)
    assert type(info.value) is error, line
    assert message in line and "\n" not in line, line
    assert not (tmp_path / "run").exists()


def test_one_line_joins_a_multi_line_message():
    assert one_line_error(
        ValueError("invalid configuration (x.yaml):\n  a: unknown key\n  b: bad"), with_type=False
    ) == ("invalid configuration (x.yaml): a: unknown key; b: bad")
    assert one_line_error(ValueError("head\n  detail"), with_type=False) == "head; detail"
    assert one_line_error(RuntimeError("boom\n  Traceback ...")) == "RuntimeError: boom"
    assert one_line_error(RuntimeError("x" * 300), limit=5) == "RuntimeError: xxxxx"


def test_preflight_imports_no_ray(setup, tmp_path):
    """The preflight must run before Ray starts: it may not import it (a fresh interpreter, as the driver)."""
    code = (
        "import sys; from common.config import load_config; from common.preflight import preflight; "
        f"preflight(load_config(None, {setup.argv(tmp_path / 'run')!r})); "
        "assert 'ray' not in sys.modules, 'ray imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
