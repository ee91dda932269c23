"""Where one learner step's peak memory goes: the peak resident set of each phase of a MiniLLM step, in this process.

    OMP_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=65536 nice -n 5 python -m bench.memory_phases \
        --student smol/student --batch 2 --length 2048 --chunk 1024 [--checkpointing]

The step is bench/memory.py's (`run_step`: the real `LearnerWorker.minillm_step` on a synthetic top-k shard);
here the peak (VmHWM) is read and reset at every phase boundary, found by hooks: each transformer layer's forward
(in backward: its recompute, then its gradient), the gradient reaching each layer's output (the start of its
backward), each head chunk's forward (in backward: its recompute, then its gradient) and the gradient reaching its
loss, gradient clipping and the optimizer step. Each line gives a phase's peak and the resident set at its end, so
a phase's own transient is its peak minus the resident set it started from (the line above's end). Set the two
variables as shown, as bench/memory.py's subprocesses do, or freed tensors may stay resident. The hooks are
instrumentation only: they change no tensor.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

import learner.chunked_head as chunked_head
import learner.fsdp_student as fsdp_student
from bench.harness import status_mb
from bench.memory import STUDENT, _reset_peak, run_step

log: list[tuple[str, float, float]] = []
state: dict[str, Any] = {"label": "step start: embedding, masks", "backward": False}


def mark(label: str) -> None:
    """Close the running phase (its peak, the resident set now) and start `label`'s."""
    log.append((state["label"], status_mb("VmHWM"), status_mb("VmRSS")))
    state["label"] = label
    _reset_peak()


def _hook_layers(model: torch.nn.Module) -> None:
    for i, layer in enumerate(getattr(getattr(model, "model", model), "layers", [])):

        def pre(_m: Any, _a: Any, i: int = i) -> None:
            # in backward the recompute stops once it has what the gradient needs: no post hook, no mark after it
            mark(f"backward: layer {i} recompute + gradient" if state["backward"] else f"forward: layer {i}")

        def post(_m: Any, _a: Any, out: Any, i: int = i) -> None:
            t = out[0] if isinstance(out, tuple) else out
            if not state["backward"] and t.requires_grad:
                t.register_hook(lambda _g, i=i: mark(f"backward: layer {i} starts"))

        layer.register_forward_pre_hook(pre)
        layer.register_forward_hook(post)


def install_hooks() -> None:
    init = fsdp_student.FSDPStudent.__init__

    def hooked_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        _hook_layers(self.model)

    fsdp_student.FSDPStudent.__init__ = hooked_init  # type: ignore[method-assign]
    chunked = chunked_head.ChunkedLMHead.chunked

    def hooked_chunked(self: Any, hidden: torch.Tensor, fn: Any) -> Any:
        def timed(h: torch.Tensor, sl: slice) -> Any:
            if state["backward"]:
                mark(f"backward: head chunk at {sl.start} recompute + gradient")
            else:
                mark(f"forward: head chunk at {sl.start}")
            loss, metrics = fn(h, sl)
            if not state["backward"] and loss.requires_grad:

                def starts(_g: torch.Tensor, at: int = sl.start) -> None:
                    state["backward"] = True
                    mark(f"backward: head chunk at {at} starts")

                loss.register_hook(starts)
            mark("between head chunks")
            return loss, metrics

        return chunked(self, hidden, timed)

    chunked_head.ChunkedLMHead.chunked = hooked_chunked  # type: ignore[method-assign]
    clip = torch.nn.utils.clip_grad_norm_

    def hooked_clip(*args: Any, **kwargs: Any) -> Any:
        mark("backward: after the layers (embedding gradient, FSDP reduce)")
        out = clip(*args, **kwargs)
        mark("optimizer step")
        return out

    fsdp_student.torch.nn.utils.clip_grad_norm_ = hooked_clip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.memory_phases", description=__doc__)
    parser.add_argument("--student", type=Path, default=STUDENT)
    parser.add_argument("--vocab", type=int, default=49152, help="the student tokenizer's vocabulary size")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--length", type=int, default=2048, help="response tokens T")
    parser.add_argument("--chunk", type=int, default=1024, help="learner.logit_chunk_tokens")
    parser.add_argument("--checkpointing", action="store_true", help="learner.activation_checkpointing")
    args = parser.parse_args(argv)
    install_hooks()
    shard = {"batch": args.batch, "prompt_tokens": args.prompt_tokens, "response_tokens": args.length}
    spec = {"student": str(args.student), "vocab": args.vocab, "chunk_tokens": args.chunk, "alpha": 0.2}
    spec |= {"checkpointing": args.checkpointing, "synthetic": shard | {"vocab": args.vocab, "k": 64, "seed": 0}}
    result = run_step(spec)  # its own peak figures are void here: the hooks reset the peak
    mark("end")
    print(json.dumps({k: result[k] for k in ("rss_before_mb", "tokens", "kl_sum")}))
    print(f"{'phase':58s} {'peak MB':>8s} {'RSS at end':>10s}")
    for label, peak, rss in log:
        print(f"{label:58s} {peak:8.0f} {rss:10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
