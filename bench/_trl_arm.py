"""The TRL arm of bench/throughput.py: TRL's `DistillationTrainer` (on-policy generalised JSD; beta = 1 is the
reverse KL) on the same models, prompts and lengths. Runs in TRL's own virtual environment, so it imports
nothing from this project.

    /path/to/trl-venv/bin/python bench/_trl_arm.py SPEC.json

SPEC.json: teacher, student, tokenizer (HF folders), prompts (texts, in the order to train on), batch, tokens,
lr, steps, seed, threads. Prints one JSON line, last: per-step wall times (from the trainer's step-end callback)
and completion lengths (its `completions/mean_length` log), the TRL version, and start-up to the first step.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

T_START = time.perf_counter()


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(spec["threads"])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    torch.set_num_threads(int(spec["threads"]))
    tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
    tok.padding_side = "left"  # the trainer requires left padding for generation
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=torch.float32)
    data = Dataset.from_dict({"prompt": spec["prompts"]})
    args = DistillationConfig(
        output_dir=spec["output_dir"],
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1,
        max_steps=spec["steps"],
        max_completion_length=spec["tokens"],
        learning_rate=spec["lr"],
        beta=1.0,  # reverse KL, MiniLLM's divergence
        temperature=1.0,
        use_cpu=True,
        bf16=False,  # fp32 like the service on these CPUs (the config's default is bf16)
        gradient_checkpointing=False,  # the config's default (True) trades compute for memory: off, TRL at its fastest
        shuffle_dataset=False,  # the prompts come in the service's batch order
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=spec["seed"],
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    steps: list[dict[str, float]] = []

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.t = time.perf_counter()

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.t = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            steps.append({"step_s": time.perf_counter() - self.t, "end": time.perf_counter() - T_START})

        def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            logs = kwargs.get("logs")  # the trainer's step-end log comes after on_step_end
            if logs and "completions/mean_length" in logs and steps:
                steps[-1]["tokens"] = logs["completions/mean_length"] * spec["batch"]

    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tok, callbacks=[Clock()]
    )
    trainer.train()
    print(
        json.dumps(
            {"trl": trl.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(), "steps": steps}
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
