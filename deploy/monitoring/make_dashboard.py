"""Writes grafana_dashboard.json, the service's Grafana dashboard: `python deploy/monitoring/make_dashboard.py`.

Rows as a user reads a run: progress, the objective, the pipeline, faults. Every expression names a series the
service exports (actors/telemetry.py, with Ray's `ray_` prefix and `_total` on counters); a test checks them
against a live scrape of a short run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RATE = "[1m]"
ROWS: list[tuple[str, list[tuple[str, str, list[tuple[str, str]]]]]] = [
    (
        "Progress",
        [
            ("Phase progress", "percentunit", [("max(ray_distill_progress)", "share of the phase done")]),
            ("Updates per second", "ops", [(f"sum(rate(ray_distill_updates_total{RATE}))", "updates/s")]),
            (
                "Tokens per second by stage",
                "short",
                [
                    (f"sum(rate(ray_distill_sampled_tokens_total{RATE}))", "sampler"),
                    (f"sum(rate(ray_distill_teacher_scored_tokens_total{RATE}))", "teacher"),
                    (f"sum(rate(ray_distill_learner_tokens_total{RATE}))", "learner (rank 0)"),
                ],
            ),
            ("Samplers' weight version", "short", [("max(ray_distill_weight_version)", "version")]),
        ],
    ),
    (
        "Objective",
        [
            (
                "Losses",
                "short",
                [
                    ("max(ray_distill_loss)", "total"),
                    ("max(ray_distill_loss_single)", "single-step (reverse KL)"),
                    ("max(ray_distill_loss_long)", "long-term (PPO-clipped)"),
                    ("max(ray_distill_loss_pt)", "pre-training LM"),
                ],
            ),
            (
                "Reverse KL to the teacher (per token)",
                "short",
                [
                    ("max(ray_distill_reverse_kl)", "training batch"),
                    ("max(ray_distill_valid_reverse_kl)", "validation"),
                ],
            ),
            (
                "Validation",
                "short",
                [
                    ("max(ray_distill_valid_rouge_l)", "ROUGE-L"),
                    ("max(ray_distill_valid_response_tokens)", "mean response tokens"),
                ],
            ),
            ("Clip fraction", "percentunit", [("max(ray_distill_clip_fraction)", "tokens clipped")]),
            (
                "Importance ratio rho range",
                "short",
                [("min(ray_distill_rho_min)", "rho min"), ("max(ray_distill_rho_max)", "rho max")],
            ),
        ],
    ),
    (
        "Pipeline",
        [
            ("Replay queue depth", "short", [("max(ray_distill_queue_depth)", "batches waiting")]),
            ("Weight version lag", "short", [("max(ray_distill_weight_version_lag)", "versions behind")]),
            (
                "Busy share by stage",
                "percentunit",
                [
                    (f"sum(rate(ray_distill_sampler_busy_seconds_total{RATE}))", "samplers (sum)"),
                    (f"sum(rate(ray_distill_teacher_busy_seconds_total{RATE}))", "teachers (sum)"),
                    (f"sum(rate(ray_distill_learner_busy_seconds_total{RATE}))", "learner rank 0"),
                ],
            ),
            ("Learner step time", "s", [("max(ray_distill_learner_step_seconds)", "last update")]),
            (
                "Weight pushes per minute",
                "short",
                [("sum(rate(ray_distill_weight_pushes_total[2m])) * 60", "versions loaded (all samplers)")],
            ),
        ],
    ),
    (
        "Faults",
        [
            ("Faults recovered", "short", [("max(ray_distill_failures)", "lost batches, lost pushes, restarts")]),
            ("Skipped updates", "short", [("max(ray_distill_skipped_updates)", "non-finite loss or gradient")]),
        ],
    ),
]


def panel(pid: int, title: str, unit: str, targets: list[tuple[str, str]], x: int, y: int) -> dict[str, Any]:
    return {
        "id": pid,
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit, "custom": {"lineWidth": 2}}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [
            {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend, "datasource": {"uid": "${datasource}"}}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    pid, y = 1, 0
    for row, row_panels in ROWS:
        panels.append(
            {"id": pid, "type": "row", "title": row, "collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}}
        )
        pid, y = pid + 1, y + 1
        for i, (title, unit, targets) in enumerate(row_panels):
            panels.append(panel(pid, title, unit, targets, 8 * (i % 3), y + 8 * (i // 3)))
            pid += 1
        y += 8 * ((len(row_panels) + 2) // 3)
    return {
        "uid": "minillm-service",
        "title": "MiniLLM distillation service",
        "tags": ["minillm-service", "ray"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {"text": "Prometheus", "value": "Prometheus"},
                }
            ]
        },
        "panels": panels,
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("grafana_dashboard.json")
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(out)
