"""Constant-answer ROUGE-L floors and length-matched comparisons from `python -m learner.evaluate --samples` files
(common/rouge_calibration.py says what each means).

    python -m bench.rouge_calibration --base sft.jsonl --samples minillm.jsonl kd.jsonl teacher.jsonl
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from common.rouge_calibration import floors, length_matched, load_samples


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
