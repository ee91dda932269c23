"""learner.report on hand-made run folders: the plots each kind of run can have, the HTML referencing exactly them,
a killed run's cut last line, and the CLI's one-line error for a folder that is no run."""

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="the report needs matplotlib (pip install -e '.[report]')")

from learner.report import main, write_report  # noqa: E402
from learner.report_plots import busy_shares, fault_steps  # noqa: E402


def _sft_records(n: int = 6) -> list[dict]:
    out = []
    for s in range(1, n + 1):
        r = {"phase": "sft", "global_step": s, "step": s, "loss": 3.0 - 0.1 * s, "time": float(s)}
        if s % 3 == 0:
            r.update(valid_loss=3.2 - 0.1 * s, best=True)
        out.append(r)
    return out


def _minillm_records(start: int, n: int = 6, fault_at: int = 4) -> list[dict]:
    out = []
    for s in range(1, n + 1):
        r = {
            "phase": "minillm",
            "global_step": start + s,
            "step": s,
            "loss": 2.0,
            "loss_single": 0.5,
            "loss_long": 0.4,
            "loss_pt": 1.1,
            "reverse_kl": 0.9 - 0.05 * s,
            "rho_min": 0.8,
            "rho_mean": 1.0,
            "rho_max": 1.3,
            "clip_fraction": 0.05,
            "mean_response_tokens": 20.0 + s,
            "sampler_tokens_per_s": 900.0,
            "teacher_tokens_per_s": 1500.0,
            "learner_tokens_per_s": 400.0,
            "queue_depth": s % 2,
            "version_lag": 1,
            "failures": 1 if s >= fault_at else 0,
            "time": 10.0 + 2 * s,
            "update_seconds": 0.8,
            "wait_seconds": 0.5,
            "sample_seconds": 1.2,
            "score_seconds": 0.3,
        }
        if s % 3 == 0:
            r.update(eval_rouge_l=5.0 + s, eval_reverse_kl_token=0.8, eval_response_tokens=22.0, best=True)
        out.append(r)
    return out


def _eval(step: int) -> dict:
    return {
        "phase": "eval",
        "label": f"x-{step}",
        "global_step": step,
        "eval_rouge_l": 6.0,
        "eval_reverse_kl_token": 0.85,
        "eval_response_tokens": 21.0,
    }


def _folder(tmp_path: Path, records: list[dict], summary: dict | None, cut_tail: bool = False) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    text = "".join(json.dumps(r) + "\n" for r in records)
    if cut_tail:
        text += '{"phase": "minillm", "global_st'  # the line a SIGKILLed driver was writing
    (run / "metrics.jsonl").write_text(text)
    (run / "config.yaml").write_text("method: minillm\n")
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def _check(run: Path) -> tuple[str, set[str]]:
    page = (run / "report.html").read_text()
    referenced = set(re.findall(r"src='plots/([^']+)'", page))
    written = {p.name for p in (run / "plots").glob("*.png")}
    assert referenced == written and written
    assert all((run / "plots" / f).stat().st_size > 1000 for f in written)
    return page, written


def test_minillm_run_gets_every_plot(tmp_path):
    records = _sft_records() + [_eval(6)] + _minillm_records(6)
    run = _folder(tmp_path, records, {"method": "minillm", "final": {"rouge_l": 8.0}, "wall_seconds": 90.0})
    write_report(str(run))
    page, written = _check(run)
    assert written == {
        "losses.png",
        "reverse_kl.png",
        "validation.png",
        "length.png",
        "rho_clip.png",
        "throughput.png",
        "busy.png",
        "pipeline.png",
    }
    assert "final.rouge_l" in page and "finished" in page and "Faults recovered at global steps [10]" in page


def test_sft_only_run_gets_what_it_has(tmp_path):
    run = _folder(tmp_path, _sft_records() + [_eval(6)], {"method": "sft", "best_valid_rouge_l": 6.0})
    write_report(str(run))
    _, written = _check(run)
    assert written == {"losses.png", "reverse_kl.png", "validation.png", "length.png"}


def test_killed_run_without_summary(tmp_path):
    run = _folder(tmp_path, _sft_records() + _minillm_records(6)[:2], None, cut_tail=True)
    out = tmp_path / "elsewhere"
    write_report(str(run), str(out))
    page, _ = _check(out)
    assert "did not finish" in page and "global step 8, phase minillm" in page


def test_fault_and_busy_helpers():
    records = _minillm_records(0)
    assert fault_steps(records) == ([4.0], [])
    shares = busy_shares(records)  # 2 s between collections
    assert shares["learner"][1][0] == pytest.approx(0.4) and shares["sampler"][1][0] == pytest.approx(0.6)


def test_cli_names_a_folder_without_a_run(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
