"""The real-family configs pass every start-up check on a CPU, given models of the families' architecture, config
keys, embedding rows (padding included) and tokenizer size, scaled down (tests/family_models.py)."""

import json
from pathlib import Path

import pytest

from common.config import load_config
from common.preflight import preflight
from tests.family_models import FAMILIES, build_family_pair

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {"qwen2.5": "qwen2.5-7b-to-1.5b.yaml", "llama3": "llama3.1-8b-to-3.2-1b.yaml"}


def _texts() -> list[str]:
    from common.config import DataConfig, resolve_path

    path = resolve_path(DataConfig().train)
    rows = [json.loads(line) for line in path.read_text().splitlines()[:1500]]
    return [r["instruction"] + " " + r["context"] + " " + r["response"] for r in rows]


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_family_config_passes_preflight(tmp_path, family):
    pair = build_family_pair(FAMILIES[family], tmp_path / family, _texts())
    cfg = load_config(
        ROOT / "configs" / CONFIGS[family],
        [
            f"models.teacher={pair['teacher']}",
            f"models.student={pair['student']}",
            f"models.tokenizer={pair['tokenizer']}",
            f"output_dir={tmp_path / 'run'}",
            "data.max_train_examples=200",
            "data.max_valid_examples=200",
        ],
    )
    assert cfg.teacher.transport == "hidden" and cfg.learner.activation_checkpointing
    checked = preflight(cfg, cwd=tmp_path)
    real = FAMILIES[family].regular_tokens + len(FAMILIES[family].specials)
    assert checked.vocab.tokenizer_size == real
    assert checked.vocab.teacher_rows == FAMILIES[family].teacher["vocab_size"]
    assert checked.vocab.student_rows == FAMILIES[family].student["vocab_size"]
