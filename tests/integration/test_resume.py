"""Exact resume: a MiniLLM run whose driver is SIGKILLed after step K and resumed (resume=auto) logs the same losses,
reverse KL and sampled token ids at steps K+1..N as an uninterrupted run, bit for bit; a truncated newest checkpoint
is skipped for the one before it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from learner.checkpoint import check_complete, find_resume
from learner.lr_schedule import lr_at

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
STEPS, KILL_AFTER = 6, 4
COMPARED = ["loss", "loss_single", "loss_long", "loss_pt", "reverse_kl", "rho_min", "rho_max", "grad_norm"]
COMPARED += ["sampled_ids", "weight_version", "rollout_version", "mean_response_tokens", "batch_ids"]
COMPARED += ["logprob_gap_mean", "logprob_gap_max", "lr"]
WARMUP = 5  # the kill after step KILL_AFTER falls inside the lr warm-up: the resumed updates get the same lrs


def _args(out: Path, tiny_models, *extra: str, sft: bool = False) -> list[str]:
    phase1 = (
        ["learner.sft_steps=6", "learner.sft_eval_every=3"] if sft else [f"models.sft_checkpoint={tiny_models.student}"]
    )
    return [
        sys.executable,
        "-m",
        "learner.main",
        f"output_dir={out}",
        *phase1,
        f"learner.minillm_steps={STEPS}",
        "learner.batch_size=4",
        "learner.pretrain_batch_size=2",
        "sampler.max_new_tokens=16",
        "eval.max_new_tokens=16",
        "eval.every_steps=3",  # one validation between the checkpoints, one at the end
        "eval.num_prompts=8",
        "eval.kl_prompts=8",
        "data.max_valid_examples=40",
        "data.max_train_examples=200",
        "checkpoint.every_steps=2",
        "checkpoint.keep=3",
        "logging.wandb_mode=disabled",
        "logging.sampled_ids=true",
        f"learner.warmup_steps={WARMUP}",
        "learner.lr_schedule=cosine",
        *extra,
    ]


def _env() -> dict[str, str]:
    env = {
        **os.environ,
        "WANDB_MODE": "disabled",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)  # a private local Ray per run: killing the driver takes it down with it
    return env


def _run(args: list[str]) -> str:
    proc = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def _run_and_kill(args: list[str], marker: str) -> str:
    """Start the driver, SIGKILL it (a real kill: no clean-up runs) as soon as `marker` is printed; then make sure
    the processes it started (its local Ray) are gone."""
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, t0 = [], time.time()
    assert proc.stdout is not None
    for line in proc.stdout:
        out.append(line)
        if marker in line:
            children = psutil.Process(proc.pid).children(recursive=True)
            os.kill(proc.pid, signal.SIGKILL)
            break
        assert time.time() - t0 < 600, "the run never reached the kill point"
    else:
        pytest.fail("the driver ended before the kill point:\n" + "".join(out[-40:]))
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    _, alive = psutil.wait_procs(children, timeout=30)
    for p in alive:  # Ray's own processes outlived their driver: end them (they were started by this test's run)
        p.kill()
    psutil.wait_procs(alive, timeout=30)
    return "".join(out)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _steps(run_dir: Path) -> dict[int, dict]:
    recs = [r for r in _records(run_dir) if r["phase"] == "minillm"]
    steps = [r["step"] for r in recs]
    assert steps == sorted(set(steps)), f"metrics.jsonl repeats or skips steps: {steps}"
    return {r["step"]: r for r in recs}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models):
    base = tmp_path_factory.mktemp("resume")
    _run(_args(base / "uninterrupted", tiny_models))
    killed = _run_and_kill(_args(base / "killed", tiny_models), f"[checkpoint] step {KILL_AFTER} ")
    assert f"[minillm] step {STEPS}/{STEPS}" not in killed
    shutil.copytree(base / "killed", base / "truncated", symlinks=True)  # as the kill left it, for the partial case
    return base


def _compare(a: dict[int, dict], b: dict[int, dict], steps: range) -> None:
    missing = "<missing>"  # a key absent from a record is a difference, even when both lack it
    differ = [
        f"step {s} {key}: resumed {b[s].get(key, missing)!r} vs uninterrupted {a[s].get(key, missing)!r}"
        for s in steps
        for key in COMPARED
        if key not in a[s] or key not in b[s] or b[s][key] != a[s][key]
    ]
    assert not differ, "\n".join(differ)  # every difference, not only the first: they tell where it starts


def test_resume_after_sigkill_equals_uninterrupted(runs, tiny_models):
    out = _run(_args(runs / "killed", tiny_models, "resume=auto"))
    assert f"[resume] minillm from step {KILL_AFTER}" in out
    a, b = _steps(runs / "uninterrupted"), _steps(runs / "killed")
    assert sorted(b) == list(range(1, STEPS + 1))  # metrics.jsonl continued: every step once
    # bitwise (== on the floats JSON wrote), the steps before the kill included: the two runs are one program until
    # the kill, whatever the timing (batches are consumed in launch order: step s takes batch s - 1)
    _compare(a, b, range(1, STEPS + 1))
    assert [a[s]["batch_ids"] for s in sorted(a)] == [[s - 1] for s in sorted(a)]
    # the lrs are the schedule's (tiny.yaml's lr 3e-4), warm-up across the kill included
    assert [b[s]["lr"] for s in sorted(b)] == pytest.approx(
        [lr_at(s - 1, 3e-4, "cosine", WARMUP, STEPS) for s in sorted(b)]
    )
    evals = [[r for r in _records(d) if r["phase"] == "eval"] for d in (runs / "uninterrupted", runs / "killed")]
    assert [e["eval_reverse_kl_seq"] for e in evals[1]] == [e["eval_reverse_kl_seq"] for e in evals[0]]
    summary = json.loads((runs / "killed" / "summary.json").read_text())
    assert summary["resumed_from"].endswith(f"step-{KILL_AFTER:07d}")
    assert (runs / "killed" / "checkpoints" / "final" / "config.json").is_file()


def test_truncated_checkpoint_is_skipped_for_the_previous_one(runs, capsys):
    state = runs / "truncated" / "checkpoints" / "state"
    newest = state / f"step-{KILL_AFTER:07d}"
    assert check_complete(newest) is None
    for f in newest.iterdir():  # truncate the newest checkpoint's shards and rank files (its metadata stays)
        if f.is_file() and f.name != "checkpoint.json":
            with f.open("r+b") as fh:
                fh.truncate(f.stat().st_size // 2)
    assert "recorded" in (check_complete(newest) or "")
    point = find_resume("auto", runs / "truncated")
    assert (
        point is not None and point.path.endswith(f"/step-{KILL_AFTER - 2:07d}") and point.phase_step == KILL_AFTER - 2
    )
    assert "skipping partial checkpoint" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_from_the_previous_checkpoint_equals_uninterrupted(runs, tiny_models):
    """The truncated folder resumed for real (a fourth run: kept out of CI's budget with `slow`)."""
    out = _run(_args(runs / "truncated", tiny_models, "resume=auto"))
    assert "skipping partial checkpoint" in out and f"[resume] minillm from step {KILL_AFTER - 2}" in out
    _compare(_steps(runs / "uninterrupted"), _steps(runs / "truncated"), range(KILL_AFTER - 1, STEPS + 1))


@pytest.mark.slow
def test_resume_inside_sft_equals_uninterrupted(tmp_path, tiny_models):
    """Killed in Phase 1 (SFT, 6 steps) after its step-4 checkpoint: SFT steps 5..6, the SFT selection and all of
    MiniLLM match the uninterrupted run (three more runs: kept out of CI's budget with `slow`)."""
    _run(_args(tmp_path / "uninterrupted", tiny_models, sft=True))
    _run_and_kill(_args(tmp_path / "killed", tiny_models, sft=True), "[checkpoint] step 4 (sft 4)")
    out = _run(_args(tmp_path / "killed", tiny_models, "resume=auto", sft=True))
    assert "[resume] sft from step 4" in out
    a, b = (_records(tmp_path / d) for d in ("uninterrupted", "killed"))
    sft = [
        [(r["step"], r["loss"], r["grad_norm"], r.get("valid_loss")) for r in x if r["phase"] == "sft"] for x in (a, b)
    ]
    assert sft[1] == sft[0] and len(sft[0]) == 6
    _compare(_steps(tmp_path / "uninterrupted"), _steps(tmp_path / "killed"), range(1, STEPS + 1))
