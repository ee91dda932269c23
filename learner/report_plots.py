"""The run report's plots: one function per figure, each drawing what a run's metrics.jsonl holds for it.

Every plotter takes the records and a matplotlib Axes factory; it returns False (and the figure is not written)
when the run logged nothing it could show, e.g. no MiniLLM phase in an SFT-only run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

Record = dict[str, Any]
TRAIN_PHASES = ("sft", "kd", "seqkd", "heal")


def series(records: Iterable[Record], key: str, phase: str | None = None) -> tuple[list[float], list[float]]:
    """(global_step, value) of every record that has a number under `key` (and is of `phase` when given)."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if (phase is None or r.get("phase") == phase) and isinstance(v, int | float) and not isinstance(v, bool):
            xs.append(float(r.get("global_step", 0)))
            ys.append(float(v))
    return xs, ys


def fault_steps(records: list[Record]) -> tuple[list[float], list[float]]:
    """Global steps where the run recovered from a fault (its `failures` count went up) and where an update was
    skipped (non-finite loss or gradient norm)."""
    faults, skipped, seen = [], [], 0
    for r in records:
        f = r.get("failures")
        if isinstance(f, int) and f > seen:
            faults.append(float(r.get("global_step", 0)))
            seen = f
        if r.get("skipped"):
            skipped.append(float(r.get("global_step", 0)))
    return faults, skipped


def _mark_faults(ax: Any, records: list[Record]) -> None:
    faults, skipped = fault_steps(records)
    for i, x in enumerate(faults):
        ax.axvline(x, color="tab:red", linestyle="--", linewidth=1, label="fault recovered" if i == 0 else None)
    for i, x in enumerate(skipped):
        ax.axvline(x, color="tab:gray", linestyle=":", linewidth=1, label="update skipped" if i == 0 else None)


def _line(ax: Any, xy: tuple[list[float], list[float]], label: str, **kw: Any) -> bool:
    if not xy[0]:
        return False
    ax.plot(*xy, label=label, marker="." if len(xy[0]) < 40 else None, **kw)
    return True


def plot_losses(records: list[Record], ax: Any) -> bool:
    drew = False
    for phase in TRAIN_PHASES:
        drew |= _line(ax, series(records, "loss", phase), f"{phase} loss")
    for key in ("loss", "loss_single", "loss_long", "loss_pt"):
        drew |= _line(ax, series(records, key, "minillm"), f"minillm {key}")
    if drew:
        _mark_faults(ax, records)
        ax.set_ylabel("training loss")
    return drew


def plot_reverse_kl(records: list[Record], ax: Any) -> bool:
    drew = _line(ax, series(records, "reverse_kl", "minillm"), "training (per token, on sampled batches)")
    drew |= _line(ax, series(records, "eval_reverse_kl_token", "eval"), "validation (per token)", linewidth=2)
    if drew:
        ax.set_ylabel("reverse KL to the teacher")
    return drew


def plot_validation(records: list[Record], ax: Any) -> bool:
    """Validation ROUGE-L (left) and validation loss (right), with the kept checkpoint of each phase starred."""
    rouge = series(records, "eval_rouge_l", "eval")
    drew = _line(ax, rouge, "validation ROUGE-L", color="tab:blue")
    if drew:
        ax.set_ylabel("ROUGE-L")
    loss_ax = ax.twinx() if drew else ax
    loss = series(records, "valid_loss")
    drew_loss = _line(loss_ax, loss, "validation loss", color="tab:orange")
    if drew_loss:
        loss_ax.set_ylabel("validation loss")
    last_kept: dict[str, Record] = {}
    for r in records:  # a phase's last starred record is the checkpoint it kept
        if r.get("best"):
            last_kept[str(r.get("phase"))] = r
    for r in last_kept.values():
        x = float(r.get("global_step", 0))
        if isinstance(r.get("eval_rouge_l"), int | float) and drew:
            ax.plot([x], [r["eval_rouge_l"]], "*", color="black", markersize=14, label=f"kept ({r['phase']})")
        elif isinstance(r.get("valid_loss"), int | float) and drew_loss:
            loss_ax.plot([x], [r["valid_loss"]], "*", color="black", markersize=14, label=f"kept ({r['phase']})")
    if drew and drew_loss:  # one legend for both axes
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = loss_ax.get_legend_handles_labels()
        loss_ax.legend(h1 + h2, l1 + l2, fontsize=8)
    return drew or drew_loss


