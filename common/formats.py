"""Instruction data as users hold it: where it comes from (a JSON-lines / JSON / parquet file, a folder, or a
`datasets` Hub name) and how its rows read (`dolly`, `chat`, `prompt`), into `Example`s.

Sources:
- `F.jsonl` (JSON lines), `F.json` (JSON lines, or one JSON array of rows), `F.parquet`;
- a folder written by `datasets`' `save_to_disk` (a `DatasetDict` folder takes `FOLDER:split`), or a folder of
  `.jsonl` / `.json` / `.parquet` files (read in name order);
- a `datasets` Hub name `org/name:split` (optionally `org/name@revision:split`), through `datasets.load_dataset`,
  so `HF_HOME`, `HF_HUB_OFFLINE` and the user's token apply.

Bad rows are one-line DataErrors naming `file:line` (JSON lines) or `source[row N]` (other sources, N from 0).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from common.data import DataError, Example, decode_json_line, load_jsonl

DEFAULT_COLUMNS: dict[str, str] = {
    "instruction": "instruction",
    "context": "context",
    "response": "response",
    "category": "category",
    "messages": "messages",
    "prompt": "prompt",
}
FORMATS = ("dolly", "chat", "prompt")
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT exports: {"from": "human" | "gpt" | "system", "value": ...}
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
_HUB_NAME = re.compile(r"^(?P<name>[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?)(?:@(?P<rev>[\w./-]+))?:(?P<split>[\w.\[\]%:+-]+)$")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")

Row = Mapping[str, Any]
RowParser = Callable[[Row, str], Example]


def _text(obj: Row, column: str, where: str, required: bool = True) -> str:
    value = obj.get(column)
    if value is None and not required:
        return ""
    if column not in obj:
        raise DataError(f"{where}: missing field '{column}'")
    if not isinstance(value, str) or (required and not value.strip()):
        raise DataError(f"{where}: field '{column}' must be a non-empty string")
    return value


def _references(obj: Row, column: str, where: str) -> tuple[str, ...]:
    response = obj.get(column)
    if isinstance(response, str):
        return (response,)
    if isinstance(response, list | tuple) and response and all(isinstance(r, str) for r in response):
        return tuple(response)
    raise DataError(f"{where}: field '{column}' must be a string or a non-empty list of strings")


def parse_dolly(obj: Row, where: str, columns: Mapping[str, str]) -> Example:
    """{instruction, context, response[, category]} (the names in `columns`)."""
    c = columns
    for field in (c["instruction"], c["response"]):
        if field not in obj:
            raise DataError(
                f"{where}: missing field '{field}' (Dolly schema: {c['instruction']}, {c['context']}, {c['response']})"
            )
    instruction = obj.get(c["instruction"])
    if not isinstance(instruction, str) or not instruction.strip():
        raise DataError(f"{where}: field '{c['instruction']}' must be a non-empty string")
    context = obj.get(c["context"], "") or ""
    if not isinstance(context, str):
        raise DataError(f"{where}: field '{c['context']}' must be a string")
    return Example(instruction, context, _references(obj, c["response"], where), str(obj.get(c["category"], "") or ""))


def _turns(obj: Row, where: str, column: str) -> list[tuple[str, str]]:
    messages = obj.get(column)
    if column not in obj:
        raise DataError(f"{where}: missing field '{column}' (chat format: a list of {{role, content}} turns)")
    if not isinstance(messages, list | tuple) or not messages:
        raise DataError(f"{where}: field '{column}' must be a non-empty list of {{role, content}} turns")
    turns = []
    for k, turn in enumerate(messages):
        at = f"{where}: {column}[{k}]"
        if not isinstance(turn, Mapping):
            raise DataError(f"{at} is not an object with role and content")
        if "role" in turn or "content" in turn:
            role, content = turn.get("role"), turn.get("content")
            if role is None:
                raise DataError(f"{at} has no 'role'")
        else:  # ShareGPT
            role, content = _SHAREGPT_ROLES.get(turn.get("from")), turn.get("value")  # type: ignore[arg-type]
            if role is None:
                raise DataError(f"{at} has no 'role' (nor a ShareGPT 'from': human, gpt or system)")
        if role not in ROLES:
            raise DataError(f"{at}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{at}: 'content' must be a string (got {type(content).__name__})")
        turns.append((str(role), content))
    return turns


def parse_chat(obj: Row, where: str, columns: Mapping[str, str]) -> Example:
    """{messages: [{role, content}, ...]}: a last assistant turn is the response, the turns before it the prompt;
    a conversation that ends with another role is a prompt without a response."""
    turns = _turns(obj, where, columns["messages"])
    refs: tuple[str, ...] = ()
    if turns[-1][0] == "assistant":
        refs = (turns[-1][1],)
        turns = turns[:-1]
    if not turns or all(role != "user" for role, _ in turns):
        raise DataError(f"{where}: no user turn before the response")
    text = "\n\n".join(content.strip() for _, content in turns if content.strip())
    return Example(text, "", refs, str(obj.get(columns["category"], "") or ""), tuple(turns))


def parse_prompt(obj: Row, where: str, columns: Mapping[str, str]) -> Example:
    """{prompt[, response]}: a prompt alone (a response column, when there, gives references)."""
    prompt = _text(obj, columns["prompt"], where)
    refs = _references(obj, columns["response"], where) if obj.get(columns["response"]) is not None else ()
    return Example(prompt, "", refs, str(obj.get(columns["category"], "") or ""))


PARSERS: dict[str, Callable[[Row, str, Mapping[str, str]], Example]] = {
    "dolly": parse_dolly,
    "chat": parse_chat,
    "prompt": parse_prompt,
}


def row_parser(fmt: str, columns: Mapping[str, str] | None = None, need_response: str | None = None) -> RowParser:
    """A row -> Example parser for `fmt`; with `need_response` (what needs it), a row without one is an error."""
    cols = {**DEFAULT_COLUMNS, **(columns or {})}
    parse = PARSERS[fmt]

    def parse_row(obj: Row, where: str) -> Example:
        ex = parse(obj, where, cols)
        if need_response and not ex.references:
            missing = "no assistant turn at the end" if fmt == "chat" else f"no '{cols['response']}'"
            raise DataError(f"{where}: {missing}, and {need_response} needs a response in every row")
        return ex

    return parse_row


def load_examples(
    source: str,
    fmt: str = "dolly",
    columns: Mapping[str, str] | None = None,
    limit: int | None = None,
    base: Path | None = None,
    need_response: str | None = None,
) -> list[Example]:
    """The rows of `source` (a file, a folder or `org/name:split`; relative paths from `base`, default the
    repository root) read as `fmt`."""
    from common.config import REPO_ROOT, resolve_path

    parse = row_parser(fmt, columns, need_response)
    path = resolve_path(source, base or REPO_ROOT)
    folder, _, split = source.rpartition(":")
    if not path.exists() and folder and resolve_path(folder, base or REPO_ROOT).is_dir():
        return _from_rows(_saved_dataset(resolve_path(folder, base or REPO_ROOT), split), str(source), parse, limit)
    if path.is_file():
        return _load_file(path, parse, limit)
    if path.is_dir():
        if _is_saved_dataset(path):
            return _from_rows(_saved_dataset(path, None), str(path), parse, limit)
        files = sorted(f for f in path.iterdir() if f.suffix in DATA_SUFFIXES and f.is_file())
        if not files:
            kinds = "/".join(DATA_SUFFIXES)
            raise DataError(f"{path}: a folder with no datasets save_to_disk files and no {kinds} files")
        examples: list[Example] = []
        for f in files:
            examples += _load_file(f, parse, None if limit is None else limit - len(examples))
            if limit is not None and len(examples) >= limit:
                break
        return examples
    match = _HUB_NAME.match(source)
    if match is None or path.suffix in DATA_SUFFIXES:
        raise DataError(f"data file not found: {path}")
    return _from_rows(_hub_dataset(match["name"], match["rev"], match["split"]), source, parse, limit)


def _load_file(path: Path, parse: RowParser, limit: int | None) -> list[Example]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
        return _from_rows(rows, str(path), parse, limit)
    if path.suffix == ".json":
        head = path.open("rb").read(64).lstrip()
        if head.startswith(b"["):  # one JSON array of rows
            import json

            try:
                rows = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise DataError(f"{path}: not a JSON array of rows ({str(exc).splitlines()[0]})") from None
            return _from_rows(rows, str(path), parse, limit)
    return load_jsonl(path, limit=limit, parse=lambda line, where: parse(decode_json_line(line, where), where))


def _from_rows(rows: Iterable[Any], name: str, parse: RowParser, limit: int | None) -> list[Example]:
    examples: list[Example] = []
    for i, row in enumerate(rows):
        where = f"{name}[row {i}]"
        if not isinstance(row, Mapping):
            raise DataError(f"{where}: expected an object (a mapping of columns), got {type(row).__name__}")
        examples.append(parse(row, where))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise DataError(f"{name}: no examples (the data set is empty)")
    return examples


def _is_saved_dataset(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _saved_dataset(path: Path, split: str | None) -> Any:
    """A `save_to_disk` folder: a Dataset, or one split of a DatasetDict (`FOLDER:split`)."""
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(f"{path}: not a datasets save_to_disk folder ({str(exc).splitlines()[0]})") from None
    if isinstance(data, DatasetDict):
        if split is None or split not in data:
            raise DataError(f"{path}: a DatasetDict of splits {', '.join(data)}: name one as {path}:SPLIT")
        return data[split]
    if split is not None:
        raise DataError(f"{path}: a single Dataset has no split {split!r}: leave ':{split}' out")
    return data


def _hub_dataset(name: str, revision: str | None, split: str) -> Any:
    """`datasets.load_dataset(name, split=...)`, its failures as one line."""
    try:
        from datasets import load_dataset

        return load_dataset(name, split=split, revision=revision)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types (hub, network, split); report one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise DataError(f"datasets Hub name {name}{'@' + revision if revision else ''}:{split}: {first}") from None
