"""What a ROUGE-L score stands for at small scale: floors and length-matched comparisons from `--samples` files.

    python -m learner.evaluate ... --samples a.jsonl      # one file per model, same data, seeds and limit
    python bench/rouge_calibration.py --base sft.jsonl --samples minillm.jsonl kd.jsonl teacher.jsonl

* floors: constant answers (no model at all) scored against the same references. Function words alone score
  several points of ROUGE-L F on Dolly, so a weak model's score starts there, not at 0.
* length-matched: ROUGE-L F rewards recall, so a longer answer can score higher without being better. For every
  (seed, example) both responses are cut to the shorter one's word count and scored again; the pair's difference
  is then not a difference in length.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.metrics import rouge_l  # noqa: E402

CONSTANT_ANSWERS = ("the", "The and of the a is to in and the")

Key = tuple[str, int, int]  # dataset file name, seed, example index


def load_samples(path: Path) -> dict[Key, dict]:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="samples of the model to compare against")
    parser.add_argument("--samples", type=Path, nargs="+", required=True, help="samples of the other models")
    args = parser.parse_args(argv)
    for path in [args.base, *args.samples]:
        if not path.is_file():
            raise SystemExit(f"no samples file {path} (write one with `python -m learner.evaluate --samples`)")
    base = load_samples(args.base)
    for text, score in floors(base).items():
        print(f"constant answer {text!r}: ROUGE-L {score:.2f}")
    print(
        f"{'model':<28} {'ROUGE-L':>8} {'words':>6} | length-matched: {'model':>6} {'base':>6} "
        f"{'diff':>6} {'+-':>5} ({args.base.stem}; +-: std of the diff across seeds)"
    )
    for path in args.samples:
        other = load_samples(path)
        m = length_matched(base, other)
        raw = statistics.mean(r["rouge_l"] for r in other.values())
        diff = m["other"] - m["base"]
        print(
            f"{path.stem:<28} {raw:>8.2f} {m['other_words']:>6.1f} | {'':>16}{m['other']:>6.2f} {m['base']:>6.2f} "
            f"{diff:>+6.2f} {m['diff_seed_std']:>5.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
