"""Soak: a long MiniLLM run of the tiny config with a small replay queue, watched from outside for leaks.

This script starts a private Ray cluster (ray.init here, with the dashboard for the state API) and runs the driver
(`python -m learner.main`) against it as a second process, so the cluster outlives the driver and what the run
leaves behind can be counted after it exits. While the run goes:

* the RSS of every process of the service (the driver, every Ray worker and actor, raylet, GCS, dashboard) is
  sampled every `--every` seconds, each sample tagged with the MiniLLM step reached (read from metrics.jsonl);
* the Ray object count (ray.util.state.list_objects: every reference any worker holds) is sampled every
  `--objects-every` steps.

After it: the least-squares slope of each process's RSS against the step, after `--warmup` steps, in MB per 100
steps, with its standard error and the residual standard deviation (the noise); the object counts at the first
sample after warm-up and at the end; the actors and placement groups still alive once the driver has exited.

    python -m bench.soak --steps 200 --out docs/soak.json

Takes minutes (200 steps at about 1.4 s each on an idle 2-core machine, plus start-up); not a CI test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import psutil

from bench.harness import ROOT, driver_command, fit, read_metrics, status_mb


def label(proc: psutil.Process, driver_pid: int) -> str:
    """A readable name: the driver, an actor's class (Ray titles its worker `ray::SamplerActor.sample`), or the
    executable (raylet, gcs_server, dashboard...)."""
    if proc.pid == driver_pid:
        return "driver"
    try:
        cmd = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "?"
    head = cmd[0] if cmd else proc.name()
    if head.startswith("ray::"):
        return head.removeprefix("ray::").split(".")[0].split(" ")[0]
    for part in cmd[:3]:
        name = Path(part).name
        if name in ("raylet", "gcs_server") or name.endswith(".py"):
            return name
    if "-m" in cmd[:-1]:
        return cmd[cmd.index("-m") + 1]
    return " ".join(Path(c).name for c in cmd[:2]) or proc.name()


def final(name: str) -> bool:
    """Whether a label is the one to keep: a worker's first title is its launcher script (default_worker.py) or
    ray::IDLE until it becomes an actor."""
    return name not in ("IDLE", "?", "default_worker.py", "setup_worker.py")


class Watcher:
    """Samples RSS of this process's descendants (the cluster and the driver) with the step the run is at."""

    def __init__(self, driver_pid: int, metrics: Path, every_s: float, last_step: int):
        self.driver_pid, self.metrics, self.every, self.last_step = driver_pid, metrics, every_s, last_step
        self.samples: list[tuple[float, int, int, str, float]] = []  # (time, step, pid, label, rss MB)
        self.step = 0
        self._offset = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def current_step(self) -> int:
        """The latest MiniLLM step in metrics.jsonl (read incrementally)."""
        if self.metrics.is_file():
            with self.metrics.open("rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
            end = data.rfind(b"\n") + 1
            self._offset += end
            for line in data[:end].splitlines():
                rec = json.loads(line)
                if rec.get("phase") == "minillm":
                    self.step = rec["step"]
        return self.step

    def _loop(self) -> None:
        me = psutil.Process()
        labels: dict[int, str] = {}
        while not self._stop.is_set():
            step, now = self.current_step(), time.time()
            if step >= self.last_step:  # the run's end (final save, clean-up, exit) is not the steady state
                break
            for proc in me.children(recursive=True):
                try:
                    rss = status_mb("VmRSS", proc.pid)
                    # a worker's title changes with the task it runs: keep the first actor name seen for its pid
                    if proc.pid not in labels or not final(labels[proc.pid]):
                        labels[proc.pid] = label(proc, self.driver_pid)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                self.samples.append((now, step, proc.pid, labels[proc.pid], rss))
            self._stop.wait(self.every)


def rss_report(samples: list[tuple[float, int, int, str, float]], warmup: int) -> list[dict[str, Any]]:
    """Per process: the fit after `warmup` steps. "flat": the slope is within two standard errors of zero, or the
    growth it predicts over the whole window is under two residual SDs (the jitter of single samples): a slope that
    OLS calls significant (its SE ignores that successive samples are correlated) but that is smaller than the
    jitter is not read as a leak."""
    by_pid: dict[int, list[tuple[int, float]]] = defaultdict(list)
    names: dict[int, str] = {}
    for _, step, pid, name, rss in samples:
        names[pid] = name
        by_pid[pid].append((step, rss))
    rows = []
    for pid, pts in by_pid.items():
        pts = [(s, r) for s, r in pts if r > 0]  # a process being reaped reads 0
        after = [(s, r) for s, r in pts if s >= warmup]
        if len(after) < 3:
            continue
        f = fit([float(s) for s, _ in after], [r for _, r in after])
        rows.append(
            {
                "process": names[pid],
                "pid": pid,
                "samples": f["n"],
                "rss_first_mb": round(pts[0][1], 1),  # at the first sample of the run (step 0 or 1)
                "rss_start_mb": round(after[0][1], 1),
                "rss_end_mb": round(after[-1][1], 1),
                "rss_max_mb": round(max(r for _, r in pts), 1),
                "slope_mb_per_100_steps": round(100 * f["slope"], 3),
                "slope_se_mb_per_100_steps": round(100 * f["se"], 3),
                "resid_sd_mb": round(f["resid_sd"], 2),
                "growth_over_window_mb": round(f["slope"] * (after[-1][0] - after[0][0]), 2),
                "flat": abs(f["slope"]) <= 2 * f["se"]
                or abs(f["slope"]) * (after[-1][0] - after[0][0]) <= 2 * f["resid_sd"],
                "trace": [(s, round(r, 1)) for s, r in pts[:: max(1, len(pts) // 40)]],
            }
        )
    return sorted(rows, key=lambda r: -r["rss_end_mb"])


def field(state: Any, key: str) -> Any:
    """A field of a state-API row (a dataclass, or a dict in some Ray versions)."""
    return state[key] if isinstance(state, dict) else getattr(state, key)


def count_objects(api: str) -> dict[str, Any]:
    from ray.util.state import list_objects

    objs = list_objects(address=api, limit=10_000, raise_on_missing_output=False)
    by_type: dict[str, int] = defaultdict(int)
    size = 0
    for o in objs:
        by_type[str(field(o, "reference_type"))] += 1
        size += field(o, "object_size") or 0
    return {"objects": len(objs), "bytes": size, "by_reference_type": dict(by_type)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=100, help="steps left out of the slopes")
    ap.add_argument("--queue", type=int, default=2, help="learner.replay_capacity (batches)")
    ap.add_argument("--every", type=float, default=2.0, help="seconds between RSS samples")
    ap.add_argument("--objects-every", type=int, default=20, help="steps between object counts")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the figures here (JSON)")
    ap.add_argument("overrides", nargs="*", help="more key=value overrides for the run")
    args = ap.parse_args()

    import ray
    from ray.util.state import list_actors, list_placement_groups

    from common.tiny import tiny_models_for

    tiny = tiny_models_for()
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    # a private cluster owned by this process (a second driver): it outlives the run, so leaks can be counted
    os.environ.pop("RAY_ADDRESS", None)  # never join another cluster on this machine
    os.environ.setdefault("RAY_worker_niceness", "0")  # as learner.main's local Ray (cluster.worker_niceness)
    ctx = ray.init(num_cpus=args.num_cpus, include_dashboard=True, namespace="soak")
    address = ctx.address_info["gcs_address"]
    api = f"http://{ctx.dashboard_url}"  # the state API of this cluster (other clusters may run on the machine)
    overrides = [
        f"models.sft_checkpoint={tiny.student}",  # MiniLLM only: the soak's subject
        f"learner.minillm_steps={args.steps}",
        f"learner.replay_capacity={args.queue}",
        *"eval.every_steps=50 eval.num_prompts=16 eval.kl_prompts=16".split(),
        *"logging.wandb_mode=disabled logging.progress_every=20".split(),
        *args.overrides,
    ]
    env = {**os.environ, "RAY_ADDRESS": address, "WANDB_MODE": "disabled"}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    log = (work / "driver.log").open("w")
    t0 = time.time()
    proc = subprocess.Popen(
        driver_command(work / "run", overrides), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    print(f"[soak] driver pid {proc.pid}, Ray at {address}, run in {work}", flush=True)
    watcher = Watcher(proc.pid, work / "run" / "metrics.jsonl", args.every, args.steps)
    watcher.start()
    objects: list[dict[str, Any]] = []
    next_count = 0
    while proc.poll() is None:
        step = watcher.step
        if step > 0 and (step >= next_count or (step >= args.steps and objects[-1]["step"] < args.steps)):
            objects.append({"step": step, **count_objects(api)})
            print(f"[soak] step {step}: {objects[-1]['objects']} objects ({time.time() - t0:.0f}s)", flush=True)
            next_count = step + args.objects_every
        time.sleep(1.0)
    watcher.stop()
    rc = proc.wait()
    log.close()
    wall = time.time() - t0
    if rc != 0:
        print((work / "driver.log").read_text()[-3000:])
        print(f"[soak] the driver exited with {rc}", flush=True)
    # once the driver is gone: what it left on the cluster (Ray reaps a dead job's actors in a few seconds)
    time.sleep(10)
    actors = list_actors(address=api, limit=10_000, raise_on_missing_output=False)
    alive = [a for a in actors if field(a, "state") != "DEAD"]
    groups = list_placement_groups(address=api, limit=1000, raise_on_missing_output=False)
    groups = [g for g in groups if field(g, "state") != "REMOVED"]
    after_exit = count_objects(api)
    workers = []  # actor processes still running (idle pool workers, `ray::IDLE`, are Ray's and expected)
    for p in psutil.Process().children(recursive=True):
        try:
            title = p.cmdline()[0] if p.cmdline() else ""
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        # Ray's own per-node agents (ray::DashboardAgent, ray::RuntimeEnvAgent) live as long as the cluster
        if title.startswith("ray::") and not title.startswith("ray::IDLE") and not title.endswith("Agent"):
            workers.append(title)

    steps = read_metrics(work / "run" / "metrics.jsonl")
    rows = rss_report(watcher.samples, args.warmup)
    # the count at the last step races the driver's exit (it read 0 once): the fit takes the counts before it
    post = [o for o in objects if args.warmup <= o["step"] < args.steps]
    obj_fit = fit([float(o["step"]) for o in post], [float(o["objects"]) for o in post]) if len(post) >= 3 else {}
    gaps = sorted(b["time"] - a["time"] for a, b in zip(steps, steps[1:], strict=False))
    result = {
        "command": "python -m bench.soak " + " ".join(sys.argv[1:]),
        "overrides": [f"output_dir={work / 'run'}", *overrides],
        "driver_exit_code": rc,
        "wall_seconds": round(wall, 1),
        "minillm_steps_logged": len(steps),
        "seconds_per_step_median": gaps[len(steps) // 2] if len(steps) > 2 else None,
        "warmup_steps": args.warmup,
        "rss": rows,
        "objects": objects,
        "objects_slope_per_100_steps": round(100 * obj_fit["slope"], 2) if obj_fit else None,
        "objects_after_exit": after_exit,
        "actors_alive_after_exit": [f"{field(a, 'class_name')} ({field(a, 'state')})" for a in alive],
        "placement_groups_left": [f"{field(g, 'name')} ({field(g, 'state')})" for g in groups],
        "ray_workers_left": workers,
        "load_average": os.getloadavg(),
    }
    print(f"\n[soak] {len(steps)} MiniLLM steps in {wall:.0f}s, driver exit code {rc}")
    print(
        f"\n| process | samples | RSS step 1 / {args.warmup} / end (MB) | slope MB/100 steps | ± SE | noise SD (MB) "
        "| flat |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['process']} | {r['samples']} | {r['rss_first_mb']} / {r['rss_start_mb']} / {r['rss_end_mb']} | "
            f"{r['slope_mb_per_100_steps']:+.2f} | {r['slope_se_mb_per_100_steps']:.2f} | {r['resid_sd_mb']:.2f} | "
            f"{'yes' if r['flat'] else 'NO'} |"
        )
    print(f"\nobjects: {[(o['step'], o['objects']) for o in objects]}; after exit {after_exit['objects']}")
    print(f"actors alive after exit: {result['actors_alive_after_exit']}; placement groups: {groups and len(groups)}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    ray.shutdown()
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
