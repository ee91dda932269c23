"""Time per collection: PPO inner epochs (the paper's Phase-2 schedule) against one update per sampled batch, at
equal samples, side by side in one run.

Both schedules sample the same number of rollouts per collection (`--collection`, batches of `--batch`):
  loop: learner.ppo_epochs=1 and a mini-batch of one sampled batch: one update per batch (the service's loop
        before inner epochs; collection / batch updates per collection);
  ppo:  learner.ppo_epochs=EPOCHS over mini-batches of `--minibatch`: EPOCHS x collection / minibatch updates.
Runs alternate (loop, ppo, loop, ppo, ...) from the same SFT checkpoint (no SFT phase, no evaluations). The time per
collection is the wall time between the last records of consecutive collections in metrics.jsonl (the first
collection, which includes start-up, excluded); medians over collections and repeats, and the ratio ppo / loop.

    python bench/ppo_schedule.py                      # tiny default: collections of 64, mini-batches of 16
    python bench/ppo_schedule.py --collections 6 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/ppo_schedule.py` puts bench/ first, not the repository
    sys.path.insert(0, str(ROOT))


def collection_seconds(metrics: Path, updates_per: int) -> list[float]:
    steps = [r for r in map(json.loads, metrics.read_text().splitlines()) if r["phase"] == "minillm"]
    ends = [r["time"] for r in steps if r["step"] % updates_per == 0]
    return [b - a for a, b in zip(ends, ends[1:], strict=False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--collection", type=int, default=64, help="rollouts per collection (paper: 256)")
    ap.add_argument("--batch", type=int, default=16, help="rollouts per sampled batch")
    ap.add_argument("--minibatch", type=int, default=16, help="rollouts per update in the ppo schedule (paper: 64)")
    ap.add_argument("--epochs", type=int, default=4, help="inner epochs of the ppo schedule (paper: 4)")
    ap.add_argument("--collections", type=int, default=5, help="collections per run (the first is warm-up)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the per-run figures as JSON")
    args = ap.parse_args()

    from common.tiny import tiny_models_for

    tiny = tiny_models_for()
    updates = {
        "loop": args.collection // args.batch,
        "ppo": args.epochs * args.collection // args.minibatch,
    }
    schedule = {
        "loop": ["learner.ppo_epochs=1", f"learner.minibatch_size={args.batch}"],
        "ppo": [f"learner.ppo_epochs={args.epochs}", f"learner.minibatch_size={args.minibatch}"],
    }
    common = [
        f"models.sft_checkpoint={tiny.student}",
        f"learner.batch_size={args.batch}",
        f"learner.rollouts_per_collection={args.collection}",
        "eval.every_steps=100000",
        "eval.at_start=false",
        "eval.at_end=false",
        "checkpoint.every_steps=0",
        "logging.wandb_mode=disabled",
        "logging.progress_every=1000",
    ]
    work = Path(tempfile.mkdtemp(prefix="ppo-schedule-"))
    per: dict[str, list[float]] = {"loop": [], "ppo": []}
    for rep in range(args.repeats):
        for name in ("loop", "ppo"):
            out = work / f"{name}{rep}"
            steps = updates[name] * args.collections
            cmd = [sys.executable, "-m", "learner.main", f"output_dir={out}", f"learner.minillm_steps={steps}"]
            proc = subprocess.run(
                cmd + common + schedule[name], cwd=ROOT, capture_output=True, text=True, env=None, check=False
            )
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
            secs = collection_seconds(out / "metrics.jsonl", updates[name])
            per[name] += secs
            print(f"[{name} rep {rep}] {updates[name]} updates per collection: " + ", ".join(f"{s:.2f}" for s in secs))
    med = {n: statistics.median(v) for n, v in per.items()}
    print(
        f"\ncollections of {args.collection} rollouts (batches of {args.batch}); medians over "
        f"{len(per['loop'])} / {len(per['ppo'])} collections\n"
        "| schedule | updates per collection | s per collection | s per update |\n|---|---:|---:|---:|"
    )
    for n in ("loop", "ppo"):
        print(f"| {n} | {updates[n]} | {med[n]:.2f} | {med[n] / updates[n]:.3f} |")
    print(f"\nppo / loop time per collection: {med['ppo'] / med['loop']:.2f}")
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "seconds": per}, indent=2))


if __name__ == "__main__":
    main()
