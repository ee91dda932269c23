"""MiniLLM throughput of the service beside what a user would run instead, in one run on the same models, prompts
and lengths (issue #14, item 6). Arms, each a fresh process, run in turn once per repeat (A, B, C, ..., A, B, C, ...)
so every comparison is between runs side by side; medians over repeats and the per-repeat ratios are printed.

  service      python -m learner.main: MiniLLM (alpha, L_PT) from the student (no SFT phase, no evaluation)
  service-a0   the same at alpha = 0 without L_PT (objective.pt_weight=0)
  loop         the same maths in one plain torch process (bench/_single_process.py loop): lockstep mixture
               sampling with both KV caches, teacher scoring, one update with learner/objectives.py; no Ray, no vLLM
  loop-a0      the loop at alpha = 0 without L_PT (the student samples alone)
  stages       the service's stage classes timed alone on each batch (bench/_single_process.py stages): the
               sampler, the teacher, the learner and the weight push; the rates the pipeline is compared with
  stages-a0    the same at alpha = 0 without L_PT
  trl          TRL's DistillationTrainer (reverse KL, beta = 1; no L_PT, no mixing: alpha = 0), with --trl-python

Per step of the service (metrics.jsonl, steps after --skip): completion tokens / wall time between update records;
each stage's busy share = its seconds in the step / the step's wall time (sampler: the batch's sample_seconds,
teacher: its score_seconds, learner: the update's step_seconds, driver: wait_seconds = the learner idle), and
each stage's process CPU time per batch (sample_cpu_seconds, score_cpu_seconds, step_cpu_seconds: every thread of
the actor's process), which separates a stage that does more work inside the service from one waiting for a core;
pipeline efficiency = the service's tokens/s / the tokens/s of its slowest stage alone (the stages arm). Peak memory
is the largest sum over an arm's process tree (the Ray processes included) of PSS, the resident pages with shared
ones divided among their sharers, sampled every second.

    python bench/throughput.py [--repeats 2] [--steps 10] [--batch 8] [--tokens 64] [--alpha 0.2]
        [--trl-python /work/trl-venv/bin/python] [--threads 1] [--arms service,loop,...] [--out results.json]
        [--pair DIR]                       # DIR/teacher and DIR/student instead of the tiny default

--threads: torch threads of the single-process arms (loop, trl); the service's actors keep their own
(cluster.torch_threads: 1 each on the default). On a machine shared with other jobs, OpenMP threads that outnumber
the free cores spin: measure both counts before quoting one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ALL_ARMS = ("service", "loop", "trl", "stages", "service-a0", "loop-a0", "stages-a0")


# ===== measuring a process tree ======================================================================
def _tree_memory_mb(pid: int) -> tuple[float, float]:
    """(sum of PSS, sum of RSS) in MB over a process and all its descendants (Ray's processes are the driver's)."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return 0.0, 0.0
    pss = rss = 0.0
    for p in procs:
        try:
            for line in Path(f"/proc/{p.pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) / 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) / 1024
        except OSError:
            continue  # exited meanwhile
    return pss, rss


@dataclass
class Watched:
    """A finished process: its output, peak memory, and when `first_seen` first held (seconds from launch)."""

    returncode: int
    output: str
    peak_pss_mb: float
    peak_rss_mb: float
    first_seen_s: float | None
    wall_s: float


def watch(
    cmd: list[str],
    cwd: Path,
    env: dict[str, str],
    first_seen: Callable[[], bool] | None = None,
    log: Path | None = None,
) -> Watched:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stop = threading.Event()
    peak = [0.0, 0.0]
    seen: list[float] = []

    def poll() -> None:
        while not stop.wait(1.0):
            pss, rss = _tree_memory_mb(proc.pid)
            peak[0], peak[1] = max(peak[0], pss), max(peak[1], rss)
            if first_seen is not None and not seen and first_seen():
                seen.append(time.perf_counter() - t0)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    out, _ = proc.communicate()
    stop.set()
    poller.join()
    if log is not None:  # the whole output, for a run that fails
        log.write_text(out)
    return Watched(proc.returncode, out, peak[0], peak[1], seen[0] if seen else None, time.perf_counter() - t0)


def _env(threads: int | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always a private local Ray, never a shared one
    env["PYTHONPATH"] = str(ROOT)
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def _last_json(out: str) -> dict[str, Any]:
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON result line")


# ===== the arms ======================================================================================
@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    overrides: list[str]  # the run's configuration, shared by the service and the single-process arms
    models: dict[str, str]  # teacher, student, tokenizer folders
    results: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def arm_overrides(self, arm: str) -> list[str]:
        if arm.endswith("-a0"):
            return [*self.overrides, "objective.alpha=0", "objective.pt_weight=0"]
        return [*self.overrides, f"objective.alpha={self.args.alpha}"]

    def run(self, arm: str, rep: int) -> dict[str, Any]:
        kind = arm.split("-")[0]
        fn = {"service": self.service, "loop": self.single, "stages": self.single, "trl": self.trl}[kind]
        return fn(arm, rep)

    def service(self, arm: str, rep: int) -> dict[str, Any]:
        out_dir = self.work / f"{arm}-{rep}"
        metrics = out_dir / "metrics.jsonl"
        steps = self.args.steps + self.args.skip

        def first_step() -> bool:
            return metrics.is_file() and '"phase": "minillm"' in metrics.read_text()

        cmd = [
            sys.executable,
            "-m",
            "learner.main",
            f"output_dir={out_dir}",
            f"learner.minillm_steps={steps}",
            *self.arm_overrides(arm),
        ]
        w = watch(cmd, ROOT, _env(), first_step, self.work / f"{arm}-{rep}.log")
        if w.returncode != 0:
            raise SystemExit(f"{arm} failed:\n{w.output[-3000:]}")
        records = [json.loads(x) for x in metrics.read_text().splitlines()]
        recs = [r for r in records if r["phase"] == "minillm"]
        kept = recs[self.args.skip :]
        wall = kept[-1]["time"] - recs[self.args.skip - 1]["time"]
        tokens = sum(r["tokens"] for r in kept)
        busy = {
            "sampler": sum(r["tokens"] / r["sampler_tokens_per_s"] for r in kept),
            "teacher": sum(r["tokens"] / r["teacher_tokens_per_s"] for r in kept),
            "learner": sum(r["step_seconds"] for r in kept),
            "learner idle (wait)": sum(r.get("wait_seconds", 0.0) for r in kept),
            "push (driver)": sum(r.get("push_seconds", 0.0) for r in kept),
        }
        cpu = {  # process CPU time (all threads) of each stage's work: wall / CPU tells waiting for a core from work
            "sampler": sum(r.get("sample_cpu_seconds", 0.0) for r in kept),
            "teacher": sum(r.get("score_cpu_seconds", 0.0) for r in kept),
            "learner": sum(r.get("step_cpu_seconds", 0.0) for r in kept),
        }
        return {
            "tok_per_s": tokens / wall,
            "step_s": wall / len(kept),
            "busy_share": {k: v / wall for k, v in busy.items()},
            "cpu_share": {k: v / wall for k, v in cpu.items()},
            "cpu_per_batch_s": {k: v / len(kept) for k, v in cpu.items()},
            "busy_per_batch_s": {k: v / len(kept) for k, v in busy.items()},
            "peak_pss_mb": w.peak_pss_mb,
            "peak_rss_mb": w.peak_rss_mb,
            "to_step1_s": w.first_seen_s,
            "mean_response_tokens": tokens / len(kept) / self.args.batch,
        }

    def single(self, arm: str, rep: int) -> dict[str, Any]:
        what = arm.split("-")[0]
        threads = self.args.threads if what == "loop" else 1  # stages: each actor's thread count in the service
        cmd = [
            sys.executable,
            str(ROOT / "bench" / "_single_process.py"),
            what,
            "--threads",
            str(threads),
            "--steps",
            str(self.args.steps + self.args.skip),
            "--skip",
            str(self.args.skip),
            *self.arm_overrides(arm),
        ]
        w = watch(cmd, ROOT, _env(threads), log=self.work / f"{arm}-{rep}.log")
        if w.returncode != 0:
            raise SystemExit(f"{arm} failed:\n{w.output[-3000:]}")
        r = _last_json(w.output)
        r.pop("steps", None)
        if what == "loop":
            total = sum(r["stage_s"].values())
            r["busy_share"] = {k: v / total for k, v in r["stage_s"].items()}
        r["peak_pss_mb"], r["peak_rss_mb"] = w.peak_pss_mb, w.peak_rss_mb
        return r

    def trl(self, arm: str, rep: int) -> dict[str, Any]:
        spec = {
            **self.models,
            "prompts": self.args.trl_prompts,
            "batch": self.args.batch,
            "tokens": self.args.tokens,
            "lr": self.args.lr,
            "steps": self.args.steps + self.args.skip,
            "seed": 0,
            "threads": self.args.threads,
            "output_dir": str(self.work / f"{arm}-{rep}"),
        }
        path = self.work / f"{arm}-{rep}.json"
        path.write_text(json.dumps(spec))
        cmd = [self.args.trl_python, str(ROOT / "bench" / "_trl_arm.py"), str(path)]
        w = watch(cmd, ROOT, _env(self.args.threads), log=self.work / f"{arm}-{rep}.log")
        if w.returncode != 0:
            raise SystemExit(f"{arm} failed:\n{w.output[-3000:]}")
        r = _last_json(w.output)
        steps = r.pop("steps")
        kept = steps[self.args.skip :]
        wall = kept[-1]["end"] - steps[self.args.skip - 1]["end"]
        tokens = sum(s["tokens"] for s in kept)
        return {
            **r,
            "tok_per_s": tokens / wall,
            "step_s": wall / len(kept),
            "to_step1_s": steps[0]["end"],
            "peak_pss_mb": w.peak_pss_mb,
            "peak_rss_mb": w.peak_rss_mb,
            "mean_response_tokens": tokens / len(kept) / self.args.batch,
        }


# ===== set-up and report =============================================================================
def setup(args: argparse.Namespace) -> tuple[list[str], dict[str, str], list[str]]:
    """The shared overrides, the model folders, and the training prompts (texts, in the service's batch order)."""
    from common.config import load_config, resolve_path
    from common.data import iterate_batches, load_jsonl, tokenize_examples
    from common.models import load_tokenizer

    common = [
        f"learner.batch_size={args.batch}",
        f"sampler.max_new_tokens={args.tokens}",
        f"learner.lr={args.lr}",
        "eval.every_steps=100000",
        "eval.at_start=false",
        "eval.at_end=false",
        "checkpoint.every_steps=0",
        "logging.wandb_mode=disabled",
        "logging.progress_every=1000",
    ]
    if args.smollm2:
        t, s = args.smollm2 / "teacher", args.smollm2 / "student"
        models = {"teacher": str(t), "student": str(s), "tokenizer": str(s)}
        common += [
            "models.source=local",
            f"models.teacher={t}",
            f"models.student={s}",
            "sampler.kv_cache_mb=1024",
            "teacher.batch_size=4",
            "data.max_prompt_tokens=96",
            "learner.pretrain_batch_size=4",
            "eval.num_prompts=8",
            "eval.kl_prompts=8",
        ]
    else:
        from common.tiny import tiny_models_for

        tiny = tiny_models_for()
        models = {"teacher": str(tiny.teacher), "student": str(tiny.student), "tokenizer": str(tiny.tokenizer)}
    common.append(f"models.sft_checkpoint={models['student']}")  # MiniLLM from the student as it is: no SFT phase
    cfg = load_config(None, common)
    tok = load_tokenizer(models["tokenizer"])
    items, _ = tokenize_examples(
        load_jsonl(resolve_path(cfg.data.train)), tok, cfg.data.max_prompt_tokens, cfg.data.max_response_tokens
    )
    batches = iterate_batches(items, args.batch, cfg.seed + 1)
    n = args.steps + args.skip + 2
    prompts = [str(tok.decode(it.prompt_ids)) for _ in range(n) for it in next(batches)]
    return common, models, prompts


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def side_by_side(res: dict[str, list[dict[str, Any]]], x: str, y: str) -> list[tuple[dict, dict]]:
    """The results of arms x and y from the same repeats (an arm that failed in a repeat drops that repeat)."""
    ys = {r.get("rep", i): r for i, r in enumerate(res.get(y, []))}
    return [(r, ys[k]) for i, r in enumerate(res.get(x, [])) if (k := r.get("rep", i)) in ys]


def report(bench: Bench) -> str:
    res, a = bench.results, bench.args
    lines = []

    def med(arm: str, key: str) -> float:
        return median([r[key] for r in res.get(arm, []) if r.get(key) is not None])

    lines.append(
        "| arm | completion tok/s (median) | per repeat | step (s) | peak PSS, all processes (MB) | to step 1 (s) |"
    )
    lines.append("|---|---:|---|---:|---:|---:|")
    for arm in a.arms:
        if arm.startswith("stages") or arm not in res:
            continue
        per = " / ".join(f"{r['tok_per_s']:.0f}" for r in res[arm])
        first = med(arm, "to_step1_s")
        lines.append(
            f"| {arm} | {med(arm, 'tok_per_s'):.0f} | {per} | {med(arm, 'step_s'):.2f} | {med(arm, 'peak_pss_mb'):.0f} "
            f"| {'' if first != first else f'{first:.0f}'} |"
        )
    pairs = [
        ("service", "loop"),
        ("service-a0", "loop-a0"),
        ("service", "trl"),
        ("service-a0", "trl"),
        ("loop-a0", "trl"),
        ("service-a0", "service"),
    ]
    lines += ["", "| ratio (tok/s) | per repeat | median |", "|---|---|---:|"]
    for x, y in pairs:
        if x in res and y in res:
            ratios = [rx["tok_per_s"] / ry["tok_per_s"] for rx, ry in side_by_side(res, x, y)]
            lines.append(f"| {x} / {y} | {' / '.join(f'{r:.2f}' for r in ratios)} | {median(ratios):.2f} |")
        if x in res and y in res and y == "trl":
            mem = [rx["peak_pss_mb"] / ry["peak_pss_mb"] for rx, ry in side_by_side(res, x, y)]
            lines.append(f"| {x} / {y}, peak PSS | {' / '.join(f'{r:.2f}' for r in mem)} | {median(mem):.2f} |")
    for svc, stg in (("service", "stages"), ("service-a0", "stages-a0")):
        if svc not in res or stg not in res:
            continue
        lines += ["", f"{svc}: stages alone ({stg}) and busy shares in the service", ""]
        lines.append(
            "| stage | alone: s per batch (median) | alone: tok/s | in the service: wall s per batch "
            "| in the service: CPU s per batch | busy share of a service step |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|")
        shares = {k: median([r["busy_share"][k] for r in res[svc]]) for k in res[svc][0]["busy_share"]}
        walls = {k: median([r["busy_per_batch_s"][k] for r in res[svc]]) for k in res[svc][0]["busy_per_batch_s"]}
        cpus = {k: median([r["cpu_per_batch_s"][k] for r in res[svc]]) for k in res[svc][0]["cpu_per_batch_s"]}
        # push: alone = gather the learner's weights + load them into the sampler; in the service the driver's
        # push_seconds (the dispatch of the push; the load happens in the sampler between batches)
        names = {"sample": "sampler", "score": "teacher", "update": "learner", "push": "push (driver)"}
        for k, label in names.items():
            s = median([r["stage_s"][k] for r in res[stg]])
            rate = median([r["stage_tok_per_s"][k] for r in res[stg]])
            cpu = f"{cpus[label]:.2f}" if label in cpus else ""
            lines.append(
                f"| {label} | {s:.2f} | {rate:.0f} | {walls.get(label, float('nan')):.2f} | {cpu} "
                f"| {shares.get(label, float('nan')):.2f} |"
            )
        lines.append(f"| learner idle (wait) | | | | | {shares['learner idle (wait)']:.2f} |")
        effs = []
        for r_svc, r_stg in side_by_side(res, svc, stg):
            slowest = min(r_stg["stage_tok_per_s"][k] for k in ("sample", "score", "update"))
            effs.append(r_svc["tok_per_s"] / slowest)
        lines.append(
            f"\npipeline efficiency ({svc} tok/s / slowest stage alone): "
            f"{' / '.join(f'{e:.2f}' for e in effs)} (median {median(effs):.2f})"
        )
    for arm in ("loop", "loop-a0"):
        if arm in res:
            sh = {k: median([r["busy_share"][k] for r in res[arm]]) for k in ("sample", "score", "update")}
            lines.append(f"\n{arm}: share of its step: " + ", ".join(f"{k} {v:.2f}" for k, v in sh.items()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="steps measured per run (after --skip warm-up steps)")
    ap.add_argument("--skip", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="completions per step")
    ap.add_argument("--tokens", type=int, default=64, help="max new tokens per completion")
    ap.add_argument("--alpha", type=float, default=0.2)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the loop and TRL arms")
    ap.add_argument("--arms", default=",".join(a for a in ALL_ARMS if a != "trl"))
    ap.add_argument("--trl-python", help="python of a virtual environment with trl (adds the trl arm)")
    ap.add_argument(
        "--pair",
        "--smollm2",
        dest="smollm2",
        type=Path,
        help="folder with teacher/ and student/ (the SmolLM2 pair, or bench/gpt2_pair.py's)",
    )
    ap.add_argument("--out", type=Path, help="JSON of every run (written after each arm)")
    ap.add_argument("--report", type=Path, help="print the tables of a saved --out file and exit")
    args = ap.parse_args()
    args.arms = [x for x in args.arms.split(",") if x]
    if args.trl_python and "trl" not in args.arms:
        args.arms.insert(args.arms.index("loop") + 1 if "loop" in args.arms else len(args.arms), "trl")
    unknown = set(args.arms) - set(ALL_ARMS)
    if unknown or ("trl" in args.arms and not args.trl_python):
        raise SystemExit(f"unknown arms {sorted(unknown)} or trl without --trl-python")
    if args.skip < 1:
        raise SystemExit("--skip must be >= 1 (a step's wall time is measured from the step before it)")
    if args.report:  # the tables again from a saved run
        saved = json.loads(args.report.read_text())
        args.arms = [a for a in ALL_ARMS if a in saved["results"]]
        bench = Bench(args, args.report.parent, saved["overrides"], saved["models"], saved["results"])
        print(f"started {saved['started']}\n\n{report(bench)}")
        return
    common, models, prompts = setup(args)
    args.trl_prompts = prompts
    bench = Bench(args, Path(tempfile.mkdtemp(prefix="throughput-")), common, models)
    started = time.strftime("%Y-%m-%d %H:%M")

    def save() -> None:  # after every arm: a run cut short keeps what it measured
        if args.out:
            shown_args = {k: str(v) for k, v in vars(args).items() if k != "trl_prompts"}
            saved = {"started": started, "args": shown_args, "overrides": common, "models": models}
            args.out.write_text(json.dumps({**saved, "results": bench.results}, indent=2))

    for rep in range(args.repeats):
        for arm in args.arms:
            load = os.getloadavg()[0]
            try:
                r = bench.run(arm, rep)
            except (SystemExit, Exception) as exc:  # noqa: BLE001 - one failed arm must not lose the others
                print(
                    f"[{arm} rep {rep}] failed (output: {bench.work}/{arm}-{rep}.log): {str(exc)[-2000:]}", flush=True
                )
                continue
            r["load_before"], r["rep"] = load, rep
            bench.results.setdefault(arm, []).append(r)
            save()
            shown = {k: v for k, v in r.items() if isinstance(v, float | int)}
            print(f"[{arm} rep {rep}] " + ", ".join(f"{k} {v:.2f}" for k, v in shown.items()), flush=True)
    text = report(bench)
    loads = ", ".join(f"{r['load_before']:.0f}" for rs in bench.results.values() for r in rs)
    print(
        f"\nstarted {started}; {args.batch} completions x {args.tokens} tokens, alpha {args.alpha}; "
        f"1-minute load average before each run (arm by arm): {loads}\n"
    )
    print(text)


if __name__ == "__main__":
    main()
