"""SeqKD's data: the teacher's own samples for the training prompts, drawn through the samplers (alpha = 1)."""

from __future__ import annotations

import random
import time

import ray

from common.config import DistillConfig
from common.data import TokenizedExample


def sample_teacher_responses(
    cfg: DistillConfig, samplers: list, items: list[TokenizedExample]
) -> list[TokenizedExample]:
    """The teacher's responses for a shuffled draw of the training prompts `items`, as many as the phase consumes
    (every sampler works at once); empty responses left out."""
    pool = list(items)
    random.Random(cfg.seed + 7).shuffle(pool)
    prompts = pool[: min(len(pool), cfg.learner.sft_steps * cfg.learner.sft_batch_size)]
    chunk, t0 = 256, time.time()
    parts = [prompts[i : i + chunk] for i in range(0, len(prompts), chunk)]
    refs = [
        samplers[k % len(samplers)].sample.remote(
            [it.prompt_ids for it in part],
            [it.index for it in part],
            alpha=1.0,
            max_new_tokens=cfg.data.max_response_tokens,
        )
        for k, part in enumerate(parts)
    ]
    out: list[TokenizedExample] = []
    for k, (part, ref) in enumerate(zip(parts, refs, strict=True)):
        responses = ray.get(ref).response_ids
        out.extend(TokenizedExample(it.prompt_ids, r, it.index) for it, r in zip(part, responses, strict=True) if r)
        print(
            f"[seqkd] teacher responses {min((k + 1) * chunk, len(prompts))}/{len(prompts)} ({time.time() - t0:.0f}s)",
            flush=True,
        )
    return out
