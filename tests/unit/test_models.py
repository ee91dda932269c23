import pytest
import torch

from common.models import ModelError, build_llama, check_compatible, load_model, save_hf, small_llama_config
from common.tiny import train_tokenizer

TEXTS = ["the quick brown fox jumps over the lazy dog " * 3, "a response that completes the request. " * 3]


def _save(tmp_path, name, tokenizer, vocab_rows, seed=0):
    cfg = small_llama_config(vocab_rows, 64, 1, 2, 64, 64, tokenizer.eos_token_id, tokenizer.eos_token_id)
    return save_hf(build_llama(cfg, seed), tokenizer, tmp_path / name)


def test_compatible_with_padded_rows(tmp_path):
    tok = train_tokenizer(TEXTS, 300)
    teacher = _save(tmp_path, "t", tok, len(tok) + 13)  # padded embedding rows are allowed
    student = _save(tmp_path, "s", tok, len(tok))
    info = check_compatible(teacher, student, tok)
    assert info.tokenizer_size == len(tok) and info.teacher_rows == len(tok) + 13


def test_too_few_rows_is_a_clear_error(tmp_path):
    tok = train_tokenizer(TEXTS, 300)
    teacher = _save(tmp_path, "t", tok, len(tok))
    student = _save(tmp_path, "s", tok, len(tok) - 5)
    with pytest.raises(ModelError, match="student has .* rows but the tokenizer has"):
        check_compatible(teacher, student, tok)


def test_different_tokenizer_is_a_clear_error(tmp_path):
    tok = train_tokenizer(TEXTS, 300)
    other = train_tokenizer(["completely different words entirely zebra xylophone"] * 5, 290)
    teacher = _save(tmp_path, "t", other, max(len(tok), len(other)))
    student = _save(tmp_path, "s", tok, len(tok))
    with pytest.raises(ModelError, match="teacher's tokenizer .* differs"):
        check_compatible(teacher, student, tok)


def test_save_round_trip_and_missing_folder(tmp_path):
    tok = train_tokenizer(TEXTS, 300)
    path = _save(tmp_path, "m", tok, len(tok), seed=3)
    model = load_model(path)
    ids = torch.tensor([[1, 2, 3]])
    assert model(ids).logits.shape == (1, 3, len(tok))
    save_hf(model, tok, path)  # overwriting an existing folder keeps a loadable model
    assert load_model(path)(ids).logits.allclose(model(ids).logits)
    with pytest.raises(ModelError, match="model folder not found: .*missing"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a Hugging Face model folder .no config.json"):
        load_model(tmp_path / "empty")