def plot_length(records: list[Record], ax: Any) -> bool:
    drew = _line(ax, series(records, "mean_response_tokens", "minillm"), "training samples (teacher-mixed)")
    drew |= _line(ax, series(records, "eval_response_tokens", "eval"), "validation (student alone)", linewidth=2)
    if drew:
        ax.set_ylabel("mean response tokens")
    return drew


def plot_rho_clip(records: list[Record], ax: Any) -> bool:
    drew = False
    for key in ("rho_min", "rho_mean", "rho_max"):
        drew |= _line(ax, series(records, key, "minillm"), key)
    if not drew:
        return False
    ax.set_ylabel("importance ratio rho")
    clip_ax = ax.twinx()
    _line(clip_ax, series(records, "clip_fraction", "minillm"), "clip fraction", color="tab:red", linestyle="--")
    clip_ax.set_ylabel("clip fraction")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = clip_ax.get_legend_handles_labels()
    clip_ax.legend(h1 + h2, l1 + l2, fontsize=8)
    return True


def busy_shares(records: list[Record]) -> dict[str, tuple[list[float], list[float]]]:
    """Per collection: each stage's seconds over the wall seconds since the previous collection (its share of the
    time the stage was busy; the sampler and the teacher of a batch that ran ahead count when it is consumed)."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    prev = None
    for r in records:
        if r.get("phase") != "minillm" or "update_seconds" not in r:
            continue  # a collection's last update carries the collection's section times
        t = float(r.get("time", 0.0))
        if prev is not None and t > prev:
            for stage, key in (
                ("sampler", "sample_seconds"),
                ("teacher", "score_seconds"),
                ("learner", "update_seconds"),
                ("driver waiting", "wait_seconds"),
            ):
                if isinstance(r.get(key), int | float):
                    xs, ys = out.setdefault(stage, ([], []))
                    xs.append(float(r["global_step"]))
                    ys.append(min(1.0, float(r[key]) / (t - prev)))
        prev = t
    return out


def plot_throughput(records: list[Record], ax: Any) -> bool:
    drew = False
    for key, label in (
        ("sampler_tokens_per_s", "sampler"),
        ("teacher_tokens_per_s", "teacher"),
        ("learner_tokens_per_s", "learner"),
    ):
        drew |= _line(ax, series(records, key, "minillm"), label)
    if drew:
        ax.set_ylabel("tokens/s while busy")
    return drew


def plot_busy(records: list[Record], ax: Any) -> bool:
    drew = False
    for stage, xy in busy_shares(records).items():
        drew |= _line(ax, xy, stage)
    if drew:
        ax.set_ylabel("busy share of wall time")
        ax.set_ylim(0, 1.05)
    return drew


def plot_pipeline(records: list[Record], ax: Any) -> bool:
    drew = _line(ax, series(records, "queue_depth", "minillm"), "replay queue depth", drawstyle="steps-post")
    drew |= _line(ax, series(records, "version_lag", "minillm"), "weight version lag", drawstyle="steps-post")
    if drew:
        _mark_faults(ax, records)
        ax.set_ylabel("batches / versions")
    return drew


@dataclass(frozen=True)
class Figure:
    file: str
    title: str
    caption: str
    draw: Callable[[list[Record], Any], bool]


FIGURES = (
    Figure(
        "losses.png",
        "Training losses",
        "Loss of every phase; MiniLLM's total and its terms. Dashed red: a "
        "fault the run recovered from (lost batch or push, learner restart); dotted gray: a skipped update.",
        plot_losses,
    ),
    Figure(
        "reverse_kl.png",
        "Reverse KL to the teacher",
        "Per-token reverse KL on each training batch and on the validation prompts.",
        plot_reverse_kl,
    ),
    Figure(
        "validation.png",
        "Validation",
        "Validation ROUGE-L and loss; the star marks the checkpoint each phase kept.",
        plot_validation,
    ),
    Figure(
        "length.png", "Response length", "Mean response length of the training samples and of validation.", plot_length
    ),
    Figure(
        "rho_clip.png",
        "Importance ratios",
        "Range and mean of rho (learner over sampler probability) and the share of tokens clipped.",
        plot_rho_clip,
    ),
    Figure(
        "throughput.png",
        "Throughput per stage",
        "Tokens per second of each stage while it works on a batch.",
        plot_throughput,
    ),
    Figure(
        "busy.png",
        "Busy share per stage",
        "Each stage's seconds per collection over the wall time between collections.",
        plot_busy,
    ),
    Figure(
        "pipeline.png",
        "Pipeline",
        "Replay queue depth and the weight-version lag of the batches the learner consumed, with fault markers.",
        plot_pipeline,
    ),
)
