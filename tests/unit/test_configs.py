"""Every shipped config validates against the typed schema."""

from pathlib import Path

import pytest

from common.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.learner.batch_size % cfg.learner.num_workers == 0
