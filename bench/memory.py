"""Memory of the service's parts, each measured alone: the learner's peak in one step, the sampler over many batches.

    nice -n 5 python -m bench.memory learner [--batch 4] [--lengths 64 256 512] [--chunks 256 1024 0] [--out F]
    nice -n 5 python -m bench.memory learner --batch 2 --lengths 512 1024 2048 --chunks 1024 \
        --settings plain ckpt mbt ckpt+mbt --micro-batch-tokens 1024
    python -m bench.memory sampler --batches 800 --warmup 200 --trim --trace [--out F]

## learner: peak memory of one MiniLLM step vs `learner.logit_chunk_tokens` and the response length T

Every point is one fresh subprocess running the real `LearnerWorker.minillm_step` (FSDP2 over a gloo group of one,
CPU, float32) on the SmolLM2 student (V = 49,152), so the peaks do not contaminate each other. Chunk 0 means one
chunk holding every response token (the unchunked head).

What is measured, per point: the process's peak resident set during the step (VmHWM of /proc/self/status, reset
through /proc/self/clear_refs just before the step), split into the loss forward+backward and the optimizer step,
and the rise over the resident set just before the step (glibc's mmap threshold pinned at 64 KiB, so a freed
tensor leaves the resident set: see measure_in_subprocess). Not ru_maxrss: across fork+exec Linux carries the parent's
peak into the child's ru_maxrss (a child of a 2 GB parent reports >= 2 GB), and it cannot be reset before the step.
AdamW's state is allocated before the step, as it is on every step after the first (the peak is a steady-state
step's). The learning rate is 0, so the weights stay put.

`--settings` adds the learner's memory knobs as a second axis: `plain` (neither), `ckpt`
(learner.activation_checkpointing: each transformer layer recomputed in backward), `mbt` (learner.micro_batch_tokens
= `--micro-batch-tokens`: the step's rows cut into token-bounded micro-batches, each trimmed to its own width) and
`ckpt+mbt` (both).

Chunk -1 is the baseline without a head: the same forward, a scalar of the hidden states at the response positions
as the loss, backward and optimizer step. Its growth with T is the trunk's activations; the rest of each setting's
growth is the head and the vocabulary-wide terms.

The shard is synthetic, of the shapes the service sends: B prompts of `--prompt-tokens` random token ids, B
responses of exactly T random tokens, and a top-k (k = 64) teacher payload of random log-probs, so the teacher
payload (~0.8 kB per token) does not dominate. Memory does not depend on the token values. No pre-training batch.

This module also holds the subprocess runner that bench/teacher_transport.py uses for its per-transport steps.

## sampler: is the sampler's RSS growth in the soak a leak, and whose?

The sampler (both vLLM engines, the streaming sessions, the Python bookkeeping) runs in this process, without Ray,
through exactly the calls the service makes per batch: `reseed` with the batch's seed, `sample` (teacher-mixed,
alpha of the default config) on the next prompts of Dolly train, and `load_weights` of the same student weights as
a new version (a push per batch, as with one batch per collection). After every batch it records the process RSS;
with `--trim` the RSS once glibc has returned its free heap pages (`malloc_trim(0)`: what is left is memory
something still holds, the difference is freed memory the allocator kept); with `--trace` Python's own live
allocations (tracemalloc, from the end of the warm-up) and, at the end, the source lines whose live allocations grew
most. It prints the least-squares slopes after the warm-up in MB per 100 batches. Minutes on 2 cores (about 0.2 s
per batch of 16 prompts x 48 tokens on the tiny default); not a CI test.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

from bench.harness import ROOT, fit, status_mb
from common.engine_env import set_engine_env  # noqa: E402

set_engine_env()  # the engines in this process: its RSS is theirs
RAW = argparse.RawDescriptionHelpFormatter
STUDENT = Path("/work/smol/student")
RESULT_MARK = "@@RESULT@@ "  # the child's result line on stdout (the rest of its output is passed through)


# ----- child side: one step, measured ---------------------------------------------------------------------
def _reset_peak() -> None:
    # "5" resets the peak resident set (VmHWM) of this process to its current resident set (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synthetic_shard(batch: int, prompt_tokens: int, response_tokens: int, vocab: int, k: int, seed: int) -> Any:
    """A ScoredShard of the service's shapes with random contents and a top-k payload (see the module doc)."""
    import torch

    from common.logprobs import TopKLogprobs
    from common.rollout import ScoredShard, pack_sequences

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (prompt_tokens,), generator=g).tolist() for _ in range(batch)]
    responses = [torch.randint(3, vocab, (response_tokens,), generator=g).tolist() for _ in range(batch)]
    old = [(-torch.rand(response_tokens, generator=g) * 4).tolist() for _ in range(batch)]
    packed = pack_sequences(prompts, responses, pad_id=2, old_logprobs=old)
    n = batch * response_tokens
    # k top log-probs + one tail bucket that together normalise, sorted like torch.topk's output
    lp = torch.log_softmax(torch.randn(n, k + 1, generator=g) * 2, -1)
    top = lp[:, :k].sort(-1, descending=True).values.contiguous()
    ids = torch.randint(0, vocab, (n, k), generator=g)  # repeats within a row are harmless for memory
    teacher = TopKLogprobs(ids, top, lp[:, k].contiguous())
    token_lp = (-torch.rand(batch, response_tokens, generator=g) * 4) * packed.mask
    return ScoredShard(packed, token_lp, teacher)


