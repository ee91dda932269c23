"""Data as users hold it: dolly / chat / prompt rows from JSON lines, JSON, parquet, save_to_disk folders; chat
prompts rendered with the tokenizer's chat template; bad rows as one line naming the row."""

import json
from pathlib import Path

import pytest

from common.config import load_config
from common.data import DataError, tokenize_examples
from common.formats import load_examples
from common.models import load_tokenizer
from common.preflight import one_line, preflight
from common.templates import render_prompt_ids, render_prompt_text, resolve_template
from tests.bad_inputs import build_setup

# a simple chat template, as instruction-tuned tokenizers carry (the tiny default's tokenizer has none)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def chat_row(i: int, answer: bool = True) -> dict:
    turns = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": f"Name a colour for item {i}."},
    ]
    return {"messages": turns + ([{"role": "assistant", "content": f"Item {i} is blue."}] if answer else [])}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_setup(tmp_path_factory.mktemp("setup"))


@pytest.fixture(scope="module")
def chat_tokenizer(setup, tmp_path_factory):
    """The setup's tokenizer with a chat template, saved as a folder (a user's instruction tokenizer)."""
    tok = load_tokenizer(setup.tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    folder = tmp_path_factory.mktemp("chat_tok")
    tok.save_pretrained(str(folder))
    return folder


def test_chat_rows_split_prompt_and_response(tmp_path):
    (ex,) = load_examples(str(write_jsonl(tmp_path / "c.jsonl", [chat_row(3)])), "chat")
    assert ex.turns == (("system", "You are terse."), ("user", "Name a colour for item 3."))
    assert ex.references == ("Item 3 is blue.",)
    (open_ended,) = load_examples(str(write_jsonl(tmp_path / "p.jsonl", [chat_row(4, answer=False)])), "chat")
    assert open_ended.references == () and len(open_ended.turns) == 2


def test_sharegpt_rows_and_renamed_columns(tmp_path):
    row = {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}
    (ex,) = load_examples(str(write_jsonl(tmp_path / "s.jsonl", [row])), "chat", {"messages": "conversations"})
    assert ex.turns == (("user", "Hi?"),) and ex.references == ("Hello.",)
    dolly = {"question": "Why?", "passage": "Because.", "answer": "So."}
    cols = {"instruction": "question", "context": "passage", "response": "answer"}
    (d,) = load_examples(str(write_jsonl(tmp_path / "d.jsonl", [dolly])), "dolly", cols)
    assert (d.instruction, d.context, d.references) == ("Why?", "Because.", ("So.",))
    (p,) = load_examples(str(write_jsonl(tmp_path / "q.jsonl", [{"prompt": "Say hi."}])), "prompt")
    assert p.instruction == "Say hi." and p.references == ()


def test_chat_template_ids_are_the_tokenizers_own(chat_tokenizer, tmp_path):
    tok = load_tokenizer(chat_tokenizer)
    examples = load_examples(str(write_jsonl(tmp_path / "c.jsonl", [chat_row(i) for i in range(4)])), "chat")
    assert resolve_template("auto", "chat", tok) == "chat" and resolve_template("auto", "dolly", tok) == "dolly"
    items, _ = tokenize_examples(examples, tok, 256, 64, "chat")
    for ex, item in zip(examples, items, strict=True):
        msgs = [{"role": r, "content": c} for r, c in ex.turns]
        expected = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        assert item.prompt_ids == list(expected)
        assert item.response_ids == tok.encode(ex.response, add_special_tokens=False) + [tok.eos_token_id]
        assert render_prompt_text(ex, tok, "chat").endswith("<|assistant|>\n")
    # the dolly template is the paper's wrapper, as before
    assert render_prompt_ids(examples[0], tok, "dolly") == tok.encode(examples[0].prompt, add_special_tokens=False)


def test_chat_template_needs_one(setup):
    tok = load_tokenizer(setup.tokenizer)
    assert resolve_template("auto", "chat", tok) == "dolly"
    with pytest.raises(DataError, match="the tokenizer has no chat template"):
        resolve_template("chat", "chat", tok)


def test_parquet_json_and_saved_folders_load_like_jsonl(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [chat_row(i) for i in range(5)]
    want = load_examples(str(write_jsonl(tmp_path / "c.jsonl", rows)), "chat")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    (tmp_path / "c.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "files").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:2]), tmp_path / "files" / "a.parquet")
    write_jsonl(tmp_path / "files" / "b.jsonl", rows[2:])
    for source in ("c.parquet", "c.json", "saved", "dict:train", "files"):
        assert load_examples(str(tmp_path / source), "chat") == want, source
    assert len(load_examples(str(tmp_path / "c.parquet"), "chat", limit=2)) == 2
    with pytest.raises(DataError, match=r"a DatasetDict of splits train: name one as .*:SPLIT"):
        load_examples(str(tmp_path / "dict"), "chat")


@pytest.mark.parametrize(
    "row, need, message",
    [
        ({"messages": [{"content": "Hi"}]}, None, "messages[0] has no 'role'"),
        ({"messages": [{"role": "user", "content": ["Hi"]}]}, None, "messages[0]: 'content' must be a string"),
        ({"messages": [{"role": "wizard", "content": "Hi"}]}, None, "messages[0]: role 'wizard' is not one of"),
        ({"messages": []}, None, "field 'messages' must be a non-empty list"),
        ({"text": "Hi"}, None, "missing field 'messages'"),
        ({"messages": [{"role": "assistant", "content": "Hi"}]}, None, "no user turn before the response"),
        (chat_row(1, answer=False), "method=sft", "no assistant turn at the end, and method=sft needs a response"),
    ],
)
def test_bad_chat_rows_name_the_row(tmp_path, row, need, message):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = write_jsonl(tmp_path / "c.jsonl", [chat_row(0), row])
    with pytest.raises(DataError) as err:
        load_examples(str(path), "chat", need_response=need)
    assert one_line(err.value) == f"{path}:2: {message}" or one_line(err.value).startswith(f"{path}:2: {message}")
    if "content" in str(row) and isinstance(row.get("messages"), list) and row["messages"]:
        try:
            pq.write_table(pa.Table.from_pylist([chat_row(0), row]), tmp_path / "c.parquet")
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return  # a column parquet cannot hold (mixed types): nothing to read back
        with pytest.raises(DataError) as err:
            load_examples(str(tmp_path / "c.parquet"), "chat", need_response=need)
        assert str(err.value).startswith(f"{tmp_path / 'c.parquet'}[row 1]: ")


def _argv(setup, out, *extra):
    return [*setup.argv(out), *extra]


def test_prompt_data_is_refused_for_sft_in_one_line(setup, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Name a colour for item {i}."} for i in range(24)])
    cfg = load_config(None, _argv(setup, tmp_path / "run", "method=sft", "data.format=prompt", f"data.train={prompts}"))
    with pytest.raises(DataError) as err:
        preflight(cfg, cwd=tmp_path)
    assert one_line(err.value) == (
        "data.format=prompt: the data has prompts only, and method=sft trains on responses (give chat or dolly "
        "data, or run method=minillm with models.sft_checkpoint or learner.sft_steps=0)"
    )


def test_prompt_data_passes_for_minillm_without_sft(setup, chat_tokenizer, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Name a colour for item {i}."} for i in range(24)])
    cfg = load_config(
        None,
        _argv(
            setup,
            tmp_path / "run",
            "data.format=prompt",
            f"data.train={prompts}",
            f"data.valid={prompts}",
            f"models.tokenizer={chat_tokenizer}",
            "learner.sft_steps=0",
            "learner.minillm_select_by=reverse_kl",
        ),
    )
    ready = preflight(cfg, cwd=tmp_path)
    tok = load_tokenizer(chat_tokenizer)
    first = tok.apply_chat_template(
        [{"role": "user", "content": "Name a colour for item 0."}], add_generation_prompt=True, tokenize=True
    )
    first = first["input_ids"] if hasattr(first, "keys") else first
    assert ready.train[1][0].prompt_ids == list(first)  # prompt data is rendered with the chat template (auto)
    # validation by ROUGE-L (the default selection) needs references: refused in one line naming the row
    cfg = load_config(
        None,
        _argv(
            setup,
            tmp_path / "run",
            "data.format=prompt",
            f"data.train={prompts}",
            f"data.valid={prompts}",
            "learner.sft_steps=0",
        ),
    )
    with pytest.raises(DataError) as err:
        preflight(cfg, cwd=tmp_path)
    assert one_line(err.value) == (
        f"data.valid: {prompts}:1: no 'response', and learner.minillm_select_by=rouge_l (validation ROUGE-L; "
        "reverse_kl needs none) needs a response in every row"
    )


def test_a_hub_data_set_that_cannot_load_is_one_line(tmp_path):
    """A datasets Hub name, offline and not cached: one line naming it (datasets' own error is many)."""
    import os
    import subprocess
    import sys

    code = (
        "from common.formats import load_examples\n"
        "from common.preflight import one_line\n"
        "try:\n"
        "    load_examples('some-org/some-set:train', 'chat')\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, one_line(exc))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip().startswith("DataError datasets Hub name some-org/some-set:train: "), proc.stdout
    assert "\n" not in proc.stdout.strip()
