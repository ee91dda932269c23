"""The embedded default's models, built locally from the task data (nothing comes from a model hub).

A byte-level BPE tokenizer is trained on the training split; the teacher is a small Llama trained on the
same split for a few hundred steps (so it has a real, peaked distribution to distil); the student is a
smaller, randomly initialised Llama with the same vocabulary. Results are cached by a hash of the spec.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from common.config import DistillConfig, TinyBuildConfig, TinyModelSpec, load_config, resolve_path
from common.data import DataError, collate_prompt_response, iterate_batches, load_jsonl, tokenize_examples
from common.models import build_llama, save_hf, small_llama_config

EOS = "<|endoftext|>"
MAX_POSITIONS = 1024


@dataclass(frozen=True)
class TinyModels:
    tokenizer: Path
    teacher: Path
    student: Path


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        model_max_length=MAX_POSITIONS,
    )


def _spec_hash(spec: TinyBuildConfig, train_path: Path) -> str:
    stat = train_path.stat()
    key = json.dumps([spec.model_dump(mode="json", exclude={"cache_dir"}), train_path.name, stat.st_size, 1])
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _model_config(spec: TinyModelSpec, vocab: int, eos: int):
    return small_llama_config(
        vocab, spec.hidden_size, spec.num_layers, spec.num_heads, spec.intermediate_size, MAX_POSITIONS, eos, eos
    )


def train_causal_lm(
    model: torch.nn.Module, batches, steps: int, lr: float, log_every: int = 50, label: str = "teacher"
) -> list[float]:
    """Plain next-token training on full prompt+response sequences (used to give the tiny teacher skill)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / steps))
    model.train()
    losses: list[float] = []
    t0 = time.time()
    for step in range(steps):
        batch = next(batches)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        nll = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch.input_ids[:, 1:].reshape(-1), reduction="none"
        ).view_as(batch.loss_mask)
        loss = (nll * batch.loss_mask).sum() / batch.loss_mask.sum().clamp_min(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            print(f"[tiny] {label} step {step + 1}/{steps} loss {recent:.3f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    return losses


def build_tiny_models(
    spec: TinyBuildConfig, train_path: Path, max_prompt_tokens: int, max_response_tokens: int, seed: int = 0
) -> TinyModels:
    """Build (or reuse from cache) the tokenizer, teacher and student of the embedded default."""
    if not train_path.is_file():
        raise DataError(f"data file not found: {train_path}")
    final = Path(spec.cache_dir).expanduser() / _spec_hash(spec, train_path)
    done = TinyModels(final / "tokenizer", final / "teacher", final / "student")
    if (final / "DONE").is_file():
        return done
    print(f"[tiny] building tokenizer, teacher and student in {final} (once; cached afterwards)", flush=True)
    # built in a folder of this process's own, renamed into place when whole: processes building the same models at
    # once (tests side by side) never delete or overwrite each other's half-built files
    root = final.with_name(f"{final.name}.building-{os.getpid()}")
    if root.exists():
        shutil.rmtree(root)
    out = TinyModels(root / "tokenizer", root / "teacher", root / "student")
    examples = load_jsonl(train_path)
    texts = [ex.prompt + ex.response for ex in examples]
    tokenizer = train_tokenizer(texts, spec.vocab_size)
    eos = tokenizer.eos_token_id
    vocab = len(tokenizer)
    tokenizer.save_pretrained(str(out.tokenizer))

    items, report = tokenize_examples(examples, tokenizer, max_prompt_tokens, max_response_tokens)
    print(f"[tiny] teacher training data: {report}", flush=True)
    pairs = (
        collate_prompt_response([(it.prompt_ids, it.response_ids) for it in batch], eos, train_on_prompt=True)
        for batch in iterate_batches(items, spec.teacher_batch_size, seed)
    )
    teacher = build_llama(_model_config(spec.teacher, vocab, eos), seed)
    train_causal_lm(teacher, pairs, spec.teacher_train_steps, spec.teacher_lr)
    save_hf(teacher, tokenizer, out.teacher)

    student = build_llama(_model_config(spec.student, vocab, eos), seed + 1)
    save_hf(student, tokenizer, out.student)
    (root / "DONE").write_text("ok\n")
    if final.exists() and not (final / "DONE").is_file():
        shutil.rmtree(final, ignore_errors=True)  # a half-built folder of an older version of this code
    try:
        root.rename(final)
    except OSError:  # another process finished first: its models are the same build
        shutil.rmtree(root, ignore_errors=True)
    return done


def tiny_models_for(cfg: DistillConfig | None = None) -> TinyModels:
    """The embedded default's models for `cfg` (default: configs/tiny.yaml): its tiny spec, training file, context
    budget and seed. Built once, then read from the cache, which is keyed by the spec and the training file only:
    the models are fixed assets, shared by runs of any seed."""
    cfg = cfg or load_config()
    return build_tiny_models(
        cfg.models.tiny,
        resolve_path(cfg.data.train),
        cfg.data.max_prompt_tokens,
        cfg.data.max_response_tokens,
        seed=cfg.seed,
    )
