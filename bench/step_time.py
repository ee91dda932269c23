"""MiniLLM step wall time and driver memory of two versions of the service, side by side in one run.

Each version is a git revision checked out as a worktree; runs alternate (A, B, A, B, ...) with the same overrides,
starting from the SFT checkpoint (models.sft_checkpoint: no SFT phase). The step time is the wall time between
consecutive MiniLLM records of metrics.jsonl (steps with an evaluation and the first two excluded); the driver's
peak RSS is read from /proc while it runs. Prints medians and the ratios B / A.

    python bench/step_time.py --a 68f1867 --b HEAD --repeats 2                     # tiny default
    python bench/step_time.py --a 68f1867 --b HEAD --smollm2 /work/smol --steps 10  # SmolLM2 pair
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worktree(rev: str, root: Path) -> Path:
    path = root / f"rev-{rev.replace('/', '_')}"
    if not path.exists():
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev], check=True, capture_output=True
        )
    return path


def _peak_rss_mb(pid: int, stop: threading.Event, out: list[float]) -> None:
    peak = 0.0
    while not stop.is_set():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    peak = max(peak, int(line.split()[1]) / 1024)
        except OSError:
            break
        time.sleep(0.2)
    out.append(peak)


def one_run(tree: Path, overrides: list[str], out_dir: Path) -> dict[str, float]:
    cmd = [sys.executable, "-m", "learner.main", f"output_dir={out_dir}", *overrides]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stop, peak = threading.Event(), []
    watcher = threading.Thread(target=_peak_rss_mb, args=(proc.pid, stop, peak))
    watcher.start()
    log, _ = proc.communicate()
    stop.set()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"{tree.name} failed:\n{log[-3000:]}")
    records = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["phase"] == "minillm"]
    gaps = [
        b["time"] - a["time"]
        for a, b in zip(steps, steps[1:], strict=False)
        if b["step"] > 2 and "eval_rouge_l" not in b and "eval_rouge_l" not in a
    ]
    start = next(r["time"] for r in steps)
    return {
        "step_s": statistics.median(gaps),
        "driver_peak_rss_mb": peak[0] if peak else float("nan"),
        "to_first_step_s": start,
        "wall_s": time.time() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", default="68f1867", help="baseline revision")
    ap.add_argument("--b", default="HEAD", help="revision to compare")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--smollm2", type=Path, default=None, help="folder with teacher/ and student/ (SmolLM2 pair)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="step-time-"))
    trees = {"A": worktree(args.a, work), "B": worktree(args.b, work)}
    common = [
        f"learner.minillm_steps={args.steps}",
        f"learner.batch_size={args.batch}",
        "eval.every_steps=1000",
        "logging.wandb_mode=disabled",
        "logging.progress_every=1000",
    ]
    if args.smollm2:
        t, s = args.smollm2 / "teacher", args.smollm2 / "student"
        common += [
            "models.source=local",
            f"models.teacher={t}",
            f"models.student={s}",
            f"models.sft_checkpoint={s}",
            "sampler.kv_cache_mb=1024",
            "sampler.max_new_tokens=48",
            "eval.num_prompts=8",
            "eval.kl_prompts=8",
            "eval.max_new_tokens=16",
            "teacher.batch_size=4",
            "data.max_prompt_tokens=96",
            "learner.pretrain_batch_size=4",
        ]
    else:
        from common.tiny import tiny_models_for

        tiny = tiny_models_for()
        common.append(f"models.sft_checkpoint={tiny.student}")
    extra = {"A": [], "B": ["eval.at_start=false", "eval.at_end=false"]}  # B can skip them; A always evaluates
    results: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    for rep in range(args.repeats):
        for name in ("A", "B"):
            r = one_run(trees[name], common + extra[name], work / f"{name}{rep}")
            results[name].append(r)
            print(f"[{name} rep {rep}] " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()), flush=True)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in results.items()}
    print(f"\n| metric | A ({args.a}) | B ({args.b}) | B / A |\n|---|---|---|---|")
    for k in med["A"]:
        print(f"| {k} | {med['A'][k]:.2f} | {med['B'][k]:.2f} | {med['B'][k] / med['A'][k]:.2f} |")
    if args.out:
        args.out.write_text(json.dumps({"a": args.a, "b": args.b, "runs": results, "medians": med}, indent=2))


if __name__ == "__main__":
    main()
