"""Sampler memory over many batches: is the sampler's RSS growth in the soak a leak, and whose?

The sampler (both vLLM engines, the streaming sessions, the Python bookkeeping) runs in this process, without Ray,
through exactly the calls the service makes per batch: `reseed` with the batch's seed, `sample` (teacher-mixed,
alpha of the default config) on the next prompts of Dolly train, and `load_weights` of the same student weights as
a new version (a push per batch, as with one batch per collection). After every batch it records

* the process RSS;
* the RSS once glibc has returned its free heap pages to the system (`malloc_trim(0)`), with `--trim`: what is
  left is memory something still holds, the difference is freed memory the allocator kept (fragmentation);
* with `--trace`, Python's own allocations (tracemalloc, started after the warm-up): the live bytes and, at the
  end, the source lines whose live allocations grew most since the warm-up.

It prints the least-squares slopes after the warm-up in MB per 100 batches.

    python bench/sampler_memory.py --batches 800 --warmup 200 --trim --trace --out sampler_memory.json

Minutes on 2 cores (about 0.2 s per batch of 16 prompts x 48 tokens on the tiny default); not a CI test.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.engine_env import set_engine_env  # noqa: E402

set_engine_env()  # the engines in this process: its RSS is theirs

import psutil  # noqa: E402

from actors.sampler import Sampler, sampler_spec  # noqa: E402
from bench.soak import fit  # noqa: E402
from common.config import load_config, resolve_path  # noqa: E402
from common.data import load_jsonl, tokenize_examples  # noqa: E402
from common.models import load_model, load_tokenizer  # noqa: E402
from common.resumable import TRAIN_BATCH, sampling_seed  # noqa: E402
from common.tiny import tiny_models_for  # noqa: E402


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=800)
    ap.add_argument("--warmup", type=int, default=200, help="batches left out of the slopes")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--trim", action="store_true", help="also record RSS after malloc_trim(0) (glibc)")
    ap.add_argument("--trace", action="store_true", help="tracemalloc after the warm-up (slows Python code down)")
    ap.add_argument("--out", type=Path, default=None, help="write the figures here (JSON)")
    args = ap.parse_args()

    cfg = load_config()
    tiny = tiny_models_for(cfg)
    tok = load_tokenizer(str(tiny.tokenizer))
    items, _ = tokenize_examples(
        load_jsonl(resolve_path(cfg.data.train), limit=4000), tok, cfg.data.max_prompt_tokens, None
    )
    prompts = [it.prompt_ids for it in items]
    # the spec of the service's sampler actor (learner/recipe.py)
    sampler = Sampler(sampler_spec(cfg, str(tiny.student), str(tiny.teacher), tok.eos_token_id, cfg.objective.alpha))
    state = {k: v.detach().clone() for k, v in load_model(str(tiny.student)).state_dict().items()}
    libc = ctypes.CDLL("libc.so.6") if args.trim else None
    rows: list[dict[str, float]] = []
    top: list[str] = []
    base = None
    t0 = time.time()
    for b in range(args.batches):
        start = (b * args.batch_size) % (len(prompts) - args.batch_size)
        sampler.reseed(sampling_seed(cfg.seed, TRAIN_BATCH, b))
        sampler.sample(prompts[start : start + args.batch_size], list(range(start, start + args.batch_size)))
        sampler.load_weights(state, b + 1)
        row = {"batch": b + 1, "rss_mb": rss_mb()}
        if libc is not None:
            gc.collect()
            libc.malloc_trim(0)
            row["rss_trimmed_mb"] = rss_mb()
        if args.trace and b + 1 == args.warmup:
            tracemalloc.start(8)
            base = tracemalloc.take_snapshot()
        if tracemalloc.is_tracing():
            row["python_live_mb"] = tracemalloc.get_traced_memory()[0] / 2**20
        rows.append(row)
        if (b + 1) % 50 == 0:
            print(f"[sampler-memory] batch {b + 1}: {json.dumps(row)} ({time.time() - t0:.0f}s)", flush=True)
    if base is not None:
        diff = tracemalloc.take_snapshot().compare_to(base, "traceback")
        for stat in diff[:12]:
            frames = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in list(stat.traceback)[:4])
            top.append(f"{stat.size_diff / 2**10:+.1f} KiB in {stat.count_diff:+d} blocks: {frames}")
        tracemalloc.stop()

    after = [r for r in rows if r["batch"] > args.warmup]
    slopes = {}
    for key in ("rss_mb", "rss_trimmed_mb", "python_live_mb"):
        pts = [(r["batch"], r[key]) for r in after if key in r]
        if len(pts) >= 3:
            f = fit([float(x) for x, _ in pts], [y for _, y in pts])
            slopes[key] = {
                "slope_mb_per_100_batches": round(100 * f["slope"], 3),
                "se": round(100 * f["se"], 3),
                "first_mb": round(pts[0][1], 1),
                "last_mb": round(pts[-1][1], 1),
            }
    result = {
        "command": "python bench/sampler_memory.py " + " ".join(sys.argv[1:]),
        "batches": args.batches,
        "warmup": args.warmup,
        "seconds": round(time.time() - t0, 1),
        "slopes_after_warmup": slopes,
        "python_growth_top": top,
        "trace": rows[:: max(1, len(rows) // 80)],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "trace"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
