"""common/quiet.py silences each library's noise at its source, in a fresh process as the driver and the actors
start, and leaves that library's other messages alone."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

LONG_TEXT = """
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
raw = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
raw.pre_tokenizer = pre_tokenizers.Whitespace()
tok = PreTrainedTokenizerFast(tokenizer_object=raw, model_max_length=8)
print(len(tok("a " * 40)["input_ids"]), "ids")
from transformers.utils import logging
logging.get_logger("transformers.tokenization_utils_base").warning("another tokenizer warning")
"""


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_without_it_the_noise_shows():
    # the control: what the libraries print on their own (so the tests below can fail)
    out = _run("import vllm.triton_utils\n" + LONG_TEXT)
    assert "Triton is installed, but doesn't include CPU backend" in out
    assert "Token indices sequence length is longer" in out


def test_the_driver_and_actor_packages_silence_it():
    for package in ("learner", "actors"):
        out = _run(f"import {package}\nimport vllm.triton_utils\n" + LONG_TEXT)
        assert "Triton is installed" not in out and "Token indices sequence length" not in out, out
        assert "40 ids" in out and "another tokenizer warning" in out  # the logger still speaks


def test_progress_bars_off():
    out = _run("import learner\nfrom transformers.utils import logging\nprint(logging.is_progress_bar_enabled())")
    assert out.strip().endswith("False")
