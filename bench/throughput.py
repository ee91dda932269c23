"""MiniLLM throughput of the service beside what a user would run instead, in one run on the same models, prompts
and lengths (issue #14, item 6). Arms, each a fresh process, run in turn once per repeat (A, B, C, ..., A, B, C, ...)
so every comparison is between runs side by side; medians over repeats and the per-repeat ratios are printed.

  service      python -m learner.main: MiniLLM (alpha, L_PT) from the student (no SFT phase, no evaluation)
  service-a0   the same at alpha = 0 without L_PT (objective.pt_weight=0)
  service-ppo  the service with the paper's PPO schedule (--epochs inner epochs over mini-batches of --minibatch,
               with --collection); `service` then makes one update per sampled batch of the same collection
  service:SPEC the service (or service-a0, service-ppo) with another on-policy objective (docs/objectives.md):
               SPEC is an objective.kind or `lmops` (objective.variant=lmops), then `:key=value` objective fields
               (`lambda` for on_policy_fraction): service:gkd:beta=0.5:lambda=0.5, service:sampled_rkl, ...;
               the objectives table gives tok/s, learner step and teacher bytes per token beside the base arm's
  service@REV  the service at git revision REV (--rev, repeatable), run from a worktree of it: step time and the
               driver's peak RSS of two versions; overrides REV's config does not know are left out
  loop         the same maths in one plain torch process (python -m bench._single_process loop): lockstep mixture
               sampling with both KV caches, teacher scoring, one update with learner/objectives.py; no Ray, no vLLM
  loop-a0      the loop at alpha = 0 without L_PT (the student samples alone)
  stages       the service's stage classes timed alone on each batch (python -m bench._single_process stages): the
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
ones divided among their sharers, sampled every second; the driver's own peak RSS beside it. With --collection,
--steps and --skip count collections, and a step is a collection.

    python -m bench.throughput [--repeats 2] [--steps 8] [--batch 8] [--tokens 64] [--alpha 0.2]
        [--trl-python /work/trl-venv/bin/python] [--threads N] [--arms service,loop,...] [--out results.json]
        [--pair DIR]                       # DIR/teacher and DIR/student instead of the tiny default
    python -m bench.throughput --arms service,service-ppo --batch 16 --tokens 48 --collection 64 --epochs 4 \\
        --minibatch 16 --steps 3 --skip 1          # time per collection: PPO inner epochs vs one update per batch
    python -m bench.throughput --arms '' --rev 68f1867 --rev HEAD --batch 16 --tokens 48 --steps 14  # two versions
    python -m bench.throughput --pair DIR --arms service,service:lmops,service:gkd,service:sampled_rkl  # objectives

--threads: torch threads of the single-process arms (loop, trl), by default every core of the machine, as a one-box
user runs them; the service's actors keep their own (cluster.torch_threads: 1 each on the default). On a machine
shared with other jobs, OpenMP threads that outnumber the free cores spin: measure both counts before quoting one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import ROOT, alternate, bench_env, driver_command, median, read_metrics, watch
from bench.throughput_report import report

ALL_ARMS = ("service", "loop", "trl", "stages", "service-a0", "loop-a0", "stages-a0", "service-ppo")
OBJECTIVE_ALIASES = {"lambda": "on_policy_fraction"}  # GKD's name for it


def objective_overrides(arm: str) -> list[str]:
    """The objective of a `BASE:SPEC` arm as overrides: `service:gkd:beta=0.5:lambda=0.5` -> objective.kind=gkd,
    objective.beta=0.5, objective.on_policy_fraction=0.5; `service:lmops` -> objective.variant=lmops; none without
    a SPEC."""
    name, *fields = arm.split(":")[1:] or [""]
    if not name:
        return []
    out = ["objective.variant=lmops" if name == "lmops" else f"objective.kind={name}"]
    for item in fields:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"{item!r} is not key=value")
        out.append(f"objective.{OBJECTIVE_ALIASES.get(key, key)}={value}")
    return out


def check_arms(arms: list[str]) -> None:
    """Fail fast, naming the arm, on an unknown arm or an objective SPEC the configuration refuses."""
    from common.config import load_config

    for arm in arms:
        base = arm.split(":")[0]
        if base not in ALL_ARMS or (":" in arm and not base.startswith("service")):
            raise SystemExit(f"unknown arm {arm!r} (objectives apply to the service arms only: service:SPEC)")
        try:
            load_config(None, objective_overrides(arm))
        except Exception as exc:  # noqa: BLE001 - any refusal of the SPEC, as one line
            raise SystemExit(f"arm {arm!r}: {str(exc).splitlines()[-1].strip()}") from None


def _last_json(out: str) -> dict[str, Any]:
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON result line")


def worktree(rev: str, work: Path) -> Path:
    """A detached git worktree of `rev` under `work` (removed by main at the end)."""
    path = work / f"rev-{rev.replace('/', '_')}"
    if not path.exists():
        cmd = ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev]
        subprocess.run(cmd, check=True, capture_output=True)
    return path


def known_to(tree: Path, overrides: list[str]) -> list[str]:
    """The overrides a revision's own load_config accepts, each tried alone (eval.at_start did not always exist)."""
    code = "import json, sys\nfrom common.config import load_config\nok = []\nfor o in json.loads(sys.argv[1]):\n"
    code += "    try:\n        load_config(None, [o]); ok.append(o)\n    except Exception:\n        pass\n"
    code += "print(json.dumps(ok))"
    cmd = [sys.executable, "-c", code, json.dumps(overrides)]
    out = subprocess.run(cmd, cwd=tree, env=bench_env(cwd=tree), capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ===== the arms ======================================================================================
@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    overrides: list[str]  # the run's configuration, shared by the service and the single-process arms
    models: dict[str, str]  # teacher, student, tokenizer folders
    results: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def arm_overrides(self, arm: str) -> list[str]:
        a, base = self.args, arm.split(":")[0]
        if base.endswith("-a0"):
            out = [*self.overrides, "objective.alpha=0", "objective.pt_weight=0"]
        else:
            out = [*self.overrides, f"objective.alpha={a.alpha}"]
        if a.collection and arm.startswith("service"):
            ppo = base == "service-ppo"
            out += [
                f"learner.rollouts_per_collection={a.collection}",
                f"learner.ppo_epochs={a.epochs if ppo else 1}",
                f"learner.minibatch_size={a.minibatch if ppo else a.batch}",
            ]
        return out + objective_overrides(arm)

    def updates_per_batch(self, arm: str) -> float:
        a = self.args
        return a.epochs * a.batch / a.minibatch if arm.split(":")[0] == "service-ppo" else 1.0

    def run(self, arm: str, rep: int) -> dict[str, Any]:
        kind = arm.split("-")[0].split("@")[0].split(":")[0]
        fn = {"service": self.service, "loop": self.single, "stages": self.single, "trl": self.trl}[kind]
        return fn(arm, rep)

    def service(self, arm: str, rep: int) -> dict[str, Any]:
        a = self.args
        tag = arm.replace("@", "-at-").replace("/", "_").replace(":", "_")
        out_dir = self.work / f"{tag}-{rep}"
        metrics = out_dir / "metrics.jsonl"
        per_step = round(a.collection / a.batch * self.updates_per_batch(arm)) if a.collection else 1
        overrides = [f"learner.minillm_steps={(a.steps + a.skip) * per_step}", *self.arm_overrides(arm)]
        tree = worktree(arm.split("@")[1], self.work) if "@" in arm else ROOT
        if tree != ROOT:
            overrides = known_to(tree, overrides)

        def first_step() -> bool:
            return metrics.is_file() and '"phase": "minillm"' in metrics.read_text()

        log = self.work / f"{tag}-{rep}.log"
        w = watch(driver_command(out_dir, overrides), tree, bench_env(cwd=tree), first_step, log)
        if w.returncode != 0:
            raise SystemExit(f"{arm} failed:\n{w.output[-3000:]}")
        recs = read_metrics(metrics)
        ends = [r for r in recs if r["step"] % per_step == 0]  # the last update of each step (or collection)
        start, kept = ends[a.skip - 1], ends[a.skip :]
        wall = kept[-1]["time"] - start["time"]
        measured = [r for r in recs if r["step"] > start["step"]]
        batches = len(measured) / self.updates_per_batch(arm)
        tokens = sum(r["tokens"] for r in measured) / (a.epochs if arm.split(":")[0] == "service-ppo" else 1)
        busy = {
            "sampler": sum(r["tokens"] / r["sampler_tokens_per_s"] for r in measured if "sampler_tokens_per_s" in r),
            "teacher": sum(r["tokens"] / r["teacher_tokens_per_s"] for r in measured if "teacher_tokens_per_s" in r),
            "learner": sum(r["step_seconds"] for r in measured),
            "learner idle (wait)": sum(r.get("wait_seconds", 0.0) for r in measured),
            "push (driver)": sum(r.get("push_seconds", 0.0) for r in measured),
        }
        cpu = {  # process CPU time (all threads) of each stage's work: wall / CPU tells waiting for a core from work
            "sampler": sum(r.get("sample_cpu_seconds", 0.0) for r in measured),
            "teacher": sum(r.get("score_cpu_seconds", 0.0) for r in measured),
            "learner": sum(r.get("step_cpu_seconds", 0.0) for r in measured),
        }
        gaps = [b["time"] - x["time"] for x, b in zip([start, *kept], kept, strict=False)]
        return {
            "tok_per_s": tokens / wall,
            "step_s": wall / len(kept),
            "step_median_s": median(gaps),
            "updates_per_step": per_step,
            "busy_share": {k: v / wall for k, v in busy.items()},
            "cpu_share": {k: v / wall for k, v in cpu.items()},
            "cpu_per_batch_s": {k: v / batches for k, v in cpu.items()},
            "busy_per_batch_s": {k: v / batches for k, v in busy.items()},
            "peak_pss_mb": w.peak_pss_mb,
            "peak_rss_mb": w.peak_rss_mb,
            "driver_peak_rss_mb": w.peak_own_rss_mb,
            "to_step1_s": w.first_seen_s,
            "mean_response_tokens": tokens / batches / a.batch,
            "learner_step_s": median([r["step_seconds"] for r in measured]),
            # the teacher's payload per trained response token: its rows for the rollouts (BatchInfo.teacher_bytes)
            # and, with objective.pt_kd_ratio > 0, for the pre-training block (pt_teacher_bytes)
            "teacher_bytes_per_token": sum(r["teacher_bytes_per_token"] * r["tokens"] for r in measured)
            / max(sum(r["tokens"] for r in measured), 1),
            "pt_teacher_bytes_per_token": sum(r.get("pt_teacher_bytes", 0.0) for r in measured)
            / max(sum(r["tokens"] for r in measured), 1),
        }

    def single(self, arm: str, rep: int) -> dict[str, Any]:
        what = arm.split("-")[0]
        threads = self.args.threads if what == "loop" else 1  # stages: each actor's thread count in the service
        steps = ["--steps", str(self.args.steps + self.args.skip), "--skip", str(self.args.skip)]
        cmd = [sys.executable, "-m", "bench._single_process", what, "--threads", str(threads), *steps]
        w = watch([*cmd, *self.arm_overrides(arm)], ROOT, bench_env(threads), log=self.work / f"{arm}-{rep}.log")
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
        a = self.args
        spec = {
            **self.models,
            **{k: getattr(a, k) for k in ("trl_prompts", "batch", "tokens", "lr", "threads")},
            "steps": a.steps + a.skip,
            "seed": 0,
            "output_dir": str(self.work / f"{arm}-{rep}"),
        }
        spec["prompts"] = spec.pop("trl_prompts")
        path = self.work / f"{arm}-{rep}.json"
        path.write_text(json.dumps(spec))
        cmd = [a.trl_python, str(ROOT / "bench" / "_trl_arm.py"), str(path)]  # in TRL's venv: a script, not -m
        w = watch(cmd, ROOT, bench_env(a.threads), log=self.work / f"{arm}-{rep}.log")
        if w.returncode != 0:
            raise SystemExit(f"{arm} failed:\n{w.output[-3000:]}")
        r = _last_json(w.output)
        steps = r.pop("steps")
        kept = steps[a.skip :]
        wall = kept[-1]["end"] - steps[a.skip - 1]["end"]
        tokens = sum(s["tokens"] for s in kept)
        return {
            **r,
            "tok_per_s": tokens / wall,
            "step_s": wall / len(kept),
            "to_step1_s": steps[0]["end"],
            "peak_pss_mb": w.peak_pss_mb,
            "peak_rss_mb": w.peak_rss_mb,
            "mean_response_tokens": tokens / len(kept) / a.batch,
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
        *"eval.every_steps=100000 eval.at_start=false eval.at_end=false checkpoint.every_steps=0".split(),
        *"logging.wandb_mode=disabled logging.progress_every=1000".split(),
    ]
    if args.smollm2:
        t, s = args.smollm2 / "teacher", args.smollm2 / "student"
        models = {"teacher": str(t), "student": str(s), "tokenizer": str(s)}
        common += [
            "models.source=local",
            f"models.teacher={t}",
            f"models.student={s}",
            *"sampler.kv_cache_mb=1024 teacher.batch_size=4 data.max_prompt_tokens=96".split(),
            *"learner.pretrain_batch_size=4 eval.num_prompts=8 eval.kl_prompts=8".split(),
        ]
    else:
        from common.tiny import tiny_models_for

        tiny = tiny_models_for()
        models = {"teacher": str(tiny.teacher), "student": str(tiny.student), "tokenizer": str(tiny.tokenizer)}
    common.append(f"models.sft_checkpoint={models['student']}")  # MiniLLM from the student as it is: no SFT phase
    if "trl" not in args.arms:  # only TRL's arm takes prompt texts; tokenizing the data set costs minutes on 2 cores
        return common, models, []
    cfg = load_config(None, common)
    tok = load_tokenizer(models["tokenizer"])
    items, _ = tokenize_examples(
        load_jsonl(resolve_path(cfg.data.train)), tok, cfg.data.max_prompt_tokens, cfg.data.max_response_tokens
    )
    batches = iterate_batches(items, args.batch, cfg.seed + 1)
    n = args.steps + args.skip + 2
    prompts = [str(tok.decode(it.prompt_ids)) for _ in range(n) for it in next(batches)]
    return common, models, prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="steps measured per run (after --skip warm-up steps)")
    ap.add_argument("--skip", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="completions per step")
    ap.add_argument("--tokens", type=int, default=64, help="max new tokens per completion")
    ap.add_argument("--alpha", type=float, default=0.2)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the loop and TRL arms")
    ap.add_argument("--arms", default=",".join(a for a in ALL_ARMS if a not in ("trl", "service-ppo")))
    ap.add_argument("--trl-python", help="python of a virtual environment with trl (adds the trl arm)")
    ap.add_argument("--pair", "--smollm2", dest="smollm2", type=Path, help="folder with teacher/ and student/")
    ap.add_argument("--collection", type=int, help="rollouts per collection of the service arms (paper: 256)")
    ap.add_argument("--epochs", type=int, default=4, help="inner epochs of service-ppo (paper: 4)")
    ap.add_argument("--minibatch", type=int, default=16, help="rollouts per update of service-ppo (paper: 64)")
    ap.add_argument("--rev", action="append", default=[], help="a git revision to run the service arm of")
    ap.add_argument("--out", type=Path, help="JSON of every run (written after each arm)")
    ap.add_argument("--report", type=Path, help="print the tables of a saved --out file and exit")
    args = ap.parse_args()
    args.arms = [x for x in args.arms.split(",") if x]
    if args.trl_python and "trl" not in args.arms:
        args.arms.insert(args.arms.index("loop") + 1 if "loop" in args.arms else len(args.arms), "trl")
    check_arms(args.arms)
    if ("trl" in args.arms and not args.trl_python) or (
        any(x.startswith("service-ppo") for x in args.arms) and not args.collection
    ):
        raise SystemExit("trl without --trl-python or service-ppo without --collection")
    args.arms += [f"service@{rev}" for rev in args.rev]
    if args.skip < 1:
        raise SystemExit("--skip must be >= 1 (a step's wall time is measured from the step before it)")
    if args.report:  # the tables again from a saved run
        saved = json.loads(args.report.read_text())
        args.arms = [a for a in dict.fromkeys([*ALL_ARMS, *saved["results"]]) if a in saved["results"]]
        print(f"started {saved['started']}\n\n{report(saved['results'], args)}")
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

    try:
        alternate(args.arms, args.repeats, bench.run, bench.results, save)
    finally:
        for tree in bench.work.glob("rev-*"):
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    save()
    loads = ", ".join(f"{r['load_before']:.0f}" for rs in bench.results.values() for r in rs)
    print(
        f"\nstarted {started}; {args.batch} completions x {args.tokens} tokens, alpha {args.alpha}, {args.threads} "
        f"threads for loop and trl; 1-minute load average before each run (arm by arm): {loads} (logs: {bench.work})\n"
    )
    print(report(bench.results, args))


if __name__ == "__main__":
    main()
