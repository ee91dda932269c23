"""The teacher's output layer outside the teacher: `teacher.transport: hidden` (pure torch, no Ray).

With `hidden` the teacher actor sends, per response token, its final hidden state (after the final norm, in the
compute dtype) instead of V log-probs; the learner holds the teacher's output layer, frozen, and recomputes the
full-vocabulary log-probs a chunk of tokens at a time, inside the chunks of the student's head. d + 1 numbers per
token cross the object store instead of V.

    OutputTransform   what a family does to the logits after the linear map (soft-capping, scaling), from config.json
    output_transform  config.json -> OutputTransform, or ModelError naming what cannot be reproduced exactly
    TeacherHead       weight [+ bias] + transform -> float32 log-probs over the tokenizer's rows
    TeacherHidden     the wire format: [N, d] hidden states, indexable by token like TopKLogprobs
    expand_teacher    a chunk of TeacherHidden -> dense log-probs (anything else passes through)

The teacher actor scores with the same TeacherHead (sharing its model's weights), so dense and hidden compute the
same numbers: in float32 the learner's recomputation is the teacher's own log-softmax, up to matmul blocking.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from common.logprobs import TeacherHidden, TopKLogprobs, vocab_log_softmax
from common.models import ModelError

# config.json keys that change the logits after the output layer, by what HF's modelling code does with them
SOFTCAP_KEYS = ("final_logit_softcapping",)  # Gemma 2/3/4, nanochat, VaultGemma: cap * tanh(logits / cap)
MULTIPLY_KEYS = ("logit_scale",)  # Cohere: logits * scale
DIVIDE_KEYS = ("logits_scaling",)  # Granite: logits / scaling
# families whose output layer does something else (a scaled hidden state, a multiplier in custom code): refused
REFUSED = {
    "minicpm": "scales the hidden state by dim_model_base / hidden_size before its head",
    "minicpm3": "scales the hidden state by dim_model_base / hidden_size before its head",
    "falcon_h1": "multiplies its logits by lm_head_multiplier",
    "muse_glimmer": "multiplies its logits by output_multiplier after soft-capping",
}


@dataclass(frozen=True)
class OutputTransform:
    """logits -> softcap * tanh(scale * logits / softcap) (no soft-capping: scale * logits)."""

    scale: float = 1.0
    softcap: float | None = None

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def __call__(self, logits: Tensor) -> Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _text_sections(config: dict) -> list[dict]:
    return [config, *([config["text_config"]] if isinstance(config.get("text_config"), dict) else [])]


def output_transform(config: dict) -> OutputTransform:
    """The post-linear transform of a model's logits from its config.json; ModelError for a family whose output
    layer is not reproduced exactly here (one line: the reason)."""
    sections = _text_sections(config)
    for section in sections:
        kind = section.get("model_type")
        if kind in REFUSED:
            raise ModelError(
                f"teacher.transport=hidden: model_type {kind!r} {REFUSED[kind]}, which the learner's copy of the "
                "output layer does not reproduce; use teacher.transport=dense or topk"
            )
    scale, softcap = 1.0, None
    for section in sections:
        for key in SOFTCAP_KEYS:
            value = section.get(key)
            if value is not None:
                softcap = _positive(key, value)
        for key in MULTIPLY_KEYS:
            if section.get(key) is not None:
                scale *= _positive(key, section[key])
        for key in DIVIDE_KEYS:
            if section.get(key) is not None:
                scale /= _positive(key, section[key])
    return OutputTransform(scale, softcap)


def _positive(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ModelError(f"config.json {key}={value!r} is not a positive number")
    return float(value)


class TeacherHead:
    """A frozen output layer: hidden [n, d] -> float32 log-probs [n, vocab_size] over the tokenizer's rows (padded
    embedding rows are never computed). Not an nn.Module: nothing trains it, nothing shards it."""

    def __init__(self, weight: Tensor, bias: Tensor | None, transform: OutputTransform, vocab_size: int):
        if weight.shape[0] < vocab_size:
            raise ModelError(f"the teacher's output layer has {weight.shape[0]} rows, fewer than {vocab_size} tokens")
        self.weight = weight[:vocab_size].detach()
        self.bias = bias[:vocab_size].detach() if bias is not None else None
        self.transform, self.vocab_size = transform, vocab_size

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.bias) if t is not None)

    @torch.no_grad()
    def logits(self, hidden: Tensor) -> Tensor:
        """float32 logits [n, vocab_size]: the linear map in the weight's dtype, the transform in float32."""
        out = torch.nn.functional.linear(hidden.to(self.weight.device, self.weight.dtype), self.weight, self.bias)
        return self.transform(out.float())

    def log_probs(self, hidden: Tensor) -> Tensor:
        return vocab_log_softmax(self.logits(hidden), self.vocab_size)

    @classmethod
    def from_model(cls, model: torch.nn.Module, config: dict, vocab_size: int) -> TeacherHead:
        """The head of a loaded model, sharing its weights (the teacher actor's own scoring)."""
        head = model.get_output_embeddings()  # type: ignore[operator]
        if not isinstance(head, torch.nn.Linear):
            raise ModelError(f"the teacher's output layer is a {type(head).__name__}, not a linear map")
        return cls(head.weight, head.bias, output_transform(config), vocab_size)

    @classmethod
    def from_folder(
        cls, folder: str | Path, vocab_size: int, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> TeacherHead:
        """Only the output layer of an HF folder, read from its safetensors (the whole model is loaded only when
        the weights are in another format), in `dtype` on `device`."""
        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        transform = output_transform(config)
        weight, bias = _read_head(folder, config)
        return cls(weight.to(device, dtype), None if bias is None else bias.to(device, dtype), transform, vocab_size)


def _head_names(folder: Path, config: dict) -> tuple[str, str | None]:
    """The checkpoint names of the output layer's weight (the input embedding's when tied) and bias."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    head = skeleton.get_output_embeddings()
    names = {id(p): n for n, p in skeleton.named_parameters()}  # a tied weight is named once, by its first owner
    bias = head.bias if isinstance(head, torch.nn.Linear) else None
    return names[id(head.weight)], (names[id(bias)] if bias is not None else None)


def _safetensors_key(files: list[Path], name: str) -> tuple[Path, str] | None:
    from safetensors import safe_open

    short = name.split(".", 1)[1] if "." in name else name  # some checkpoints omit the base model's prefix
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
        for key in (name, short, "lm_head." + name.rsplit(".", 1)[-1]):
            if key in keys:
                return path, key
    return None


def _read_head(folder: Path, config: dict) -> tuple[Tensor, Tensor | None]:
    from safetensors import safe_open

    weight_name, bias_name = _head_names(folder, config)
    files = sorted(folder.glob("*.safetensors"))
    found = _safetensors_key(files, weight_name) if files else None
    if found is None:  # .bin weights or unusual names: load the model once and take its head
        from common.models import load_model

        model = load_model(folder)
        head = model.get_output_embeddings()
        return head.weight.detach().clone(), (head.bias.detach().clone() if head.bias is not None else None)
    path, key = found
    with safe_open(str(path), framework="pt") as f:
        weight = f.get_tensor(key)
    bias = None
    if bias_name is not None:
        hit = _safetensors_key(files, bias_name)
        if hit is not None:
            with safe_open(str(hit[0]), framework="pt") as f:
                bias = f.get_tensor(hit[1])
    return weight, bias


def expand_teacher(teacher: Tensor | TopKLogprobs | TeacherHidden, head: TeacherHead | None) -> Tensor | TopKLogprobs:
    """A chunk of the teacher's wire data as what the losses take: TeacherHidden becomes float32 log-probs
    [n, vocab] (the only place a [tokens, V] teacher tensor exists, one chunk at a time); others pass through."""
    if not isinstance(teacher, TeacherHidden):
        return teacher
    if head is None:
        raise ValueError("teacher.transport=hidden: the learner holds no teacher output layer")
    return head.log_probs(teacher.hidden)


@torch.no_grad()
def check_head_matches(model: torch.nn.Module, head: TeacherHead, probe_tokens: int = 8) -> float:
    """Max |log-prob difference| between the model's own logits and `head` on its final hidden states, over a short
    probe sequence; ModelError when they disagree (an output layer this module does not reproduce)."""
    from common.models import final_hidden_states

    param = next(model.parameters())
    ids = torch.arange(probe_tokens, device=param.device).remainder(head.vocab_size).unsqueeze(0)
    ones = torch.ones_like(ids)
    want = vocab_log_softmax(model(input_ids=ids, attention_mask=ones, use_cache=False).logits[0], head.vocab_size)
    got = head.log_probs(final_hidden_states(model, ids, ones)[0])
    gap = (got - want).abs().max().item()
    tol = 1e-4 if param.dtype == torch.float32 else 0.1  # bf16 logits differ by rounding only
    if not gap <= tol:
        raise ModelError(
            f"teacher.transport=hidden: the teacher's logits differ from its output layer applied to its final "
            f"hidden states by {gap:.3g} nats (a soft-capping or scaling this service does not know): use dense"
        )
    return gap
