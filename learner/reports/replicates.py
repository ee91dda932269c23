"""Training-seed replicates in one table: the same method trained with several `seed=` values, each evaluated by
`learner.evaluate` (5 sampling seeds), summarised as mean ± spread over the *training* seeds.

bench/table1.py trains each method once and reports the spread over sampling seeds only; this adds the spread that
a second training run would show. Runs are `learner.evaluate --out/--samples` files in WORK/eval:

    python -m bench.seed_replicates --work runs/table1-healed --base sft \\
        --group minillm=minillm,minillm-s20,minillm-s30 --group control=sft-more,sft-more-s20,sft-more-s30 \\
        --pair minillm:control

Per run and per group: raw ROUGE-L (the run's mean over sampling seeds), ROUGE-L length-matched against `--base`,
mean response tokens, share at the length cap, reverse and forward KL per token, test LM loss. `--pair A:B`
compares group A's i-th run with group B's i-th run length-matched (same training seed), then over the pairs.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common.metrics import mean_and_spread
from common.rouge_calibration import Key, length_matched, load_samples
from learner.reports.table1 import at_cap_share

COLUMNS = ("rouge_l", "matched_vs_base", "tokens", "at_cap_pct", "reverse_kl_token", "forward_kl_token", "lm_loss")


def run_row(work: Path, run: str, samples: dict[Key, dict], base: dict, max_new_tokens: int) -> dict[str, float]:
    """One evaluated run's figures (the first dataset of its eval file) beside its loaded samples."""
    res = next(iter(json.loads((work / "eval" / f"{run}.json").read_text())["datasets"].values()))
    matched = length_matched(base, samples)
    return {
        "rouge_l": res["rouge_l_mean"],
        "matched_vs_base": matched["other"] - matched["base"],
        "tokens": statistics.mean(r["tokens"] for r in samples.values()),
        "at_cap_pct": at_cap_share({run: samples}, max_new_tokens)[run],
        "reverse_kl_token": res["reverse_kl_token"],
        "forward_kl_token": res["forward_kl_token"],
        "lm_loss": res["lm_loss"],
    }


def load_run(work: Path, run: str) -> dict[Key, dict]:
    """A run's samples, after checking that both of its evaluation files exist."""
    out, samples_path = work / "eval" / f"{run}.json", work / "eval" / f"{run}.samples.jsonl"
    for path in (out, samples_path):
        if not path.is_file():
            raise SystemExit(f"no {path}: evaluate the run with `python -m learner.evaluate --out ... --samples ...`")
    return load_samples(samples_path)


def parse_group(text: str) -> tuple[str, list[str]]:
    name, sep, runs = text.partition("=")
    if not sep or not name or not runs:
        raise argparse.ArgumentTypeError(f"--group {text!r}: expected NAME=run,run,...")
    return name, [r for r in runs.split(",") if r]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="bench.table1's work folder (its eval/)")
    parser.add_argument("--base", default="sft", help="run the length-matched column compares against")
    parser.add_argument("--group", type=parse_group, action="append", required=True, help="NAME=run,run,...")
    parser.add_argument("--pair", action="append", default=[], help="A:B, two groups of equal size")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="the evaluation's cap, for the cap share")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    base_path = args.work / "eval" / f"{args.base}.samples.jsonl"
    if not base_path.is_file():
        raise SystemExit(f"no {base_path}: --base names a run evaluated with --samples")
    base = load_samples(base_path)
    groups = dict(args.group)
    samples = {run: load_run(args.work, run) for runs in groups.values() for run in runs}
    rows = {run: run_row(args.work, run, samples[run], base, args.max_new_tokens) for run in samples}

    head = f"{'run':<16} {'ROUGE-L':>8} {'vs ' + args.base + ' (len-m.)':>16} {'tokens':>7} {'at cap %':>8} "
    head += f"{'rKL/tok':>8} {'fKL/tok':>8} {'LM loss':>8}"
    print(head)
    result: dict = {"runs": rows, "groups": {}, "pairs": {}}
    for name, runs in groups.items():
        for run in runs:
            r = rows[run]
            print(
                f"{run:<16} {r['rouge_l']:>8.2f} {r['matched_vs_base']:>+16.2f} {r['tokens']:>7.1f} "
                f"{r['at_cap_pct']:>8.0f} {r['reverse_kl_token']:>8.3f} {r['forward_kl_token']:>8.3f} "
                f"{r['lm_loss']:>8.3f}"
            )
        stats = {col: mean_and_spread([rows[run][col] for run in runs]) for col in COLUMNS}
        result["groups"][name] = {col: {"mean": m, "std": s} for col, (m, s) in stats.items()}
        cells = " ".join(f"{m:.2f}±{s:.2f}" for m, s in stats.values())
        print(f"  {name} over {len(runs)} training seed(s): {cells}")
    for pair in args.pair:
        a, sep, b = pair.partition(":")
        if not sep or a not in groups or b not in groups or len(groups[a]) != len(groups[b]):
            raise SystemExit(f"--pair {pair!r}: two --group names with the same number of runs")
        diffs = []
        for run_a, run_b in zip(groups[a], groups[b], strict=True):
            m = length_matched(samples[run_b], samples[run_a])
            diffs.append(m["other"] - m["base"])
            print(f"{run_a} vs {run_b}, length-matched: {m['other']:.2f} vs {m['base']:.2f} ({diffs[-1]:+.2f})")
        mean, spread = mean_and_spread(diffs)
        result["pairs"][pair] = {"diffs": diffs, "mean": mean, "std": spread}
        print(f"  {a} - {b} over {len(diffs)} training seed(s): {mean:+.2f} ± {spread:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0
