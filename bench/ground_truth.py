"""The ground-truth experiment (issue 15 item 3; docs/ground_truth.md): the paper's Figure 2 on sequences.

A synthetic language whose response distribution is known exactly (common/synthetic.py: per topic a few dominant
modes and many rare responses, probability 0 everywhere else), a teacher fitted to it exactly, a 1-layer student
too small to fit it, and SFT / KD / SeqKD / MiniLLM distilling the teacher into that student through the service
(`python -m learner.main --config configs/ground_truth.yaml`). Every final student is then measured against the
teacher and the ground truth: sequence-level reverse and forward KL, precision (student mass on responses the
ground truth gives probability >= threshold) and coverage of the ground truth's modes.

    python -m bench.ground_truth [--work runs/ground_truth] [--seeds 1 2 3] [--methods sft kd seqkd [sft-long] minillm]
        [--json docs/ground_truth.json] [--plot docs/ground_truth.png] [--set key=value ...]

Models and data are built once in WORK/assets (cached by a hash of the setup); each run is skipped when its
summary.json exists, so an interrupted bench resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from common.synthetic import LanguageSpec
from learner.reports.ground_truth import (
    DEFAULT_METHODS,
    METHODS,
    ON_POLICY,
    ROOT,
    SEEDS,
    Measuring,
    Setup,
    build_assets,
    measure_model,
    prefix_statistics,
    run_budget,
    run_method,
)

COLUMNS = (
    ("precision_exact", "precision", "{:.3f}"),
    ("coverage_expected", "coverage", "{:.3f}"),
    ("rare_coverage_expected", "rare coverage", "{:.3f}"),
    ("mode_mass", "mode mass", "{:.3f}"),
    ("rare_mass", "rare mass", "{:.3f}"),
    ("reverse_kl", "KL[q||p]", "{:.2f}"),
    ("forward_kl", "KL[p||q]", "{:.2f}"),
)


# the synthetic languages (common/synthetic.py): `minor` turns the 20 rare responses of 0.01 into 4 minor modes of
# 0.05, shorter, to see whether any method covers the ground truth's minor responses
LANGUAGES = {
    "default": LanguageSpec(),
    "minor": LanguageSpec(num_rare=4, rare_len=(4, 6)),
}

NAMES = {"init": "student before training", "sft-long": "sft-long (control: 4x the SFT updates)"}


def per_method(results: dict, key: str) -> dict[str, list[float]]:
    """{label: [value per seed]} for the initial student and each method, in the order they were run."""
    out: dict[str, list[float]] = {}
    for label in ["init", *results["methods"]]:
        out[label] = [results["runs"][f"{label}-s{s}"][key] for s in results["seeds"]]
    return out


def table(results: dict) -> str:
    from common.metrics import mean_and_spread

    seeds = results["seeds"]
    head = "| model | " + " | ".join(name for _, name, _ in COLUMNS) + " |"
    lines = [head, "| --- |" + " ---: |" * len(COLUMNS)]
    teacher = results["teacher"]
    lines.append("| teacher | " + " | ".join(fmt.format(teacher[k]) for k, _, fmt in COLUMNS) + " |")
    cols = {k: per_method(results, k) for k, _, _ in COLUMNS}
    for label in ["init", *results["methods"]]:
        cells = []
        for k, _, fmt in COLUMNS:
            mean, spread = mean_and_spread(cols[k][label])
            cells.append(f"{fmt.format(mean)} ± {fmt.format(spread)}" if len(seeds) > 1 else fmt.format(mean))
        name = NAMES.get(label, label)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Top: precision against coverage of the ground truth's modes and of its rare responses, a point per method
    and seed; where each model's probability goes (modes, rare responses, void). Bottom: a bar per method (mean
    over seeds, a dot per seed) for precision and the two KLs, the teacher dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    palette = plt.get_cmap("tab20").colors
    colors = {m: palette[i % len(palette)] for i, m in enumerate(METHODS)}
    markers = {m: "osD^v<>ph*Xd"[i % 12] for i, m in enumerate(METHODS)}
    fig, axes = plt.subplots(2, 3, figsize=(16, 9.5))
    precision = per_method(results, "precision_exact")
    for ax, key, title in (
        (axes[0][0], "coverage_expected", "coverage of g's 3 modes (32 samples)"),
        (axes[0][1], "rare_coverage_expected", "coverage of g's rare responses (32 samples)"),
    ):
        cov = per_method(results, key)
        for m in methods:
            ax.scatter(cov[m], precision[m], color=colors[m], marker=markers[m], s=36, label=m, alpha=0.85)
        if key in results["teacher"]:
            ax.scatter(
                [results["teacher"][key]],
                [results["teacher"]["precision_exact"]],
                color="k",
                marker="*",
                s=120,
                label="teacher",
            )
        ax.set_xlabel(title, fontsize=9)
        ax.set_ylabel("precision: q(g(y) >= 1e-3)", fontsize=9)
    axes[0][0].legend(fontsize=7, loc="lower right", ncol=2)
    ax = axes[0][2]
    names = ["ground truth", "teacher", *methods]
    modes = [sum(results["spec_mode_probs"]), results["teacher"]["mode_mass"]]
    rare = [1 - modes[0], results["teacher"]["rare_mass"]]
    for m in methods:
        modes.append(sum(per_method(results, "mode_mass")[m]) / len(results["seeds"]))
        rare.append(sum(per_method(results, "rare_mass")[m]) / len(results["seeds"]))
    void = [1 - a - b for a, b in zip(modes, rare, strict=True)]
    x = range(len(names))
    ax.bar(x, modes, color="C2", label="modes")
    ax.bar(x, rare, bottom=modes, color="C1", label="rare responses")
    ax.bar(x, void, bottom=[a + b for a, b in zip(modes, rare, strict=True)], color="0.6", label="void (g = 0)")
    ax.set_xticks(list(x), names, rotation=60, fontsize=8, ha="right")
    ax.set_title("where the probability goes (mean)", fontsize=10)
    ax.legend(fontsize=8)
    panels = (
        ("precision_exact", "precision: q(g(y) >= 1e-3)"),
        ("reverse_kl", "reverse KL[q||p], nats/response"),
        ("forward_kl", "forward KL[p||q], nats/response"),
    )
    for ax, (key, title) in zip(axes[1], panels, strict=True):
        vals = per_method(results, key)
        for i, m in enumerate(methods):
            ax.bar(i, sum(vals[m]) / len(vals[m]), color=colors[m], alpha=0.85)
            ax.scatter([i] * len(vals[m]), vals[m], color="k", s=10, zorder=3)
        ax.axhline(results["teacher"][key], color="k", ls="--", lw=1, label="teacher")
        ax.set_xticks(range(len(methods)), methods, rotation=60, fontsize=8, ha="right")
        ax.set_title(title, fontsize=10)
    fig.suptitle(
        f"Distilling a known distribution: seeds {results['seeds']} (a point / dot each), bars = mean",
        fontsize=11,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "ground_truth")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "ground_truth.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "ground_truth.png")
    parser.add_argument(
        "--language",
        choices=sorted(LANGUAGES),
        default="default",
        help="default: 3 modes + 20 rare responses per prompt; minor: 3 modes + 4 minor ones of 0.05 (own --work)",
    )
    parser.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every run")
    parser.add_argument("--retries", type=int, default=1, help="reruns of a run that failed (e.g. killed from outside)")
    parser.add_argument("--report-only", action="store_true", help="only redo the table and plot from --json")
    args = parser.parse_args(argv)
    if args.report_only:
        results = json.loads(args.json.read_text())
        print(table(results), flush=True)
        plot(results, args.plot)
        return 0
    if {"sft-long", *ON_POLICY} & set(args.methods) and "sft" not in args.methods:
        parser.error("the on-policy methods and sft-long start from the sft run's checkpoint: include sft")
    args.methods = [m for m in METHODS if m in args.methods]  # sft before the runs that start from it
    torch.set_num_threads(2)
    work = args.work.resolve()
    t0 = time.time()
    assets = build_assets(work, Setup(language=LANGUAGES[args.language]))
    how = Measuring()
    results: dict = {"teacher": measure_model(assets, assets.teacher, how), "runs": {}}
    for seed in args.seeds:
        out = work / f"s{seed}"
        results["runs"][f"init-s{seed}"] = measure_model(assets, assets.student_init(seed), how)
        for method in args.methods:
            final = run_method(assets, method, seed, out, args.set, retries=args.retries)
            results["runs"][f"{method}-s{seed}"] = measure_model(assets, final, how)
            results["runs"][f"{method}-s{seed}"]["run_seconds"] = float(
                (final.parents[1] / "bench_seconds.txt").read_text()
            )
            results["runs"][f"{method}-s{seed}"]["budget"] = run_budget(final.parents[1])
            results["runs"][f"{method}-s{seed}"]["prefixes"] = prefixes_of(assets, final)
            print(f"[ground-truth] {method} seed {seed}: {_short(results['runs'][f'{method}-s{seed}'])}", flush=True)
    results["setup"] = asdict(assets.setup)
    results["spec_mode_probs"] = list(assets.setup.language.mode_probs)
    results["measuring"] = asdict(how)
    results["teacher_fit"] = json.loads((assets.root / "teacher_fit.json").read_text())
    results["seeds"], results["methods"] = args.seeds, args.methods
    results["overrides"] = args.set
    results["wall_seconds"] = round(time.time() - t0, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results), flush=True)
    plot(results, args.plot)
    print(f"[ground-truth] wrote {args.json} and {args.plot} ({results['wall_seconds'] / 60:.1f} min)", flush=True)
    return 0


def prefixes_of(assets, model_dir: Path) -> dict[str, float]:
    """prefix_statistics over 64 samples of each prompt: where an on-policy objective's positions lie."""
    from common.models import load_model, load_tokenizer
    from common.synthetic import tokenize_language

    tok = load_tokenizer(assets.tokenizer)
    student, teacher = load_model(model_dir).eval(), load_model(assets.teacher).eval()
    topics = tokenize_language(assets.language, tok)
    return prefix_statistics(student, teacher, topics, len(tok), tok.eos_token_id, Measuring(samples_per_topic=64))


def _short(m: dict) -> str:
    return (
        f"precision {m['precision_exact']:.3f} coverage {m['coverage_expected']:.3f} "
        f"rKL {m['reverse_kl']:.3f} fKL {m['forward_kl']:.3f}"
    )


if __name__ == "__main__":
    sys.exit(main())
