"""Loading models and tokenizers from local Hugging Face folders, small model configs, compatibility checks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """A model/tokenizer that cannot be used as configured (missing, incompatible)."""


def _require_dir(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(f"{what} folder not found: {p}")
    if not p.is_dir():
        raise ModelError(f"{what} path {p} is a file, not a folder")
    if not (p / "config.json").is_file() and what != "tokenizer":
        raise ModelError(f"{what} folder {p} is not a Hugging Face model folder (no config.json)")
    return p


def read_model_config(path: str | Path, what: str = "model") -> dict:
    """The folder's config.json, after checking it is a loadable HF model folder (config and weights present),
    so a bad path fails at start-up with its name instead of deep inside an actor."""
    p = _require_dir(path, what)
    try:
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise ModelError(f"{what} folder {p}: config.json is not readable JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{what} folder {p}: config.json is not a JSON object")
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise ModelError(f"{what} folder {p} has no weights (*.safetensors or *.bin)")
    return cfg


def max_positions(config: dict) -> int | None:
    """The longest sequence the model's position embeddings cover (None when the config does not say)."""
    for section in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "n_positions"):  # n_positions: GPT-2's name for it
            value = section.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    p = _require_dir(path, "tokenizer")
    if not any((p / name).is_file() for name in TOKENIZER_FILES):
        # transformers' own message for this case is several lines about sentencepiece
        raise ModelError(f"tokenizer folder {p} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types; report the folder
        raise ModelError(f"cannot load a tokenizer from {p}: {exc}") from exc
    if tok.eos_token_id is None:
        raise ModelError(f"tokenizer in {p} has no EOS token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str | Path, dtype: str = "float32") -> PreTrainedModel:
    p = _require_dir(path, "model")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=DTYPES[dtype], local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"cannot load a causal LM from {p}: {exc}") from exc
    return model


def small_llama_config(
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_positions: int,
    bos_id: int,
    eos_id: int,
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=False,
        dtype="float32",
    )


def build_llama(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


@dataclass(frozen=True)
class VocabInfo:
    tokenizer_size: int  # ids [0, tokenizer_size) are real tokens
    teacher_rows: int  # embedding rows of the teacher (may be padded)
    student_rows: int


def model_vocab_rows(path: str | Path, what: str = "model") -> int:
    cfg = read_model_config(path, what)
    rows = cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size")
    if not isinstance(rows, int):
        raise ModelError(f"{path}/config.json has no vocab_size")
    return rows


def check_compatible(teacher_dir: str | Path, student_dir: str | Path, tokenizer: PreTrainedTokenizerBase) -> VocabInfo:
    """Teacher and student must share the tokenizer's vocabulary; padded rows beyond it are allowed
    (they are sliced off before any distribution is compared). Raises ModelError otherwise."""
    size = len(tokenizer)
    t_rows, s_rows = model_vocab_rows(teacher_dir, "teacher"), model_vocab_rows(student_dir, "student")
    for name, rows in (("teacher", t_rows), ("student", s_rows)):
        if rows < size:
            raise ModelError(
                f"vocabulary mismatch: the {name} has {rows} embedding rows but the tokenizer has {size} tokens"
            )
    for name, folder in (("teacher", teacher_dir), ("student", student_dir)):
        if (Path(folder) / "tokenizer_config.json").is_file() or (Path(folder) / "tokenizer.json").is_file():
            other = load_tokenizer(folder)
            if other.get_vocab() != tokenizer.get_vocab():
                raise ModelError(
                    f"vocabulary mismatch: the {name}'s tokenizer in {folder} differs from the run's tokenizer "
                    f"({len(other)} vs {size} tokens); distillation needs one shared vocabulary"
                )
    return VocabInfo(size, t_rows, s_rows)


def carry_generation_config(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """The handed-out folder generates as the model it came from: the generation_config.json (stop tokens,
    sampling defaults) of the folder the tokenizer was loaded from, the student's own unless models.tokenizer names
    another folder. Without one, the model's config gives it (bos / eos / pad ids)."""
    from transformers import GenerationConfig

    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    if folder.is_dir() and (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))


def save_hf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, out_dir: str | Path) -> Path:
    """Save an HF folder atomically: write to a sibling temp folder, then rename over the target."""
    import shutil

    from common.storage import replace_dir

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    if tokenizer is not None:
        carry_generation_config(model, tokenizer)
    model.save_pretrained(str(tmp), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))  # with its chat template and special tokens
    replace_dir(tmp, out)
    return out


def save_hf_to(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, url: str) -> str:
    """save_hf into durable storage (common/storage.py): in place on a local filesystem, else into this node's
    scratch first and then uploaded (complete when its marker lands)."""
    import tempfile

    from common import storage

    if storage.is_local(url):
        save_hf(model, tokenizer, storage.canonical(url))
        return url
    with tempfile.TemporaryDirectory(prefix="minillm-hf-") as tmp:
        storage.publish_dir(save_hf(model, tokenizer, Path(tmp) / "hf"), url)
    return url


def final_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The hidden states the LM head reads, [B, L, H], from one forward of the whole model that runs the head on
    one position only (`logits_to_keep=1`), so callers apply the head just where a loss needs it.

    The model is called as a whole (not its base module) so that FSDP's root hooks run: they gather the root's
    parameters (embeddings, final norm, head), which stay gathered until the backward pass."""
    base: torch.nn.Module = model.base_model  # type: ignore[assignment]
    captured: list[torch.Tensor] = []

    def keep(_module: torch.nn.Module, _args: object, output: object) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)  # type: ignore[attr-defined]

    handle = base.register_forward_hook(keep)
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    # tie the root forward's output into the graph at zero cost, so FSDP's root backward hooks fire
    return captured[-1] + 0.0 * out.logits.sum() if torch.is_grad_enabled() else captured[-1]
