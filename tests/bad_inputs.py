"""The bad-input table shared by tests/unit/test_preflight.py (in-process) and tests/integration/test_bad_input.py
(the driver in a subprocess): each case is a command line on top of a small valid setup, and the one-line message
it must give. The setup is real: toy HF model folders (256 positions), a trained BPE tokenizer, small Dolly files."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.config import ConfigError
from common.data import DataError, format_prompt
from common.models import ModelError, build_llama, save_hf, small_llama_config
from common.tiny import train_tokenizer

POSITIONS = 256


@dataclass(frozen=True)
class Setup:
    root: Path
    tokenizer: Path
    teacher: Path
    student: Path
    alien: Path  # a model folder with another tokenizer (same size, different vocabulary)
    train: Path
    valid: Path
    pretrain: Path

    def argv(self, out: Path) -> list[str]:
        """Overrides of configs/tiny.yaml that make a valid run of these files (cases come after them)."""
        return [
            "models.source=local",
            f"models.teacher={self.teacher}",
            f"models.student={self.student}",
            f"models.tokenizer={self.tokenizer}",
            f"data.train={self.train}",
            f"data.valid={self.valid}",
            f"data.pretrain={self.pretrain}",
            f"output_dir={out}",
        ]


def _rows(n: int, start: int = 0) -> list[dict]:
    return [
        {"instruction": f"Name a colour for item {i}.", "context": "", "response": f"Item {i} is blue."}
        for i in range(start, start + n)
    ]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _save_model(path: Path, tokenizer, vocab: int, seed: int) -> Path:
    eos = tokenizer.eos_token_id
    return save_hf(build_llama(small_llama_config(vocab, 64, 1, 2, 64, POSITIONS, eos, eos), seed), tokenizer, path)


def build_setup(root: Path) -> Setup:
    train, valid = _rows(24), _rows(8, start=100)
    texts = [format_prompt(r["instruction"]) + r["response"] for r in train + valid]
    tok = train_tokenizer(texts * 4, 600)
    tok.save_pretrained(str(root / "tokenizer"))
    other = train_tokenizer(["entirely different corpus words zebra xylophone"] * 10, len(tok))
    pretrain = root / "pretrain.txt"
    pretrain.write_text("\n\n".join(texts * 4), encoding="utf-8")
    return Setup(
        root=root,
        tokenizer=root / "tokenizer",
        teacher=_save_model(root / "teacher", tok, len(tok), 0),
        student=_save_model(root / "student", tok, len(tok), 1),
        alien=_save_model(root / "alien", other, max(len(tok), len(other)), 2),
        train=_write_jsonl(root / "train.jsonl", train),
        valid=_write_jsonl(root / "valid.jsonl", valid),
        pretrain=pretrain,
    )


# A case: (setup, its own empty folder) -> (extra argv, the message fragment). Files a case needs go in its folder.
Make = Callable[[Setup, Path], tuple[list[str], str]]


def _file(tmp: Path, name: str, content: str | bytes) -> Path:
    path = tmp / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _good_line(i: int = 0) -> str:
    return json.dumps(_rows(1, i)[0])


def _not_utf8(s: Setup, tmp: Path):
    f = _file(
        tmp,
        "latin1.jsonl",
        (_good_line() + "\n").encode() + '{"instruction": "Caf\xe9?", "response": "x"}\n'.encode("latin-1"),
    )
    return [f"data.train={f}"], f"data.train: {f}:2: not UTF-8 text (byte 0xe9 at byte 21 of the line)"


def _bad_json(s: Setup, tmp: Path):
    f = _file(tmp, "bad.jsonl", f"{_good_line(0)}\n{_good_line(1)}\n{{'instruction': 'single quotes'}}\n")
    return [f"data.train={f}"], f"data.train: {f}:3: not valid JSON (Expecting property name enclosed in double quotes"


def _not_object(s: Setup, tmp: Path):
    f = _file(tmp, "list.jsonl", '["instruction", "response"]\n')
    return [f"data.train={f}"], f"data.train: {f}:1: expected a JSON object, got list"


def _no_field(field: str) -> Make:
    def make(s: Setup, tmp: Path):
        row = _rows(1)[0]
        del row[field]
        f = _file(tmp, "partial.jsonl", f"{_good_line()}\n\n{json.dumps(row)}\n")
        return [f"data.train={f}"], f"data.train: {f}:3: missing field '{field}'"

    return make


def _empty_valid(s: Setup, tmp: Path):
    f = _file(tmp, "empty.jsonl", "")
    return [f"data.valid={f}"], f"data.valid: {f}: no examples (the file is empty or blank)"


def _too_long(s: Setup, tmp: Path):
    f = _write_jsonl(tmp / "long.jsonl", [{"instruction": "zebra " * 400, "response": "x"}] * 3)
    return [f"data.train={f}"], (
        "data.train: every example exceeds the context budget (kept 0/3 examples (dropped 3 with long prompts, "
        "0 with long responses)): raise data.max_prompt_tokens (128) or data.max_response_tokens (64)"
    )


def _short_pretrain(s: Setup, tmp: Path):
    f = _file(tmp, "short.txt", "Too short to fill one block.\n")
    return [f"data.pretrain={f}"], f"data.pretrain: {f}: fewer than 64 tokens of text"


def _heal_too_little_text(s: Setup, tmp: Path):
    f = _file(tmp, "little.txt", "One short document.\n\nAnother one.\n")
    return ["method=heal", "heal.contexts_from=null", f"heal.text_files=[{f}]", "heal.block_tokens=64"], (
        "heal: the 1 training document(s) hold fewer than heal.block_tokens=64 tokens"
    )


def _no_weights(s: Setup, tmp: Path):
    (tmp / "student").mkdir()
    (tmp / "student" / "config.json").write_text((s.student / "config.json").read_text())
    return [f"models.student={tmp / 'student'}"], (
        f"models.student: student folder {tmp / 'student'} has no weights (*.safetensors or *.bin)"
    )


def _few_valid(s: Setup, tmp: Path):
    f = _write_jsonl(tmp / "one.jsonl", _rows(1, 100))
    return [f"data.valid={f}", "learner.num_workers=2"], (
        "data.valid: 1 example(s) fit the context budget, fewer than learner.num_workers=2"
    )


def _uneven_train(s: Setup, tmp: Path):
    f = _write_jsonl(tmp / "three.jsonl", _rows(3))
    return [f"data.train={f}", "learner.num_workers=2"], (
        "data.train: 3 example(s) fit the context budget, fewer than learner.sft_batch_size=16, "
        "and 3 cannot be split evenly over learner.num_workers=2"
    )


def _output_is_file(s: Setup, tmp: Path):
    f = _file(tmp, "run", "not a folder\n")
    return [f"output_dir={f}"], f"output_dir: {f} exists and is not a folder"


def _output_under_file(s: Setup, tmp: Path):
    f = _file(tmp, "notes.txt", "not a folder\n")
    return [f"output_dir={f / 'run'}"], f"output_dir: cannot create {f / 'run'}: {f} is a file"


def _storage_is_file(s: Setup, tmp: Path):
    f = _file(tmp, "bucket", "not a folder\n")
    return [f"storage.path=file://{f}"], f"storage.path: {f} exists and is not a folder"


def _storage_in_memory(s: Setup, tmp: Path):
    return ["storage.path=memory://run"], (
        "storage.path: Value error, memory:// lives in one process: the learner ranks could not write into it "
        "(got 'memory://run')"
    )


def _hidden_unknown_head(s: Setup, tmp: Path):
    """A teacher whose family changes its logits in a way the learner's copy of the head does not reproduce."""
    import json
    import shutil

    folder = tmp / "minicpm-like"
    shutil.copytree(s.teacher, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "minicpm"}))
    return [f"models.teacher={folder}", "teacher.transport=hidden"], (
        "models.teacher: teacher.transport=hidden: model_type 'minicpm' scales the hidden state"
    )


