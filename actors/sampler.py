"""Sampler: exact per-token samples from the teacher-mixed distribution alpha*p + (1-alpha)*q on stock vLLM.

Coins are drawn up front (common/mixture.py); each run of equal coins is one continuation by the owning
engine, in global rounds (all student segments in one call, then all teacher segments in one call), so the
number of engine calls grows with the number of segments, not with the response length. After generation
one prompt-log-prob pass of the student engine records the student's log-prob of every response token
(including the teacher-sampled ones) under exactly the weights that sampled the batch.

Ray runs one method of an actor at a time, so a weight push queued behind `sample` lands between batches:
a batch never mixes old and new weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from actors.engine import VLLMEngine
from common.mixture import STUDENT, TEACHER, draw_owners
from common.rollout import Rollouts


@dataclass(frozen=True)
class SamplerSpec:
    student_dir: str
    teacher_dir: str | None  # needed when alpha > 0
    eos_token_id: int
    max_new_tokens: int
    alpha: float = 0.0
    temperature: float = 1.0
    kv_cache_mb: int = 256
    seed: int = 0
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int = 1
    max_model_len: int = 1024
    dtype: str = "float32"  # the compute dtype (models.dtype); float32 on CPU
    enforce_eager: bool = True  # False: CUDA graphs on GPU


class Sampler:
    def __init__(self, spec: SamplerSpec):
        self.spec = spec
        engine_args = dict(
            kv_cache_bytes=spec.kv_cache_mb << 20,
            seed=spec.seed,
            max_model_len=spec.max_model_len,
            tensor_parallel_size=spec.tensor_parallel_size,
            dtype=spec.dtype,
            enforce_eager=spec.enforce_eager,
            gpu_memory_utilization=spec.gpu_memory_utilization,
        )
        self.student = VLLMEngine(spec.student_dir, **engine_args)
        self.teacher = VLLMEngine(spec.teacher_dir, **engine_args) if spec.teacher_dir else None
        self.rng = np.random.default_rng(spec.seed)
        self.version = 0
        self.stats = {
            "engine_calls": 0,
            "sampled_tokens": 0,
            "sample_seconds": 0.0,
            "weight_pushes": 0,
            "push_seconds": 0.0,
        }

    # ----- weights -----------------------------------------------------------------------------------
    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> int:
        """Replace the student's weights (HF names) and adopt `version`. Raises if the push fails."""
        if version <= self.version:
            raise ValueError(f"weight version must increase: have {self.version}, got {version}")
        t0 = time.perf_counter()
        self.student.load_weights(state_dict)
        self.version = version
        self.stats["weight_pushes"] += 1
        self.stats["push_seconds"] += time.perf_counter() - t0
        return self.version

    def join_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str) -> bool:
        """Join the learner's weight group as a receiver (collective with the learner's rank 0)."""
        from common.weight_sync import WeightGroup, WeightReceiver

        self.receiver = WeightReceiver(WeightGroup(host, port, rank, world_size, backend))
        return True

    def receive_weights(self) -> int:
        """Take the next collective push (blocks until the learner sends) and load it; returns the new version."""
        version, named = self.receiver.receive()
        return self.load_weights(dict(named), version)

    def get_version(self) -> int:
        return self.version

    def reseed(self, seed: int) -> None:
        """Re-seed every RNG a batch draws from (the coins and the engines' sampling RNG): the driver calls it before
        each batch with a seed of the batch's own, so a batch sampled again (after a resume) is the same batch."""
        self.rng = np.random.default_rng(seed)
        for engine in (self.student, self.teacher):
            if engine is not None:
                engine.reseed(seed)

    # ----- sampling ----------------------------------------------------------------------------------
    def sample(
        self,
        prompts: list[list[int]],
        prompt_index: list[int] | None = None,
        alpha: float | None = None,
        max_new_tokens: int | None = None,
    ) -> Rollouts:
        alpha = self.spec.alpha if alpha is None else alpha
        limit = max_new_tokens or self.spec.max_new_tokens
        if alpha > 0 and self.teacher is None:
            raise ValueError("alpha > 0 needs a teacher engine (SamplerSpec.teacher_dir)")
        t0 = time.perf_counter()
        calls = 0
        n = len(prompts)
        owners = [draw_owners(limit, alpha, self.rng) for _ in range(n)]
        generated: list[list[int]] = [[] for _ in range(n)]
        done = [False] * n
        while not all(done):
            for owner in (STUDENT, TEACHER):
                engine = self.student if owner == STUDENT else self.teacher
                rows, lengths = [], []
                for i in range(n):
                    pos = len(generated[i])
                    if done[i] or owners[i][pos] != owner:
                        continue
                    run = pos
                    while run < limit and owners[i][run] == owner:
                        run += 1
                    rows.append(i)
                    lengths.append(run - pos)
                if not rows:
                    continue
                assert engine is not None
                outs = engine.generate(
                    [prompts[i] + generated[i] for i in rows],
                    lengths,
                    temperature=self.spec.temperature,
                    stop_token_ids=[self.spec.eos_token_id],
                )
                calls += 1
                for i, want, out in zip(rows, lengths, outs, strict=True):
                    generated[i].extend(out.token_ids)
                    if out.finished_eos or len(out.token_ids) < want or len(generated[i]) >= limit:
                        done[i] = True
        # the student's log-prob of every response token, teacher-sampled ones included
        scored = [i for i in range(n) if generated[i]]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        if scored:
            lps = self.student.prompt_logprobs(
                [prompts[i] + generated[i] for i in scored], [len(prompts[i]) for i in scored]
            )
            calls += 1
            for i, lp in zip(scored, lps, strict=True):
                logprobs[i] = lp
        finished = [bool(g) and g[-1] == self.spec.eos_token_id for g in generated]
        elapsed = time.perf_counter() - t0
        self.stats["engine_calls"] += calls
        self.stats["sampled_tokens"] += sum(len(g) for g in generated)
        self.stats["sample_seconds"] += elapsed
        return Rollouts(
            prompt_ids=[list(p) for p in prompts],
            response_ids=generated,
            old_logprobs=logprobs,
            owners=[o[: len(g)].tolist() for o, g in zip(owners, generated, strict=True)],
            weight_version=self.version,
            prompt_index=list(prompt_index or range(n)),
            finished=finished,
            seconds=elapsed,
        )

    def get_stats(self) -> dict[str, float]:
        return dict(self.stats)

    def student_logprobs(self, sequences: list[list[int]], start: list[int]) -> list[list[float]]:
        """The current student's log-prob of sequences[i][start[i]:] (used to check weight pushes)."""
        return self.student.prompt_logprobs(sequences, start)
