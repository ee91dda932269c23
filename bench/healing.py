"""Did healing work? Held-out general-text NLL and greedy continuations of fixed openings, for the teacher, the cut
student before healing and the healed student(s), in one process on the same blocks.

    python -m bench.healing --teacher runs/heal/models/teacher --model cut=runs/heal/models/student \
        --model healed=runs/heal/checkpoints/best [--config configs/heal_smollm2.yaml] [--tokens 40] [--out F.json]

The held-out blocks are those `method: heal` evaluates with the same config (documents never trained on); NLL is
per target token (every token of a block but its first). Continuations are greedy (no sampling, no penalties), so
they are reproducible and show the model's most likely text as it is.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OPENINGS = (
    "The history of the Roman Empire",
    "Photosynthesis is the process by which",
    "The best way to learn a new language is",
    "In 1969, the first human",
    "A computer program is",
)


def held_out_nll(model, blocks, batch: int = 8) -> float:
    total = tokens = 0.0
    with torch.no_grad():
        for start in range(0, len(blocks), batch):
            ids = torch.tensor([b.prompt_ids + b.response_ids for b in blocks[start : start + batch]])
            logp = model(input_ids=ids).logits[:, :-1].float().log_softmax(-1)
            total -= logp.gather(-1, ids[:, 1:, None]).sum().item()
            tokens += ids[:, 1:].numel()
    return total / tokens


def greedy(model, tok, text: str, new_tokens: int) -> str:
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id or tok.eos_token_id,
        )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    from common.config import load_config
    from common.models import load_model, load_tokenizer
    from common.preflight import heal_splits, read_general_text

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--model", action="append", default=[], help="NAME=FOLDER, any number")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "heal_smollm2.yaml")
    ap.add_argument("--tokens", type=int, default=40, help="new tokens per greedy continuation")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    tok = load_tokenizer(args.teacher)
    blocks = heal_splits(cfg, read_general_text(cfg), tok)[1][1]
    models = {"teacher": args.teacher} | dict(m.split("=", 1) for m in args.model)
    report: dict[str, dict] = {}
    for name, folder in models.items():
        t0 = time.time()
        model = load_model(str(folder)).eval()
        nll = held_out_nll(model, blocks)
        conts = {o: greedy(model, tok, o, args.tokens) for o in OPENINGS}
        report[name] = {"folder": str(folder), "held_out_nll": nll, "continuations": conts}
        print(f"{name}: held-out NLL {nll:.3f} per token ({time.time() - t0:.0f}s)", flush=True)
    teacher_nll = report["teacher"]["held_out_nll"]
    print("\n| model | held-out NLL per token | gap to the teacher |\n|---|---:|---:|")
    for name, r in report.items():
        print(f"| {name} | {r['held_out_nll']:.3f} | {r['held_out_nll'] - teacher_nll:+.3f} |")
    for opening in OPENINGS:
        print(f"\n**{opening}** ...")
        for name, r in report.items():
            print(f"- {name}: {json.dumps(r['continuations'][opening], ensure_ascii=False)}")
    if args.out:
        args.out.write_text(json.dumps({"blocks": len(blocks), "models": report}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