def _sampling_temperature(s: Setup, tmp: Path):
    return ["sampler.temperature=0.7"], "sampler.temperature=0.7: MiniLLM needs temperature 1"


# id -> (error type, case). The unit test runs every row; the integration test a subset through the driver.
CASES: dict[str, tuple[type[Exception], Make]] = {
    "config-file-missing": (
        ConfigError,
        lambda s, t: (["--config", str(t / "none.yaml")], f"config file not found: {t / 'none.yaml'}"),
    ),
    "config-invalid-yaml": (
        ConfigError,
        lambda s, t: (
            ["--config", str(_file(t, "bad.yaml", "learner:\n  lr: [1, 2\n"))],
            f"{t / 'bad.yaml'}: not valid YAML (while parsing a flow sequence;",
        ),
    ),
    "override-not-key-value": (
        ConfigError,
        lambda s, t: (["learner.lr"], "override 'learner.lr' is not of the form key.sub=value"),
    ),
    "unknown-key": (ConfigError, lambda s, t: (["learner.lrr=1"], "learner.lrr: unknown key")),
    "bad-value": (
        ConfigError,
        lambda s, t: (["learner.lr=-1"], "learner.lr: Input should be greater than 0 (got -1)"),
    ),
    "local-without-paths": (
        ConfigError,
        lambda s, t: (["models.teacher="], "source=local needs both models.teacher and models.student"),
    ),
    "kl-prompts-below-workers": (
        ConfigError,
        lambda s, t: (
            ["learner.num_workers=2", "eval.kl_prompts=1"],
            "eval.kl_prompts=1 is fewer than learner.num_workers=2",
        ),
    ),
    "output-dir-is-a-file": (ConfigError, _output_is_file),
    "output-dir-under-a-file": (ConfigError, _output_under_file),
    "storage-path-is-a-file": (ConfigError, _storage_is_file),
    "storage-path-in-memory": (ConfigError, _storage_in_memory),
    "train-missing": (
        DataError,
        lambda s, t: ([f"data.train={t / 'none.jsonl'}"], f"data.train: data file not found: {t / 'none.jsonl'}"),
    ),
    "train-not-utf8": (DataError, _not_utf8),
    "train-bad-json": (DataError, _bad_json),
    "train-line-not-object": (DataError, _not_object),
    "train-no-instruction": (DataError, _no_field("instruction")),
    "train-no-response": (DataError, _no_field("response")),
    "valid-empty": (DataError, _empty_valid),
    "train-all-too-long": (DataError, _too_long),
    "valid-fewer-than-workers": (DataError, _few_valid),
    "train-uneven-over-workers": (DataError, _uneven_train),
    "pretrain-missing": (
        DataError,
        lambda s, t: (
            [f"data.pretrain={t / 'none.txt'}"],
            f"data.pretrain: pre-training text not found: {t / 'none.txt'}",
        ),
    ),
    "pretrain-too-short": (DataError, _short_pretrain),
    "heal-text-missing": (
        DataError,
        lambda s, t: (
            ["method=heal", f"heal.text_files=[{t / 'none.txt'}]"],
            f"heal.text_files[0]: text file not found: {t / 'none.txt'}",
        ),
    ),
    "heal-too-little-text": (DataError, _heal_too_little_text),
    "teacher-missing": (
        ModelError,
        lambda s, t: (
            [f"models.teacher={t / 'nope'}"],
            f"models.teacher: teacher folder not found: {t / 'nope'}",
        ),
    ),
    "student-not-a-model": (
        ModelError,
        lambda s, t: (
            [f"models.student={s.tokenizer}"],
            f"models.student: student folder {s.tokenizer} is not a Hugging Face model folder (no config.json)",
        ),
    ),
    "student-without-weights": (ModelError, _no_weights),
    "tokenizer-missing": (
        ModelError,
        lambda s, t: (
            [f"models.tokenizer={t / 'nope'}"],
            f"models.tokenizer: tokenizer folder not found: {t / 'nope'}",
        ),
    ),
    "tokenizer-without-files": (
        ModelError,
        lambda s, t: (
            [f"models.tokenizer={t}"],
            f"models.tokenizer: tokenizer folder {t} has no tokenizer files (tokenizer.json,",
        ),
    ),
    "vocabulary-mismatch": (
        ModelError,
        lambda s, t: (
            [f"models.student={s.alien}"],
            f"vocabulary mismatch: the student's tokenizer in {s.alien} differs from the run's tokenizer",
        ),
    ),
    "sft-checkpoint-missing": (
        ModelError,
        lambda s, t: (
            [f"models.sft_checkpoint={t / 'sft'}"],
            f"models.sft_checkpoint: student folder not found: {t / 'sft'}",
        ),
    ),
    "hidden-unknown-output-layer": (ModelError, _hidden_unknown_head),
    "temperature-not-one": (ConfigError, _sampling_temperature),
    "sampling-exceeds-positions": (
        ConfigError,
        lambda s, t: (
            ["eval.max_new_tokens=200"],
            "data.max_prompt_tokens + eval.max_new_tokens = 328 exceeds the teacher's max_position_embeddings = 256 "
            "(models.teacher)",
        ),
    ),
    "training-exceeds-positions": (
        ConfigError,
        lambda s, t: (
            ["data.max_response_tokens=200"],
            "data.max_prompt_tokens + data.max_response_tokens = 328 exceeds the student's "
            "max_position_embeddings = 256 (models.student)",
        ),
    ),
}
