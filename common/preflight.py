"""Every check a run can make before it touches the cluster (pure: imports no Ray).

Bad input then fails at start-up with one line naming the field, file or line, before any actor starts and
before the run folder exists. Cheap checks go first: settings, then the data files (before the tiny default
spends minutes building its models from the training file), then the model folders, then what needs the tokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import storage
from common.config import ConfigError, DistillConfig, resolve_path, storage_url
from common.data import (
    DataError,
    Example,
    TokenizedExample,
    load_pretrain_blocks,
    text_documents,
    tokenize_examples,
)
from common.healing import dolly_contexts, pack_blocks, split_documents
from common.models import ModelError, VocabInfo, check_compatible, load_tokenizer, max_positions, read_model_config

Split = tuple[list[Example], list[TokenizedExample]]
INPUT_ERRORS = (ConfigError, DataError, ModelError)


@dataclass(frozen=True)
class Assets:
    teacher_dir: str
    student_dir: str
    tokenizer_dir: str
    sft_dir: str | None = None  # models.sft_checkpoint's folder, where the run uses one
    # models.* fields given as Hub ids, pinned to the commit they resolved to (`org/name@commit`)
    pinned: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Checked:
    """What a run needs from its input, loaded and validated."""

    assets: Assets
    tokenizer: Any  # a transformers tokenizer
    vocab: VocabInfo
    train: Split
    valid: Split
    # the config to run: models.sft_checkpoint given as a Hub id becomes its folder
    config: DistillConfig
    # the config to record in the run folder: Hub ids pinned to their commits, so the run can be repeated
    recorded: DistillConfig


@contextmanager
def about(field: str) -> Iterator[None]:
    """Prefix an input error raised inside with the config field it came from."""
    try:
        yield
    except INPUT_ERRORS as exc:
        raise type(exc)(f"{field}: {exc}") from None


def preflight(cfg: DistillConfig, cwd: Path | None = None) -> Checked:
    """Run every check that needs no cluster; raise ConfigError / DataError / ModelError on the first problem.
    `cwd` is what a relative output_dir is relative to (the driver's working directory)."""
    check_settings(cfg)
    check_output_dir(resolve_path(cfg.output_dir, cwd or Path.cwd()))
    if cfg.storage.path is not None and storage.is_local(cfg.storage.path):  # a local folder: the same checks
        check_output_dir(Path(storage_url(cfg, cwd)), "storage.path")
    if cfg.method == "heal":
        general = read_general_text(cfg)
    else:
        train_examples = read_examples(cfg, "train", cfg.data.max_train_examples)
        valid_examples = read_examples(cfg, "valid", cfg.data.max_valid_examples)
    pretrain = pretrain_path(cfg)
    if pretrain is not None and not pretrain.is_file():
        raise DataError(f"data.pretrain: pre-training text not found: {pretrain}")

    assets = resolve_models(cfg)
    configs = check_model_folders(cfg, assets)
    tokenizer_field = "models.tokenizer" if cfg.models.tokenizer or cfg.models.source == "tiny" else "models.student"
    with about(tokenizer_field):  # unset, the tokenizer is the student folder's
        tokenizer = load_tokenizer(assets.tokenizer_dir)
    vocab = check_compatible(assets.teacher_dir, assets.student_dir, tokenizer)
    check_transport(cfg, configs)  # padded embedding rows are fine: every sampler and loss uses the real rows only
    if assets.sft_dir is not None:
        with about("models.sft_checkpoint"):
            check_compatible(assets.teacher_dir, assets.sft_dir, tokenizer)
    check_positions(cfg, configs)

    if cfg.method == "heal":
        train, valid = heal_splits(cfg, general, tokenizer)
    else:
        train = tokenize_split(cfg, "train", train_examples, tokenizer)
        valid = tokenize_split(cfg, "valid", valid_examples, tokenizer)
    check_batches(cfg, train[1], valid[1])
    if pretrain is not None:
        check_pretrain(cfg, pretrain, tokenizer)
    models = cfg.models.model_copy(update={"sft_checkpoint": assets.sft_dir}) if assets.sft_dir else cfg.models
    recorded = cfg.models.model_copy(update=dict(assets.pinned))
    return Checked(
        assets,
        tokenizer,
        vocab,
        train,
        valid,
        cfg.model_copy(update={"models": models}),
        cfg.model_copy(update={"models": recorded}),
    )


# ----- settings and the run folder ---------------------------------------------------------------------------
def check_settings(cfg: DistillConfig) -> None:
    """Combinations of settings that pass the config's own validation but break a run."""
    n = cfg.learner.num_workers
    if cfg.eval.kl_prompts < n:
        raise ConfigError(
            f"eval.kl_prompts={cfg.eval.kl_prompts} is fewer than learner.num_workers={n}: every FSDP worker "
            "scores an equal share of the reverse-KL prompts"
        )


def check_output_dir(path: Path, field: str = "output_dir") -> None:
    """The run folder must be creatable (an earlier run there is moved aside, so its parent must be writable)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{field}: {path} exists and is not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{field}: cannot create {path}: {existing} is a file")
    for folder in (existing, path.parent) if existing == path else (existing,):
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"{field}: {folder} is not writable")


# ----- data --------------------------------------------------------------------------------------------------
def response_needed(cfg: DistillConfig, split: str) -> str | None:
    """What needs a reference response in every row of data.<split> (None: prompts alone will do)."""
    sft_phase = cfg.method in ("sft", "kd", "seqkd") or (
        cfg.method == "minillm" and not cfg.models.sft_checkpoint and cfg.learner.sft_steps > 0
    )
    if split == "train":
        if cfg.method in ("sft", "kd", "seqkd"):
            return f"method={cfg.method}"
        return "MiniLLM's SFT phase (learner.sft_steps > 0 without models.sft_checkpoint)" if sft_phase else None
    if sft_phase:
        return "the SFT phase's validation (loss and ROUGE-L)"
    if cfg.learner.minillm_select_by == "rouge_l":
        return "learner.minillm_select_by=rouge_l (validation ROUGE-L; reverse_kl needs none)"
    return None


def read_examples(cfg: DistillConfig, split: str, limit: int | None) -> list[Example]:
    from common.formats import load_examples

    need = response_needed(cfg, split)
    d = cfg.data
    if d.format == "prompt" and need and split == "train":
        raise DataError(
            f"data.format=prompt: the data has prompts only, and {need} trains on responses "
            "(give chat or dolly data, or run method=minillm with models.sft_checkpoint or learner.sft_steps=0)"
        )
    with about(f"data.{split}"):
        return load_examples(getattr(d, split), d.format, d.columns.model_dump(), limit, need_response=need)


def read_general_text(cfg: DistillConfig) -> list[str]:
    """method: heal: the general-text documents (heal.contexts_from's passages, then heal.text_files)."""
    h, docs = cfg.heal, []
    if h.contexts_from:
        with about("heal.contexts_from"):
            docs += dolly_contexts(resolve_path(h.contexts_from))
    for k, name in enumerate(h.text_files):
        with about(f"heal.text_files[{k}]"):
            docs += text_documents(resolve_path(name))
    if len(docs) < 2:
        raise DataError(
            f"heal: {len(docs)} document(s) of general text in heal.contexts_from and heal.text_files; at least 2 "
            "are needed (one to hold out)"
        )
    return docs


def heal_splits(cfg: DistillConfig, docs: list[str], tokenizer) -> tuple[Split, Split]:
    """Training and held-out blocks of general text, split by document (no held-out block shares one with
    training); the held-out documents are drawn with a fixed seed, the same for every run and seed."""
    h = cfg.heal
    train_docs, valid_docs = split_documents(docs, h.held_out, seed=0)
    train = pack_blocks(train_docs, tokenizer, h.block_tokens)
    valid = pack_blocks(valid_docs, tokenizer, h.block_tokens, max_blocks=h.max_valid_blocks)
    for name, blocks, n_docs in (("training", train, len(train_docs)), ("held-out", valid, len(valid_docs))):
        if not blocks:
            raise DataError(
                f"heal: the {n_docs} {name} document(s) hold fewer than heal.block_tokens={h.block_tokens} tokens "
                "(add text to heal.contexts_from / heal.text_files, or lower heal.block_tokens / raise heal.held_out)"
            )
    print(
        f"[heal] general text: {len(train_docs)} training documents -> {len(train)} blocks of {h.block_tokens} "
        f"tokens; {len(valid_docs)} held out -> {len(valid)} blocks evaluated",
        flush=True,
    )
    return ([], train), ([], valid)


def pretrain_path(cfg: DistillConfig) -> Path | None:
    """The pre-training text, where the run uses it (MiniLLM's phase with objective.pt_weight > 0)."""
    if cfg.method != "minillm" or not cfg.data.pretrain or cfg.objective.pt_weight <= 0:
        return None
    return resolve_path(cfg.data.pretrain)


def tokenize_split(cfg: DistillConfig, split: str, examples: list[Example], tokenizer) -> Split:
    from common.templates import resolve_template

    d = cfg.data
    with about("data.template"):
        template = resolve_template(d.template, d.format, tokenizer)
    with about(f"data.{split}"):
        items, report = tokenize_examples(examples, tokenizer, d.max_prompt_tokens, d.max_response_tokens, template)
    print(f"[data] {split}: {report} ({d.format} data, {template} template)", flush=True)
    if not items:
        raise DataError(
            f"data.{split}: every example exceeds the context budget ({report}): raise data.max_prompt_tokens "
            f"({d.max_prompt_tokens}) or data.max_response_tokens ({d.max_response_tokens})"
        )
    return examples, items


def check_batches(cfg: DistillConfig, train: list[TokenizedExample], valid: list[TokenizedExample]) -> None:
    """Every batch is split evenly over the learner's workers: too few examples would leave one empty-handed."""
    n = cfg.learner.num_workers
    if min(cfg.eval.kl_prompts, len(valid)) < n:
        raise DataError(
            f"data.valid: {len(valid)} example(s) fit the context budget, fewer than learner.num_workers={n} "
            "(each worker scores an equal share of the reverse-KL prompts)"
        )
    sizes = [] if used_sft_checkpoint(cfg) else ["sft_batch_size"]
    sizes += ["batch_size"] if cfg.method == "minillm" else []
    for name in sizes:
        size = getattr(cfg.learner, name)
        if len(train) < size and len(train) % n:  # a set smaller than the batch is used whole
            raise DataError(
                f"data.train: {len(train)} example(s) fit the context budget, fewer than learner.{name}={size}, "
                f"and {len(train)} cannot be split evenly over learner.num_workers={n}"
            )


def check_pretrain(cfg: DistillConfig, path: Path, tokenizer) -> None:
    n, batch = cfg.learner.num_workers, cfg.learner.pretrain_batch_size
    with about("data.pretrain"):
        blocks = load_pretrain_blocks(path, tokenizer, cfg.data.pretrain_block_size, max_blocks=batch)
    if blocks.shape[0] < batch and blocks.shape[0] % n:  # too short a text is used whole, like a small train set
        raise DataError(
            f"data.pretrain: {path} holds {blocks.shape[0]} blocks of data.pretrain_block_size="
            f"{cfg.data.pretrain_block_size} tokens, which cannot be split evenly over learner.num_workers={n}"
        )


# ----- models ------------------------------------------------------------------------------------------------
def resolve_models(cfg: DistillConfig) -> Assets:
    m = cfg.models
    if m.source == "tiny":
        from common.tiny import tiny_models_for

        built = tiny_models_for(cfg)
        pinned: dict[str, str] = {}
        sft = str(resolve_model_field(cfg, "sft_checkpoint", pinned)) if used_sft_checkpoint(cfg) else None
        return Assets(str(built.teacher), str(built.student), str(built.tokenizer), sft, tuple(pinned.items()))
    pinned = {}
    teacher, student = resolve_model_field(cfg, "teacher", pinned), resolve_model_field(cfg, "student", pinned)
    tok = resolve_model_field(cfg, "tokenizer", pinned) if m.tokenizer else student
    sft_dir = resolve_model_field(cfg, "sft_checkpoint", pinned) if used_sft_checkpoint(cfg) else None
    return Assets(str(teacher), str(student), str(tok), str(sft_dir) if sft_dir else None, tuple(pinned.items()))


def resolve_model_field(cfg: DistillConfig, name: str, pinned: dict[str, str]) -> Path:
    """models.<name>: a folder, or a Hub id resolved (once, here on the driver) to its snapshot in the Hugging Face
    cache; a Hub id's commit goes into `pinned`."""
    from common.hub import resolve_model

    with about(f"models.{name}"):
        got = resolve_model(getattr(cfg.models, name))
    if got.pinned:
        pinned[name] = got.pinned
    return got.path


def used_sft_checkpoint(cfg: DistillConfig) -> bool:
    return cfg.method == "minillm" and bool(cfg.models.sft_checkpoint)


def check_model_folders(cfg: DistillConfig, assets: Assets) -> dict[str, tuple[str, dict]]:
    """config.json of every model folder the run loads, by the field that names it: {field: (role, config)}."""
    local = cfg.models.source == "local"
    folders = {
        "models.teacher" if local else "models.tiny (teacher)": ("teacher", assets.teacher_dir),
        "models.student" if local else "models.tiny (student)": ("student", assets.student_dir),
    }
    if assets.sft_dir is not None:
        folders["models.sft_checkpoint"] = ("student", assets.sft_dir)
    configs = {}
    for field, (role, folder) in folders.items():
        with about(field):
            configs[field] = (role, read_model_config(folder, role))
    return configs


def check_transport(cfg: DistillConfig, configs: dict[str, tuple[str, dict]]) -> None:
    """teacher.transport=hidden: the learner must reproduce the teacher's output layer exactly (soft-capping and
    scaling are applied; anything else is refused here, one line)."""
    if cfg.teacher.transport != "hidden":
        return
    from common.teacher_head import output_transform

    for field, (role, config) in configs.items():
        if role == "teacher":
            with about(field):
                output_transform(config)


def check_positions(cfg: DistillConfig, configs: dict[str, tuple[str, dict]]) -> None:
    """Sequences must fit every model's position embeddings; vLLM would otherwise cap or refuse them mid-run."""
    d, s, e = cfg.data, cfg.sampler, cfg.eval
    new_field = "eval.max_new_tokens" if e.max_new_tokens > s.max_new_tokens else "sampler.max_new_tokens"
    sampled = (f"data.max_prompt_tokens + {new_field}", d.max_prompt_tokens + max(s.max_new_tokens, e.max_new_tokens))
    trained = ("data.max_prompt_tokens + data.max_response_tokens", d.max_prompt_tokens + d.max_response_tokens)
    for field, (role, config) in configs.items():
        limit = max_positions(config)
        if limit is None:
            continue
        if cfg.method == "heal":  # no sampling: both models read the blocks of general text
            needs = [("heal.block_tokens", cfg.heal.block_tokens)]
        else:
            needs = [sampled]  # samples are drawn from and scored by both models
            if role == "student" or cfg.method == "kd":  # the learner trains on these; KD's teacher scores them
                needs.append(trained)
        if role == "student" and pretrain_path(cfg) is not None:
            needs.append(("data.pretrain_block_size", d.pretrain_block_size))
        for what, need in needs:
            if need > limit:
                raise ConfigError(
                    f"{what} = {need} exceeds the {role}'s max_position_embeddings = {limit} ({field}): "
                    "lower them or use a model with more positions"
                )