def _preallocate_adam_state(optimizer: Any) -> None:
    """AdamW's lazy state, created as torch creates it on the first step (so the measured step is a steady one)."""
    import torch

    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p] = {
                "step": torch.tensor(0.0),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }


def _trunk_only_step(worker: Any, shard: Any) -> dict[str, float]:
    """The baseline without any head: the same forward, the hidden states at the response positions, a scalar of
    them as the loss, backward and optimizer step. What grows with T here is the trunk's activations."""
    from common.rollout import gather_positions

    p = shard.packed
    where = p.mask > 0
    hidden = gather_positions(worker._hidden(p.input_ids, p.attention_mask), p.predict_pos)[where]
    worker._step(hidden.square().mean())
    return {"tokens": float(where.sum())}


def run_step(spec: dict[str, Any]) -> dict[str, Any]:
    """In this process: build a LearnerWorker, get the shard, run one measured minillm_step (see the module doc).

    spec: student, vocab, chunk_tokens, alpha, long_weight (default 1), and either `shard` (a torch.save'd
    ScoredShard) or `synthetic` (kwargs of synthetic_shard); `teacher_dir` for teacher.transport=hidden shards (the
    worker holds the teacher's output layer); `grad_out` saves all gradients as one flat float32 vector
    (named_parameters order); `trunk_only` runs _trunk_only_step instead of minillm_step."""
    import torch

    from common.config import LearnerConfig, ObjectiveConfig
    from learner.worker import LearnerWorker

    cfg = LearnerConfig(
        lr=1e-3,
        grad_clip=None,
        logit_chunk_tokens=spec["chunk_tokens"],
        activation_checkpointing=spec.get("checkpointing", False),
        micro_batch_tokens=spec.get("micro_batch_tokens"),
    )
    obj = ObjectiveConfig(long_weight=spec.get("long_weight", 1.0))
    init = f"tcp://127.0.0.1:{_free_port()}"
    worker = LearnerWorker(spec["student"], cfg, obj, spec["vocab"], 0, 1, init, teacher_dir=spec.get("teacher_dir"))
    for group in worker.optimizer.param_groups:
        group["lr"] = 0.0  # nothing moves: only the step's memory and gradient are wanted
    _preallocate_adam_state(worker.optimizer)
    if "shard" in spec:
        shard = torch.load(spec["shard"], weights_only=False)  # into memory (no mmap): resident before the step
    else:
        shard = synthetic_shard(**spec["synthetic"])

    # the optimizer step's own peak (foreach AdamW temporaries) is told apart from the loss forward+backward's
    phases: dict[str, float] = {}
    inner_step = worker.optimizer.step

    def timed_step(*args: Any, **kwargs: Any) -> Any:
        phases["fwd_bwd_peak_mb"] = status_mb("VmHWM")
        _reset_peak()
        out = inner_step(*args, **kwargs)
        phases["opt_peak_mb"] = status_mb("VmHWM")
        return out

    worker.optimizer.step = timed_step  # type: ignore[method-assign]
    gc.collect()
    before = status_mb("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    metrics = _trunk_only_step(worker, shard) if spec.get("trunk_only") else worker.minillm_step(shard, spec["alpha"])
    seconds = time.perf_counter() - t0
    peak = max(phases["fwd_bwd_peak_mb"], phases["opt_peak_mb"])
    if spec.get("grad_out"):
        grads = [p.grad for _, p in worker.model.named_parameters() if p.grad is not None]
        local = [g.full_tensor() if hasattr(g, "full_tensor") else g for g in grads]
        torch.save(torch.cat([g.detach().reshape(-1).float() for g in local]), spec["grad_out"])
    worker.close()
    return {
        "rss_before_mb": before,
        "peak_mb": peak,
        "rise_mb": peak - before,
        "fwd_bwd_peak_mb": phases["fwd_bwd_peak_mb"],
        "opt_peak_mb": phases["opt_peak_mb"],
        "step_seconds": seconds,
        **{
            k: metrics[k]
            for k in ("tokens", "kl_sum", "rho_min", "rho_max", "loss_single", "loss_long")
            if k in metrics
        },
    }


def measure_in_subprocess(spec: dict[str, Any], threads: int = 1, timeout: float = 900.0) -> dict[str, Any]:
    """run_step in a fresh interpreter (its own peak); returns its result dict. `threads` sets OMP_NUM_THREADS:
    on a shared 2-core machine one thread ran a step 2.3x faster in wall time than two spinning OpenMP threads.

    glibc's mmap threshold is pinned at 64 KiB: by default it grows with every freed large block (up to 32 MiB),
    after which mid-sized tensors come from the heap and stay resident once freed, by chance of order. The same
    step then peaked at 4,626 or 4,891 MB from run to run; pinned, at 4,599 MB twice (tensors' memory leaves the
    resident set when they are freed)."""
    cmd = [sys.executable, "-m", "bench.memory", "learner", "--child", json.dumps(spec)]
    pythonpath = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    env = dict(os.environ, PYTHONPATH=pythonpath, OMP_NUM_THREADS=str(threads), MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    raise RuntimeError(f"step subprocess failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


# ----- learner: parent side ----------------------------------------------------------------------------------------
SETTINGS = {  # --settings: the learner's memory knobs
    "plain": {"checkpointing": False, "micro_batch_tokens": False},
    "ckpt": {"checkpointing": True, "micro_batch_tokens": False},
    "mbt": {"checkpointing": False, "micro_batch_tokens": True},
    "ckpt+mbt": {"checkpointing": True, "micro_batch_tokens": True},
}


def _label(chunk: int) -> str:
    return "trunk only" if chunk < 0 else "one chunk" if chunk == 0 else str(chunk)


def learner_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.memory learner", description=__doc__, formatter_class=RAW)
    parser.add_argument("--student", type=Path, default=STUDENT)
    parser.add_argument("--batch", type=int, default=4, help="sequences in the step")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 512], help="response lengths T")
    # logit_chunk_tokens; 0 = one chunk; -1 = the trunk alone (no head: the baseline)
    parser.add_argument("--chunks", type=int, nargs="+", default=[-1, 256, 1024, 0])
    parser.add_argument(
        "--settings", nargs="+", default=["plain"], choices=list(SETTINGS), help="memory knobs (see the doc)"
    )
    parser.add_argument("--micro-batch-tokens", type=int, default=1024, help="learner.micro_batch_tokens of mbt")
    parser.add_argument("--top-k", type=int, default=64, help="k of the synthetic top-k teacher payload")
    parser.add_argument("--alpha", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=1, help="subprocesses per point (median)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each step subprocess")
    parser.add_argument("--quick", action="store_true", help="T in {32, 128}, chunks {-1, 64, 0}, batch 2")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(RESULT_MARK + json.dumps(run_step(json.loads(args.child))), flush=True)
        return 0
    if args.quick:
        args.lengths, args.chunks, args.batch = [32, 128], [-1, 64, 0], 2

    from common.models import load_tokenizer

    vocab = len(load_tokenizer(args.student))
    rows = []
    t_start = time.perf_counter()
    for setting in args.settings:
        knobs = SETTINGS[setting]
        for chunk in args.chunks:
            for length in args.lengths:
                tokens = args.batch * length
                effective = chunk if chunk > 0 else tokens  # one chunk = all response tokens of the step
                shard = {"batch": args.batch, "prompt_tokens": args.prompt_tokens, "response_tokens": length}
                shard |= {"vocab": vocab, "k": args.top_k, "seed": 0}
                spec = {"student": str(args.student), "vocab": vocab, "chunk_tokens": max(effective, 1)}
                spec |= {"trunk_only": chunk < 0, "alpha": args.alpha, "synthetic": shard}
                spec |= {"checkpointing": knobs["checkpointing"]}
                if knobs["micro_batch_tokens"]:
                    spec["micro_batch_tokens"] = args.micro_batch_tokens
                runs = [measure_in_subprocess(spec, args.threads) for _ in range(args.repeats)]
                med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
                row = {"setting": setting, "chunk": chunk, "T": length, "repeats": args.repeats, **med}
                row["tokens"] = tokens
                rows.append(row)
                print(
                    f"[{time.perf_counter() - t_start:6.0f}s] {setting:>8} chunk {_label(chunk):>10} T {length:4d}: "
                    f"peak {med['peak_mb']:7.0f} MB (fwd+bwd {med['fwd_bwd_peak_mb']:.0f}, "
                    f"opt {med['opt_peak_mb']:.0f}), rise {med['rise_mb']:6.0f} MB, {med['step_seconds']:.1f} s",
                    flush=True,
                )

    print(
        f"\nLearner peak memory of one MiniLLM step, {args.student} (V = {vocab:,}), batch {args.batch}, "
        f"prompts {args.prompt_tokens} tokens, top-k k = {args.top_k} payload, float32 CPU; medians of {args.repeats}\n"
    )
    print(
        "| setting | logit_chunk_tokens | T | response tokens | peak RSS (MB) | fwd+bwd peak (MB) "
        "| rise over pre-step (MB) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['setting']} | {_label(r['chunk'])} | {r['T']} | {r['tokens']} | {r['peak_mb']:.0f} | "
            f"{r['fwd_bwd_peak_mb']:.0f} | {r['rise_mb']:.0f} |"
        )
    slopes = {}
    print("\n| logit_chunk_tokens | slope of the peak (MB per 100 tokens of T) | per 100 response tokens (B x T) |")
    print("|---|---:|---:|")
    for setting in args.settings:
        for chunk in args.chunks:
            pts = [r for r in rows if r["chunk"] == chunk and r["setting"] == setting]
            if len(pts) < 2:
                continue
            s = 100 * fit([float(r["T"]) for r in pts], [r["peak_mb"] for r in pts])["slope"]
            slopes[f"{setting} {chunk}"] = s
            print(f"| {setting} {_label(chunk)} | {s:.0f} | {s / args.batch:.0f} |")
    if args.out:
        meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"}
        payload = {"config": meta, "vocab": vocab, "rows": rows, "slope_mb_per_100_T": slopes}
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


# ----- sampler ----------------------------------------------------------------------------------------------
def sampler_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench.memory sampler", description=__doc__, formatter_class=RAW)
    ap.add_argument("--batches", type=int, default=800)
    ap.add_argument("--warmup", type=int, default=200, help="batches left out of the slopes")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--trim", action="store_true", help="also record RSS after malloc_trim(0) (glibc)")
    ap.add_argument("--trace", action="store_true", help="tracemalloc after the warm-up (slows Python code down)")
    ap.add_argument("--out", type=Path, default=None, help="write the figures here (JSON)")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads

    from actors.sampler import Sampler, sampler_spec
    from common.config import load_config, resolve_path
    from common.data import load_jsonl, tokenize_examples
    from common.models import load_model, load_tokenizer
    from common.resumable import TRAIN_BATCH, sampling_seed
    from common.tiny import tiny_models_for

    cfg = load_config()
    tiny = tiny_models_for(cfg)
    tok = load_tokenizer(str(tiny.tokenizer))
    data = load_jsonl(resolve_path(cfg.data.train), limit=4000)
    prompts = [it.prompt_ids for it in tokenize_examples(data, tok, cfg.data.max_prompt_tokens, None)[0]]
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
        row = {"batch": b + 1, "rss_mb": status_mb("VmRSS")}
        if libc is not None:
            gc.collect()
            libc.malloc_trim(0)
            row["rss_trimmed_mb"] = status_mb("VmRSS")
        if args.trace and b + 1 == args.warmup:
            tracemalloc.start(8)
            base = tracemalloc.take_snapshot()
        if tracemalloc.is_tracing():
            row["python_live_mb"] = tracemalloc.get_traced_memory()[0] / 2**20
        rows.append(row)
        if (b + 1) % 50 == 0:
            print(f"[sampler-memory] batch {b + 1}: {json.dumps(row)} ({time.time() - t0:.0f}s)", flush=True)
    if base is not None:
        for stat in tracemalloc.take_snapshot().compare_to(base, "traceback")[:12]:
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
        "command": "python -m bench.memory sampler " + " ".join(argv),
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parts = {"learner": learner_main, "sampler": sampler_main}
    if not argv or argv[0] not in parts:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return parts[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
