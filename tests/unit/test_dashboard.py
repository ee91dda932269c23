"""The Grafana dashboard against the metrics the service defines (the live check against a run's scrape is in
tests/integration/test_monitoring.py): it loads as JSON, is what make_dashboard.py writes, and plots every metric
actors/telemetry.py defines under the name Ray exports (`ray_` prefix, `_total` on counters), and nothing else."""

import importlib.util
import json
import re
from pathlib import Path

from actors.telemetry import COUNTERS, GAUGES

ROOT = Path(__file__).resolve().parents[2]
BOARD = ROOT / "deploy" / "monitoring" / "grafana_dashboard.json"


def _generator():
    spec = importlib.util.spec_from_file_location("make_dashboard", BOARD.with_name("make_dashboard.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dashboard_is_generated_and_names_every_defined_metric():
    board = json.loads(BOARD.read_text())
    assert board == _generator().dashboard()  # regenerate with python deploy/monitoring/make_dashboard.py
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    named = {n for e in exprs for n in re.findall(r"\bray_distill_[a-z_]+", e)}
    exported = {f"ray_{n}_total" for n in COUNTERS} | {f"ray_{n}" for n in GAUGES}
    assert named == exported
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == ["Progress", "Objective", "Pipeline", "Faults"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
