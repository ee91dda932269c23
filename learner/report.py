"""A run's report: `python -m learner.report RUN [--out DIR]` writes report.html and its PNG plots.

RUN is a run folder (a local path or a storage URL such as s3://bucket/run). The plots cover everything in
metrics.jsonl (learner/report_plots.py); summary.json's results become a table. A run that stopped early, or has
no MiniLLM phase, gets the plots of what it logged. Written into RUN (report.html, plots/*.png) unless --out is
given. The driver writes it at the end of every run (`logging.report: true`). Needs matplotlib (the `report`
extra).
"""

from __future__ import annotations

import argparse
import html
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import storage
from learner.report_plots import FIGURES, Record, fault_steps


class ReportError(ValueError):
    """The folder holds no run to report on (the message says why)."""


def load_run(run: str) -> tuple[list[Record], dict[str, Any] | None, str | None]:
    """metrics.jsonl's records (a last line cut by a kill is skipped), summary.json and config.yaml when present."""
    url = storage.canonical(run)
    metrics = storage.join(url, "metrics.jsonl")
    if not storage.exists(metrics):
        raise ReportError(f"{run} has no metrics.jsonl: not a run folder (or the run never started)")
    records = []
    for line in storage.read_text(metrics).splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the line a killed driver was writing
    summary_url, config_url = storage.join(url, "summary.json"), storage.join(url, "config.yaml")
    summary = json.loads(storage.read_text(summary_url)) if storage.exists(summary_url) else None
    config = storage.read_text(config_url) if storage.exists(config_url) else None
    return records, summary, config


def render_plots(records: list[Record], out: Path) -> list[tuple[str, str, str]]:
    """Each figure with something to show, as out/<file>; returns (file, title, caption) of those written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    out.mkdir(parents=True, exist_ok=True)
    for fig_spec in FIGURES:
        fig, ax = plt.subplots(figsize=(8, 4))
        try:
            if not fig_spec.draw(records, ax):
                continue
            if not any(a.get_legend() for a in fig.axes) and ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
            ax.set_xlabel("global step")
            ax.set_title(fig_spec.title)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(out / fig_spec.file, dpi=80)
            written.append((fig_spec.file, fig_spec.title, fig_spec.caption))
        finally:
            plt.close(fig)
    return written


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in data.items():
        if isinstance(value, dict) and value and prefix == "":
            rows.extend(_flatten(value, f"{key}."))
        else:
            rows.append((prefix + key, value))
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | dict):
        text = json.dumps(value)
        return text if len(text) < 200 else text[:200] + " ..."
    return str(value)


def run_state(records: list[Record], summary: dict[str, Any] | None) -> str:
    """One line on how the run ended, from what it wrote."""
    last = records[-1] if records else {}
    where = f"global step {last.get('global_step', 0)}, phase {last.get('phase', '-')}"
    if summary is None:
        return f"no summary.json: the run did not finish (last record: {where})"
    wall = summary.get("wall_seconds")
    return f"finished ({where}" + (f", {wall:.0f} s)" if isinstance(wall, int | float) else ")")


def render_html(
    name: str,
    records: list[Record],
    summary: dict[str, Any] | None,
    config: str | None,
    plots: list[tuple[str, str, str]],
) -> str:
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Run report: {esc(name)}</title>",
        "<style>body{font-family:sans-serif;max-width:900px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse}td{border:1px solid #ccc;padding:2px 8px;font-size:90%}"
        "img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:90%}</style></head><body>",
        f"<h1>Run report: {esc(name)}</h1>",
        f"<p>{esc(run_state(records, summary))}. {len(records)} records in metrics.jsonl.</p>",
    ]
    faults, skipped = fault_steps(records)
    if faults or skipped:
        parts.append(
            f"<p>Faults recovered at global steps {esc(str([int(x) for x in faults]))}; "
            f"updates skipped at {esc(str([int(x) for x in skipped]))}.</p>"
        )
    if summary is not None:
        parts.append("<h2>Summary (summary.json)</h2><table>")
        parts += [f"<tr><td>{esc(k)}</td><td>{esc(_cell(v))}</td></tr>" for k, v in _flatten(summary)]
        parts.append("</table>")
    parts.append("<h2>Curves (metrics.jsonl)</h2>")
    if not plots:
        parts.append("<p>Nothing to plot: the run logged no update or evaluation.</p>")
    for file, title, caption in plots:
        parts.append(
            f"<figure><img src='plots/{esc(file)}' alt='{esc(title)}'><figcaption><b>{esc(title)}.</b> "
            f"{esc(caption)}</figcaption></figure>"
        )
    if config is not None:
        parts.append(f"<details><summary>config.yaml</summary><pre>{esc(config)}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run: str, out: str | None = None) -> str:
    """report.html and plots/ for the run folder `run`, into `out` (default: the run folder); returns its URL."""
    records, summary, config = load_run(run)
    target = storage.canonical(out or run)
    with tempfile.TemporaryDirectory() as tmp:
        plots = render_plots(records, Path(tmp) / "plots")
        for file, _, _ in plots:  # storage.write_bytes: a local folder or an object store
            storage.write_bytes(storage.join(target, "plots", file), (Path(tmp) / "plots" / file).read_bytes())
    page = render_html(storage.name(storage.canonical(run)), records, summary, config, plots)
    report = storage.join(target, "report.html")
    storage.write_text(report, page)
    return report


def write_at_end(run_dir: str) -> None:
    """The driver's call after a run: never raises (a report must not turn a finished run into a failed one)."""
    try:
        print(f"[report] {write_report(run_dir)}", flush=True)
    except ImportError as exc:
        print(f"[report] not written: {exc.name or exc} is not installed (pip install -e '.[report]')", flush=True)
    except Exception as exc:  # noqa: BLE001 - the run's results are already in storage
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"[report] not written: {type(exc).__name__}: {first}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m learner.report", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run folder: a local path or a storage URL")
    parser.add_argument("--out", default=None, help="where to write report.html and plots/ (default: the run folder)")
    args = parser.parse_args(argv)
    try:
        print(write_report(args.run, args.out))
    except (ReportError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"error: {exc.name or exc} is not installed: pip install -e '.[report]'", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
