"""General text for healing a cut student (`method: heal`): word-level KD from the teacher on text that is not the
task, the way pruned models are restored before any task training.

The text is documents: the `context` passages of a Dolly-schema file (Wikipedia-style paragraphs; no instructions,
no responses) and plain-text files (documents separated by blank lines). Documents are split into training and
held-out sets before tokenising, so no held-out block shares a document with training. Each set is one EOS-joined
token stream cut into blocks of `block_tokens`; a block is a TokenizedExample whose first token is the "prompt" and
the rest the targets, so the KD, NLL and validation-loss paths of the baselines take it as it is.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from common.data import DataError, TokenizedExample, Tokenizer, eos_joined_blocks


def dolly_contexts(path: str | Path) -> list[str]:
    """The non-empty, distinct `context` passages of a Dolly-schema JSONL file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    seen: set[str] = set()
    out: list[str] = []
    with path.open(encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            context = obj.get("context", "") if isinstance(obj, dict) else None
            if not isinstance(context, str):
                raise DataError(f"{path}:{lineno}: field 'context' must be a string")
            context = context.strip()
            if context and context not in seen:
                seen.add(context)
                out.append(context)
    return out


def split_documents(docs: Sequence[str], held_out: float, seed: int) -> tuple[list[str], list[str]]:
    """(training, held-out) documents: a seeded shuffle, the first `held_out` share held out (at least one each)."""
    if len(docs) < 2:
        raise DataError(f"{len(docs)} document(s) of general text: at least 2 are needed (one to hold out)")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_out = min(len(docs) - 1, max(1, round(held_out * len(docs))))
    return [docs[i] for i in sorted(order[n_out:])], [docs[i] for i in sorted(order[:n_out])]


def pack_blocks(
    docs: Sequence[str], tokenizer: Tokenizer, block_tokens: int, max_blocks: int | None = None
) -> list[TokenizedExample]:
    """The documents as one EOS-joined stream cut into blocks of `block_tokens` (the ragged tail dropped)."""
    if block_tokens < 2:
        raise DataError(f"blocks of {block_tokens} token(s): at least 2 are needed (one context, one target)")
    blocks = eos_joined_blocks(docs, tokenizer, block_tokens, max_blocks)
    return [TokenizedExample(b[:1], b[1:], k) for k, b in enumerate(blocks)]
