"""Dolly rows rewritten as chat rows (the `chat` data format), for the example config configs/smollm2-chat.yaml:

    python -m common.chat_example data/dolly/train.jsonl data/dolly/chat_train.jsonl --rows 2000

Each row becomes {"messages": [{"role": "user", "content": INSTRUCTION[ + "\\n\\n" + CONTEXT]},
{"role": "assistant", "content": RESPONSE}]} (the first reference where a row has several).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.data import DataError, Example, load_jsonl


def chat_row(ex: Example) -> dict:
    user = ex.instruction.strip() + (f"\n\n{ex.context.strip()}" if ex.context.strip() else "")
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": ex.response}]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.chat_example", description=__doc__)
    parser.add_argument("source", type=Path, help="Dolly JSON lines")
    parser.add_argument("out", type=Path, help="chat JSON lines to write")
    parser.add_argument("--rows", type=int, default=None, help="the first N rows only")
    args = parser.parse_args(argv)
    try:
        rows = [chat_row(ex) for ex in load_jsonl(args.source, limit=args.rows)]
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} chat rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
