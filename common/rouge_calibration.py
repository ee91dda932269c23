"""What a ROUGE-L score stands for at small scale: floors and length-matched comparisons from `--samples` files.

    python -m learner.evaluate ... --samples a.jsonl      # one file per model, same data, seeds and limit
    python -m bench.rouge_calibration --base sft.jsonl --samples minillm.jsonl kd.jsonl teacher.jsonl

* floors: constant answers (no model at all) scored against the same references. Function words alone score
  several points of ROUGE-L F on Dolly, so a weak model's score starts there, not at 0.
* length-matched: ROUGE-L F rewards recall, so a longer answer can score higher without being better. For every
  (seed, example) both responses are cut to the shorter one's word count and scored again; the pair's difference
  is then not a difference in length.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from common.metrics import rouge_l

CONSTANT_ANSWERS = ("the", "The and of the a is to in and the")

Key = tuple[str, int, int]  # dataset file name, seed, example index


def load_samples(path: Path) -> dict[Key, dict[str, Any]]:
    rows = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            # The file name, not the path as typed: `../data/test.jsonl` and `/abs/data/test.jsonl` are one split.
            rows[(Path(r["dataset"]).name, int(r["seed"]), int(r["index"]))] = r
        except (ValueError, KeyError) as exc:
            raise SystemExit(f"{path}:{n}: not a `learner.evaluate --samples` line ({exc})") from exc
    return rows


def floors(rows: dict[Key, dict]) -> dict[str, float]:
    """Mean ROUGE-L of each constant answer over the distinct examples in `rows`."""
    refs = {(k[0], k[2]): r["references"] for k, r in rows.items()}
    return {text: statistics.mean(rouge_l(text, ref) for ref in refs.values()) for text in CONSTANT_ANSWERS}


def _first_words(text: str, n: int) -> str:
    return " ".join(text.split()[:n])


def length_matched(base: dict[Key, dict], other: dict[Key, dict]) -> dict[str, float]:
    """Both models' mean ROUGE-L with each pair of responses cut to the shorter one's word count."""
    shared = sorted(base.keys() & other.keys())
    if not shared:
        raise SystemExit("the two samples files share no (dataset, seed, index): same data, seeds and limit?")
    ours, theirs = [], []
    by_seed: dict[int, list[float]] = {}
    for key in shared:
        a, b = base[key], other[key]
        n = min(len(a["response"].split()), len(b["response"].split()))
        ours.append(rouge_l(_first_words(a["response"], n), a["references"]))
        theirs.append(rouge_l(_first_words(b["response"], n), b["references"]))
        by_seed.setdefault(key[1], []).append(theirs[-1] - ours[-1])
    # the spread of the difference across sampling seeds, as the raw scores' spread is reported
    seed_diffs = [statistics.mean(d) for d in by_seed.values()]
    return {
        "pairs": len(shared),
        "base": statistics.mean(ours),
        "other": statistics.mean(theirs),
        "diff_seed_std": statistics.pstdev(seed_diffs) if len(seed_diffs) > 1 else 0.0,
        "seeds": len(seed_diffs),
        "base_words": statistics.mean(len(base[k]["response"].split()) for k in shared),
        "other_words": statistics.mean(len(other[k]["response"].split()) for k in shared),
    }
