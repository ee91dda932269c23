"""A short MiniLLM run of the tiny default inside the test process (real actors, the driver here), for tests that
watch or disturb the driver."""

from __future__ import annotations

from pathlib import Path

from common.config import load_config
from common.preflight import preflight
from learner.recipe import Recipe
from learner.run_log import RunLogger, prepare_run_dir

SHORT = [
    "learner.batch_size=4",
    "eval.every_steps=100",
    "eval.at_start=false",
    "learner.pretrain_batch_size=2",
    "logging.wandb_mode=disabled",
    "data.max_valid_examples=40",
    "data.max_train_examples=200",
]


def short_minillm_recipe(out_dir: Path, sft_checkpoint: Path, *overrides: str) -> tuple[Recipe, RunLogger]:
    """A Recipe starting MiniLLM from `sft_checkpoint` (no SFT phase), with `overrides` on top of SHORT."""
    cfg = load_config(
        overrides=[f"output_dir={out_dir}", f"models.sft_checkpoint={sft_checkpoint}", *SHORT, *overrides]
    )
    ready = preflight(cfg)
    run_dir = prepare_run_dir(Path(cfg.output_dir))
    logger = RunLogger(run_dir, cfg)
    recipe = Recipe(
        cfg, ready.assets, ready.tokenizer, ready.vocab.tokenizer_size, ready.train, ready.valid, logger, run_dir
    )
    return recipe, logger
