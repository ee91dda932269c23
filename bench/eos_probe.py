"""Does the teacher want to stop where the student stops? Log-prob of EOS under teacher and student at the end of
responses that ended before the length cap, from `python -m learner.evaluate --samples` files.

    python -m bench.eos_probe --teacher runs/table1/teacher-sft/checkpoints/best \
        --student runs/table1/sft/checkpoints/best \
        --samples runs/table1/eval/sft.samples.jsonl runs/table1/eval/teacher.samples.jsonl

Reverse KL rewards the student for tokens the teacher rates above the student. If the teacher gives EOS a lower
probability than the student where the student stops, MiniLLM's updates push the student's EOS down there, and
its answers grow. Responses are re-tokenised from their text: close to, but not always exactly, the sampled ids.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from common.models import load_model, load_tokenizer
from common.rouge_calibration import load_samples


def eos_logprob(model: torch.nn.Module, ids: list[int], eos: int) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].float()
    return torch.log_softmax(logits, -1)[eos].item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--samples", type=Path, nargs="+", required=True)
    parser.add_argument("--seed", type=int, default=10, help="which seed's responses to probe")
    parser.add_argument("--limit", type=int, default=40, help="responses per samples file")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.student)
    eos = tokenizer.eos_token_id
    teacher, student = load_model(args.teacher).eval(), load_model(args.student).eval()
    print(f"{'samples':<28} {'n':>3} {'median log p_teacher(EOS)':>26} {'median log q_student(EOS)':>26}")
    for path in args.samples:
        rows = list(load_samples(path).values())
        cap = max(r["tokens"] for r in rows)
        stopped = [r for r in rows if r["seed"] == args.seed and r["tokens"] < cap][: args.limit]
        if not stopped:
            print(f"{path.stem:<28} no response of seed {args.seed} stopped before the cap")
            continue
        t, s = [], []
        for r in stopped:
            ids = tokenizer.encode(r["prompt"] + r["response"], add_special_tokens=False)
            t.append(eos_logprob(teacher, ids, eos))
            s.append(eos_logprob(student, ids, eos))
        print(f"{path.stem:<28} {len(stopped):>3} {statistics.median(t):>26.2f} {statistics.median(s):>26.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
