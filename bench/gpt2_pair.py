"""The GPT-2-vocabulary model pair of the throughput comparison with TRL, built locally (no hub):

* teacher: Llama, hidden 256 x 4 layers x 4 heads, FFN 512, untied embeddings, trained on Dolly train prompt +
  response (up to 64 + 64 tokens) for 300 steps of batch 8 at lr 1e-3 (about 28 M parameters, most of them the
  two 50,257 x 256 embedding matrices);
* student: Llama, hidden 128 x 2 layers x 2 heads, FFN 256, random (about 13 M parameters);
* tokenizer: GPT-2's (vocabulary 50,257) from the shared data folder, saved into both model folders.

    python -m bench.gpt2_pair OUT_DIR [--steps 300]
    python -m bench.throughput --pair OUT_DIR ...        # then OUT_DIR/teacher and OUT_DIR/student

Minutes on 2 cores; not a CI test.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.config import load_config, resolve_path
from common.data import collate_prompt_response, iterate_batches, load_jsonl, tokenize_examples
from common.models import build_llama, load_tokenizer, save_hf, small_llama_config
from common.tiny import MAX_POSITIONS, train_causal_lm


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--tokenizer", default="../shared/data/tokenizers/gpt2")
    args = ap.parse_args()

    cfg = load_config()
    tok = load_tokenizer(str(resolve_path(args.tokenizer)))
    eos, vocab = tok.eos_token_id, len(tok)
    items, report = tokenize_examples(load_jsonl(resolve_path(cfg.data.train)), tok, 64, 64)
    print(f"[gpt2-pair] vocabulary {vocab}, eos {eos}; teacher training data: {report}", flush=True)
    batches = (
        collate_prompt_response([(it.prompt_ids, it.response_ids) for it in batch], eos, train_on_prompt=True)
        for batch in iterate_batches(items, args.batch, cfg.seed)
    )
    teacher = build_llama(small_llama_config(vocab, 256, 4, 4, 512, MAX_POSITIONS, eos, eos), cfg.seed)
    train_causal_lm(teacher, batches, args.steps, args.lr, label="gpt2-pair teacher")
    save_hf(teacher, tok, args.out / "teacher")
    student = build_llama(small_llama_config(vocab, 128, 2, 2, 256, MAX_POSITIONS, eos, eos), cfg.seed + 1)
    save_hf(student, tok, args.out / "student")
    sizes = {n: sum(p.numel() for p in m.parameters()) / 1e6 for n, m in (("teacher", teacher), ("student", student))}
    print(f"[gpt2-pair] {args.out}: teacher {sizes['teacher']:.1f} M, student {sizes['student']:.1f} M parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
