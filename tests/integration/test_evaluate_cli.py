"""`python -m learner.evaluate`: per-seed sampling through vLLM, ROUGE-L table and JSON, list references."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]


def test_evaluate_cli_writes_table_and_json(tiny_models, tmp_path):
    data = tmp_path / "mini.jsonl"
    rows = [
        {"instruction": "Name a colour.", "context": "", "response": ["Red.", "Blue is a colour."]},
        {"instruction": "Summarise the text.", "context": "The cat sat on the mat.", "response": "A cat sat."},
        {"instruction": "What is two plus two?", "context": "", "response": "Four."},
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "learner.evaluate",
            "--model",
            str(tiny_models.teacher),
            "--data",
            str(data),
            "--seeds",
            "10",
            "20",
            "--max-new-tokens",
            "16",
            "--out",
            str(out),
            "--samples",
            str(tmp_path / "samples.jsonl"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ROUGE-L" in proc.stdout and "mini.jsonl" in proc.stdout
    res = json.loads(out.read_text())
    ds = res["datasets"][str(data)]
    assert ds["n_prompts"] == 3 and set(ds["per_seed"]) == {"10", "20"}
    scores = [s["rouge_l"] for s in ds["per_seed"].values()]
    assert all(0.0 <= s <= 100.0 for s in scores)
    assert ds["rouge_l_mean"] == pytest.approx(sum(scores) / 2)
    assert ds["lm_loss"] > 0 and "reverse_kl_seq" not in ds  # KL measures only with --teacher
    # every response is written, and a seed's score is the mean of its responses' scores
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and {(r["seed"], r["index"]) for r in samples} == {
        (s, i) for s in (10, 20) for i in range(3)
    }
    assert samples[0]["references"] == ["Red.", "Blue is a colour."] and "Name a colour." in samples[0]["prompt"]
    for seed in (10, 20):
        mine = [r["rouge_l"] for r in samples if r["seed"] == seed]
        assert sum(mine) / 3 == pytest.approx(ds["per_seed"][str(seed)]["rouge_l"])
    assert all(0 <= r["tokens"] <= 16 for r in samples)


def test_evaluate_cli_teacher_measures(tiny_models, tmp_path):
    """--teacher adds reverse KL (student samples), forward KL (teacher samples) and ExAccErr; a model measured
    against itself has zero KL."""
    data = Path(ROOT / "data/dolly/valid.jsonl").resolve()
    runs = {}
    for name, model in (("student", tiny_models.student), ("self", tiny_models.teacher)):
        out = tmp_path / f"{name}.json"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "learner.evaluate",
                "--model",
                str(model),
                "--teacher",
                str(tiny_models.teacher),
                "--data",
                str(data),
                "--limit",
                "12",
                "--kl-prompts",
                "6",
                "--seeds",
                "10",
                "--max-new-tokens",
                "12",
                "--out",
                str(out),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "rev KL" in proc.stdout and "ExAccErr" in proc.stdout
        runs[name] = json.loads(out.read_text())["datasets"][str(data)]
    student, itself = runs["student"], runs["self"]
    assert student["kl_prompts"] == 6 and student["exacc_length"] == 12
    assert student["reverse_kl_seq"] > 0.1 and student["forward_kl_seq"] > 0.1
    assert student["reverse_kl_token"] <= student["reverse_kl_seq"]
    assert student["exacc_err_pct"] is not None
    assert abs(itself["reverse_kl_seq"]) < 1e-4 and abs(itself["forward_kl_seq"]) < 1e-4
    assert itself["exacc_err_pct"] is None  # undefined when the per-step error is 0


def test_evaluate_cli_reports_bad_data(tiny_models, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "x", "response": "y"}\n{oops\n')
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "learner.evaluate",
            "--model",
            str(tiny_models.teacher),
            "--data",
            str(data),
            "--seeds",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2 and "bad.jsonl:2" in proc.stderr


def test_evaluate_cli_on_a_chat_set_with_the_chat_template(tmp_path):
    """A user's held-out chat set: rendered with the model's chat template, ROUGE-L over the rows with a reference,
    the KLs to the teacher on all of them."""
    from common.models import load_tokenizer
    from tests.bad_inputs import build_setup
    from tests.unit.test_formats import CHAT_TEMPLATE, chat_row

    setup = build_setup(tmp_path / "setup")
    tok = load_tokenizer(setup.student)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(setup.student))
    data = tmp_path / "chat.jsonl"
    rows = [chat_row(i) for i in range(6)] + [chat_row(9, answer=False)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, samples = tmp_path / "out.json", tmp_path / "samples.jsonl"
    argv = ["--model", str(setup.student), "--teacher", str(setup.teacher), "--data", str(data), "--format", "chat"]
    argv += ["--seeds", "1", "--max-new-tokens", "8", "--kl-prompts", "4", "--out", str(out), "--samples", str(samples)]
    proc = subprocess.run(
        [sys.executable, "-m", "learner.evaluate", *argv], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ds = json.loads(out.read_text())["datasets"][str(data)]
    assert ds["n_prompts"] == 7 and ds["n_with_references"] == 6 and ds["template"] == "chat"
    assert ds["rouge_l_mean"] is not None and ds["lm_loss"] > 0 and ds["reverse_kl_seq"] > 0
    written = [json.loads(line) for line in samples.read_text().splitlines()]
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour for item 0."}]
    assert written[0]["prompt"] == tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert written[-1]["references"] == [] and written[-1]["rouge_l"] is None
