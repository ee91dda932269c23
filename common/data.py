"""Instruction data (Dolly schema), the paper's prompt wrapper, tokenisation, batching, and pre-training blocks."""

from __future__ import annotations

import json
import random
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from common.config import DistillConfig, resolve_path

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class DataError(ValueError):
    """Bad input data, with the file and line it came from."""


class Tokenizer(Protocol):
    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class Example:
    instruction: str  # Dolly's instruction, a prompt column, or the prompt turns' text (chat)
    context: str
    references: tuple[str, ...]  # reference responses; empty for prompt-only data
    category: str = ""
    # chat data: the prompt's turns as (role, content), rendered with the tokenizer's chat template
    turns: tuple[tuple[str, str], ...] = ()

    @property
    def prompt(self) -> str:
        """The paper's wrapper around the instruction (the `dolly` template)."""
        return format_prompt(self.instruction, self.context)

    @property
    def response(self) -> str:
        if not self.references:
            raise DataError("a prompt-only example has no response")
        return self.references[0]


def format_prompt(instruction: str, context: str = "") -> str:
    if context.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction.strip(), context=context.strip())
    return PROMPT_NO_INPUT.format(instruction=instruction.strip())


def decode_json_line(line: str, where: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _parse_line(line: str, where: str) -> Example:
    from common.formats import DEFAULT_COLUMNS, parse_dolly

    return parse_dolly(decode_json_line(line, where), where, DEFAULT_COLUMNS)


def load_jsonl(path: str | Path, limit: int | None = None, parse=None) -> list[Example]:
    """Read JSON lines (Dolly schema unless `parse(obj_line, where)` says otherwise). A malformed line raises
    DataError naming file:line and the reason."""
    parse = parse or _parse_line
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    examples: list[Example] = []
    try:
        fh = path.open("rb")  # bytes, decoded line by line, so a bad byte is reported with its line
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    with fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a leading BOM is harmless
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line)"
                ) from None
            if not line.strip():
                continue
            examples.append(parse(line, f"{path}:{lineno}"))
            if limit is not None and len(examples) >= limit:
                break
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty or blank)")
    return examples


@dataclass(frozen=True)
class TokenizedExample:
    prompt_ids: list[int]
    response_ids: list[int]  # ends with EOS
    index: int  # position in the source list (for references at eval time)


@dataclass(frozen=True)
class FilterReport:
    kept: int
    dropped_prompt: int  # prompt longer than the budget
    dropped_response: int  # response longer than the budget

    def __str__(self) -> str:
        total = self.kept + self.dropped_prompt + self.dropped_response
        return (
            f"kept {self.kept}/{total} examples (dropped {self.dropped_prompt} with long prompts, "
            f"{self.dropped_response} with long responses)"
        )


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: Tokenizer,
    max_prompt_tokens: int,
    max_response_tokens: int | None,
    template: str = "dolly",
) -> tuple[list[TokenizedExample], FilterReport]:
    """Tokenise prompt (rendered with `template`, common/templates.py) and first reference; drop (and count)
    examples that exceed the context budget. A prompt-only example's response is EOS alone."""
    from common.templates import render_prompt_ids

    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("tokenizer has no eos_token_id")
    kept: list[TokenizedExample] = []
    long_prompt = long_response = 0
    for i, ex in enumerate(examples):
        prompt_ids = render_prompt_ids(ex, tokenizer, template)
        response = tokenizer.encode(ex.response, add_special_tokens=False) if ex.references else []
        response_ids = response + [eos]
        if len(prompt_ids) > max_prompt_tokens:
            long_prompt += 1
            continue
        if max_response_tokens is not None and len(response_ids) > max_response_tokens:
            long_response += 1
            continue
        kept.append(TokenizedExample(prompt_ids, response_ids, i))
    return kept, FilterReport(len(kept), long_prompt, long_response)


