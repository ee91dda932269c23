"""What the benches share: running the driver into a folder, reading metrics.jsonl, alternating arms side by side,
medians and ratios, memory readers (/proc), and a least-squares slope. Imports no torch (a bench sets its thread
count before torch loads: `pin_threads`)."""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def pin_threads(default: int | None = None) -> str:
    """OMP_NUM_THREADS / MKL_NUM_THREADS from `--threads` in argv (default: every core), before torch loads: OpenMP
    reads them once."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--threads", default=str(default or os.cpu_count() or 1))
    threads = ap.parse_known_args()[0].threads
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads
    return threads


# ===== the driver ====================================================================================
def bench_env(threads: int | None = None, cwd: Path = ROOT) -> dict[str, str]:
    """A subprocess's environment: always a private local Ray (never a shared one), this tree's code first."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(cwd)
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def driver_command(out_dir: Path, overrides: Iterable[str]) -> list[str]:
    """`python -m learner.main` into `out_dir`, as a user types it."""
    return [sys.executable, "-m", "learner.main", f"output_dir={out_dir}", *overrides]


def read_metrics(path: Path, phase: str | None = "minillm") -> list[dict[str, Any]]:
    """The records of metrics.jsonl (of one phase; None: all)."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if phase is None or r.get("phase") == phase]


# ===== memory ========================================================================================
def status_mb(field: str, pid: int | str = "self") -> float:
    """A /proc/PID/status field in MB (VmRSS, VmHWM, ...); 0 once the process is gone (or a zombie)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def tree_memory_mb(pid: int) -> tuple[float, float]:
    """(sum of PSS, sum of RSS) in MB over a process and all its descendants (Ray's processes are the driver's):
    PSS divides shared pages among their sharers."""
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
    """A finished process: its output, peak memory (its tree's PSS and RSS, its own RSS), and when `first_seen`
    first held (seconds from launch)."""

    returncode: int
    output: str
    peak_pss_mb: float
    peak_rss_mb: float
    peak_own_rss_mb: float
    first_seen_s: float | None
    wall_s: float


def watch(
    cmd: list[str],
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    first_seen: Callable[[], bool] | None = None,
    log: Path | None = None,
) -> Watched:
    """Run `cmd` to its end, sampling its process tree's memory every second."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stop = threading.Event()
    peak = [0.0, 0.0, 0.0]
    seen: list[float] = []

    def poll() -> None:
        while not stop.wait(1.0):
            pss, rss = tree_memory_mb(proc.pid)
            peak[:] = max(peak[0], pss), max(peak[1], rss), max(peak[2], status_mb("VmRSS", proc.pid))
            if first_seen is not None and not seen and first_seen():
                seen.append(time.perf_counter() - t0)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    out, _ = proc.communicate()
    stop.set()
    poller.join()
    if log is not None:  # the whole output, for a run that fails
        log.write_text(out)
    return Watched(proc.returncode, out, *peak, seen[0] if seen else None, time.perf_counter() - t0)


# ===== side by side ==================================================================================
def alternate(
    arms: Iterable[str],
    repeats: int,
    run: Callable[[str, int], dict[str, Any]],
    results: dict[str, list[dict[str, Any]]] | None = None,
    saved: Callable[[], None] = lambda: None,
) -> dict[str, list[dict[str, Any]]]:
    """Every arm once per repeat, in turn (A, B, C, A, B, C, ...), so that every ratio compares runs minutes apart;
    results[arm] gets each run's result (with `rep` and the load average before it), then `saved()` is called. An
    arm that fails loses that repeat only."""
    arms = list(arms)
    results = {} if results is None else results
    for rep in range(repeats):
        for arm in arms:
            load = os.getloadavg()[0]
            try:
                r = run(arm, rep)
            except (SystemExit, Exception) as exc:  # noqa: BLE001 - one failed arm must not lose the others
                print(f"[{arm} rep {rep}] failed: {str(exc)[-2000:]}", flush=True)
                continue
            r["load_before"], r["rep"] = load, rep
            results.setdefault(arm, []).append(r)
            saved()
            shown = {k: v for k, v in r.items() if isinstance(v, float | int)}
            print(f"[{arm} rep {rep}] " + ", ".join(f"{k} {v:.2f}" for k, v in shown.items()), flush=True)
    return results


def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def side_by_side(res: dict[str, list[dict]], x: str, y: str) -> list[tuple[dict, dict]]:
    """The results of arms x and y from the same repeats (an arm that failed in a repeat drops that repeat)."""
    ys = {r.get("rep", i): r for i, r in enumerate(res.get(y, []))}
    return [(r, ys[k]) for i, r in enumerate(res.get(x, [])) if (k := r.get("rep", i)) in ys]


def ratios(res: dict[str, list[dict]], x: str, y: str, key: str) -> list[float]:
    """x / y of `key`, repeat by repeat."""
    return [rx[key] / ry[key] for rx, ry in side_by_side(res, x, y)]


# ===== slope =========================================================================================
def fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least squares y = a + b x: slope b, its standard error, the residual standard deviation."""
    n = len(xs)
    mx, my = sum(xs) / max(n, 1), sum(ys) / max(n, 1)
    sxx = sum((x - mx) ** 2 for x in xs)
    if n < 2 or sxx == 0:
        return {"slope": math.nan, "se": math.nan, "resid_sd": math.nan, "n": n}
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    a = my - b * mx
    if n < 3:
        return {"slope": b, "se": math.nan, "resid_sd": math.nan, "n": n}
    sd = math.sqrt(sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True)) / (n - 2))
    return {"slope": b, "se": sd / math.sqrt(sxx), "resid_sd": sd, "n": n}
