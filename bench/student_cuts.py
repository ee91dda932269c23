"""Which layers should a student cut from the teacher keep? Validation NLL of each cut before any training.

    python -m bench.student_cuts [--teacher runs/table1/models/teacher] [--examples 24] [--general]

A cut keeps the teacher's embeddings, final norm and head, and the listed layers (as `python -m common.convert
derive-student --layers ...` writes it). The NLL is per reference token on the first N Dolly validation examples,
with the paper's prompt wrapper; lower means less for SFT to heal. Candidates are evaluated in one process, side by
side, against the teacher itself.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = {
    "every 3rd (10 layers)": list(range(0, 30, 3)),
    "first 10 + last 2 (12 layers)": list(range(10)) + [28, 29],
    "first 6 + last 6 (12 layers)": list(range(6)) + list(range(24, 30)),
    "first 14 + last 2 (16 layers)": list(range(14)) + [28, 29],
    "first 8 + last 8 (16 layers)": list(range(8)) + list(range(22, 30)),
    "first 9 + last 9 (18 layers)": list(range(9)) + list(range(21, 30)),
    "every 5th + last 4 (10 layers)": list(range(0, 25, 5)) + list(range(25, 30)),
}


def nll_per_token(model, pairs: list[tuple[list[int], list[int]]]) -> float:
    total = tokens = 0.0
    with torch.no_grad():
        for prompt, response in pairs:
            ids = torch.tensor([prompt + response])
            logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            nll = -logp.gather(-1, ids[0, 1:, None])[:, 0][len(prompt) - 1 :]
            total, tokens = total + nll.sum().item(), tokens + len(response)
    return total / tokens


def with_layers(teacher, keep: list[int]):
    """A shallow copy of the teacher that runs only `keep` (shares its weights; nothing is copied)."""
    model = copy.copy(teacher)
    model._modules = dict(teacher._modules)  # a shallow copy shares the submodule dict: setting a child would
    model.model = copy.copy(teacher.model)  # replace the teacher's too
    model.model._modules = dict(teacher.model._modules)
    model.model.layers = torch.nn.ModuleList([teacher.model.layers[i] for i in keep])
    model.config = copy.deepcopy(teacher.config)
    model.config.num_hidden_layers = len(keep)
    return model


def main(argv: list[str] | None = None) -> int:
    from common.data import format_prompt, load_jsonl
    from common.models import load_model, load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=ROOT / "runs" / "table1" / "models" / "teacher")
    parser.add_argument("--data", type=Path, default=ROOT / "../shared/data/dolly/valid.jsonl")
    parser.add_argument("--examples", type=int, default=24)
    parser.add_argument("--general", action="store_true", help="held-out general text (method: heal's split)")
    args = parser.parse_args(argv)
    tok = load_tokenizer(args.teacher)
    teacher = load_model(args.teacher).eval()
    if args.general:
        from common.config import load_config
        from common.preflight import heal_splits, read_general_text

        cfg = load_config(None, ["method=heal"])
        held_out = heal_splits(cfg, read_general_text(cfg), tok)[1][1][: args.examples]
        pairs = [(b.prompt_ids, b.response_ids) for b in held_out]
        print(f"held-out general-text NLL per token, {len(pairs)} blocks of {cfg.heal.block_tokens} tokens")
    else:
        pairs = [
            (
                tok(format_prompt(e.instruction, e.context)).input_ids[-96:],
                tok(e.references[0]).input_ids[:48] + [tok.eos_token_id],
            )
            for e in load_jsonl(args.data, limit=args.examples)
        ]
        print(f"validation NLL per reference token, first {len(pairs)} examples of {args.data.name}")
    print(f"  teacher ({teacher.config.num_hidden_layers} layers): {nll_per_token(teacher, pairs):.3f}")
    for name, keep in CANDIDATES.items():
        cut = with_layers(teacher, keep)
        for j, layer in enumerate(cut.model.layers):  # each layer's KV-cache slot follows its new position
            layer.self_attn.layer_idx = j
        print(f"  {name}: {nll_per_token(cut, pairs):.3f}", flush=True)
        for i in keep:
            teacher.model.layers[i].self_attn.layer_idx = i
    return 0


if __name__ == "__main__":
    sys.exit(main())
