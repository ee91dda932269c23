"""The driver: `python -m learner.main [--config PATH] [key.sub=value ...]`.

Reads one YAML config (default: configs/tiny.yaml), connects to the Ray cluster in `cluster.address` or
RAY_ADDRESS (`ray job submit` sets it; `RAY_ADDRESS=auto` joins a `ray start` head on this host) or starts a
local one, places the actors,
and runs the method's phases: SFT of the student (lowest validation loss kept) then MiniLLM, evaluating
validation ROUGE-L and the reverse KL to the teacher as it goes. Everything durable lands in one run folder in
`storage.path` (default: output_dir), written by the process that has it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from common.config import ConfigError, DistillConfig, load_config, resolve_path, storage_url
from common.data import DataError
from common.engine_env import IN_PROCESS_ENGINE
from common.errors import one_line_error
from common.models import ModelError
from common.preflight import preflight
from learner.run_log import RunStopped


def connect_ray(cfg: DistillConfig) -> str:
    """Join the cluster named by `cluster.address` or RAY_ADDRESS (set by `ray job submit`; `RAY_ADDRESS=auto`
    joins one started with `ray start` on this host), else start a private local one. No silent auto-join:
    a local Ray started by another run on this machine dies with that run."""
    import ray

    env = {
        **IN_PROCESS_ENGINE,
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": os.environ.get("WANDB_MODE", cfg.logging.wandb_mode),
    }
    runtime_env = {"env_vars": env}
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env)
        return f"connected to Ray at {address}"
    # "local": a new instance even when another Ray runs on this machine (ray.init() alone would join the cluster
    # last started here and ignore num_cpus)
    if cfg.cluster.worker_niceness is not None:  # the raylet reads it when it starts, and starts every worker with it
        os.environ["RAY_worker_niceness"] = str(cfg.cluster.worker_niceness)
    ray.init(address="local", num_cpus=cfg.cluster.num_cpus, include_dashboard=False, runtime_env=runtime_env)
    return f"started a local Ray ({cfg.cluster.num_cpus or os.cpu_count()} CPUs)"


def check_resources(cfg: DistillConfig) -> None:
    """Fail fast (instead of hanging on placement) when the cluster cannot hold the configured actors."""
    import ray

    from common.placement import plan_slots, resource_problems

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    problems = resource_problems(plan_slots(cfg), ray.cluster_resources(), nodes)
    if problems:
        raise ConfigError("impossible resource request (cluster.*_cpus/_gpus x actor counts): " + "; ".join(problems))


def parse_args(argv: list[str] | None) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m learner.main", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=None, help="YAML config (default: configs/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. learner.lr=1e-4")
    args = parser.parse_args(argv)
    return args.config, args.overrides


def run(cfg: DistillConfig) -> Path:
    import ray

    from common import storage
    from learner.checkpoint import find_resume, truncate_metrics
    from learner.recipe import Recipe
    from learner.run_log import RunLogger, prepare_run_dir

    t_start = time.time()
    # every check that needs no cluster, before Ray starts and before the run folder exists
    ready = preflight(cfg)
    cfg = ready.config  # Hub ids resolved to folders; config.yaml records them pinned to commits (ready.recorded)
    assets, tokenizer, vocab, train, valid = ready.assets, ready.tokenizer, ready.vocab, ready.train, ready.valid
    print(
        f"[models] teacher {assets.teacher_dir}\n[models] student {assets.student_dir} "
        f"(vocabulary {vocab.tokenizer_size})",
        flush=True,
    )

    scratch = resolve_path(cfg.output_dir, Path.cwd())  # the driver's local folder (wandb's offline files)
    store = storage_url(cfg)  # the run's folder in durable storage: everything the run keeps goes there
    point = find_resume(cfg.resume, store)  # a bad resume= path fails here, before Ray
    print(f"[ray] {connect_ray(cfg)}", flush=True)
    check_resources(cfg)
    # resuming a checkpoint of this run folder writes on in it; one from elsewhere starts this folder afresh
    same_folder = point is not None and point.path.startswith(store.rstrip("/") + "/")
    run_dir = prepare_run_dir(store, resume=same_folder)
    if point is not None and same_folder:  # metrics.jsonl continues after the checkpoint's last record
        truncate_metrics(run_dir, point.metrics_bytes)
        for name in ("sft_best", "best", "final"):
            storage.recover_dir(storage.join(run_dir, "checkpoints", name))
    logger = RunLogger(run_dir, ready.recorded, scratch=scratch)
    where = f" (driver scratch {scratch})" if run_dir != str(scratch) else ""
    print(f"[run] writing to {run_dir}{where}", flush=True)
    recipe = Recipe(cfg, assets, tokenizer, vocab.tokenizer_size, train, valid, logger, run_dir)
    recipe.state.resume_point = point
    try:
        summary = recipe.run()
        summary["wall_seconds"] = round(time.time() - t_start, 1)
        summary["resumed_from"] = point.path if point is not None else None
        summary["state_checkpoints"] = recipe.state.saver.timings
        logger.write_json("summary.json", summary)
        print(f"[run] done in {summary['wall_seconds']:.0f}s: {run_dir}", flush=True)
    finally:
        recipe.cleanup()
        logger.close()
        if ray.is_initialized():
            ray.shutdown()
        if cfg.logging.report:  # of a finished run, and of what a failed one logged
            from learner.report import write_at_end

            write_at_end(run_dir)
    return run_dir


def main(argv: list[str] | None = None) -> int:
    try:
        config_path, overrides = parse_args(argv)
        cfg = load_config(config_path, overrides)
        run(cfg)
    except (ConfigError, DataError, ModelError) as exc:
        print(f"error: {one_line_error(exc, with_type=False)}", file=sys.stderr)
        return 2
    except RunStopped as exc:
        print(f"error: run stopped: {exc}", file=sys.stderr)
        return 3
    except Exception as exc:  # an actor Ray could not bring back: one line, not a trace
        if not type(exc).__module__.startswith("ray."):
            raise
        print(f"error: run stopped: a Ray actor failed ({one_line_error(exc, limit=300)})", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