@dataclass
class LMBatch:
    """Right-padded sequences; `loss_mask[b, t]` says whether input_ids[b, t+1] is a target (response token)."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    loss_mask: torch.Tensor  # [B, L-1] float

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def strip_eos(ids: list[int], eos_ids: Collection[int]) -> list[int]:
    """A response without the EOS (stop token) that ends it: what is decoded, scored and counted."""
    return ids[:-1] if ids and ids[-1] in eos_ids else ids


def collate_prompt_response(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, train_on_prompt: bool = False
) -> LMBatch:
    """Concatenate prompt+response, right-pad, and mark response tokens as targets."""
    lengths = [len(p) + len(r) for p, r in pairs]
    width = max(lengths)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(pairs), width), dtype=torch.long)
    target = torch.zeros((len(pairs), width), dtype=torch.float32)
    for b, (p, r) in enumerate(pairs):
        seq = list(p) + list(r)
        ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attn[b, : len(seq)] = 1
        start = 1 if train_on_prompt else len(p)
        target[b, start : len(seq)] = 1.0
    return LMBatch(ids, attn, target[:, 1:].contiguous())


def iterate_batches(
    items: Sequence[TokenizedExample], batch_size: int, seed: int, epochs: int | None = None
) -> Iterator[list[TokenizedExample]]:
    """Deterministic shuffled batches; epoch e uses seed+e. Infinite when epochs is None."""
    if not items:
        raise DataError("no examples to batch")
    epoch = 0
    while epochs is None or epoch < epochs:
        order = list(range(len(items)))
        random.Random(seed + epoch).shuffle(order)
        # drop the ragged tail so every update sees a full batch (all of it when the set is small)
        for k in range(max(1, len(order) // batch_size)):
            yield [items[i] for i in order[k * batch_size : (k + 1) * batch_size]]
        epoch += 1


def text_documents(path: str | Path, what: str = "text file") -> list[str]:
    """Plain text, documents separated by blank lines."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    return [d.strip() for d in text.split("\n\n") if d.strip()]


def eos_joined_blocks(
    docs: Sequence[str], tokenizer: Tokenizer, block_size: int, max_blocks: int | None = None
) -> list[list[int]]:
    """The documents as one EOS-joined token stream cut into blocks of `block_size` (the ragged tail dropped);
    tokenises only as many documents as `max_blocks` needs."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    needed = None if max_blocks is None else max_blocks * block_size
    for doc in docs:
        stream.extend(tokenizer.encode(doc, add_special_tokens=False))
        if eos is not None:
            stream.append(eos)
        if needed is not None and len(stream) >= needed:
            break
    n = len(stream) // block_size if max_blocks is None else min(max_blocks, len(stream) // block_size)
    return [stream[k * block_size : (k + 1) * block_size] for k in range(n)]


def load_pretrain_blocks(
    path: str | Path, tokenizer: Tokenizer, block_size: int, max_blocks: int | None = None
) -> torch.Tensor:
    """Plain text (documents separated by blank lines) -> EOS-joined token stream cut into [N, block_size]."""
    blocks = eos_joined_blocks(text_documents(path, "pre-training text"), tokenizer, block_size, max_blocks)
    if not blocks:
        raise DataError(f"{path}: fewer than {block_size} tokens of text")
    return torch.tensor(blocks, dtype=torch.long)


def iterate_pretrain(blocks: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Infinite deterministic shuffled batches of pre-training blocks."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(blocks.shape[0], generator=gen)
        for start in range(0, blocks.shape[0] - batch_size + 1, batch_size):
            yield blocks[order[start : start + batch_size]]
        if blocks.shape[0] < batch_size:
            yield blocks


def pretrain_batches(cfg: DistillConfig, tokenizer: Tokenizer) -> Iterator[torch.Tensor]:
    """MiniLLM's L_PT batches (data.pretrain, up to 4096 blocks); none when there is no corpus or pt_weight is 0."""
    if not cfg.data.pretrain or cfg.objective.pt_weight <= 0:
        return iter(())
    blocks = load_pretrain_blocks(resolve_path(cfg.data.pretrain), tokenizer, cfg.data.pretrain_block_size, 4096)
    return iterate_pretrain(blocks, cfg.learner.pretrain_batch_size, cfg.seed)
