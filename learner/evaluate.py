"""Evaluate a student the paper's way: sample with temperature 1 for each seed through vLLM, the paper's prompt
wrapper, ROUGE-L against the best reference, mean and spread across seeds; also Dist-4.

    python -m learner.evaluate --model runs/tiny/checkpoints/best --data ../shared/data/dolly/test.jsonl \
        [--data FILE2.jsonl ...] [--seeds 10 20 30 40 50] [--max-new-tokens 64] [--limit N] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common.data import DataError, load_jsonl
from common.metrics import corpus_rouge_l, distinct_n, mean_and_spread
from common.models import ModelError, load_tokenizer


def evaluate_model(model_dir: str, data_files: list[str], seeds: list[int], max_new_tokens: int,
                   max_prompt_tokens: int = 512, limit: int | None = None, kv_cache_mb: int = 256) -> dict:
    from actors.engine import VLLMEngine

    tokenizer = load_tokenizer(model_dir)
    eos = tokenizer.eos_token_id
    datasets = {path: load_jsonl(path, limit=limit) for path in data_files}  # fail on bad data before the engine
    engine = VLLMEngine(model_dir, kv_cache_bytes=kv_cache_mb << 20, seed=seeds[0],
                        max_model_len=max_prompt_tokens + max_new_tokens + 8)
    results: dict = {"model": str(model_dir), "seeds": seeds, "max_new_tokens": max_new_tokens, "datasets": {}}
    for path, examples in datasets.items():
        prompts, refs, skipped = [], [], 0
        for ex in examples:
            ids = tokenizer.encode(ex.prompt, add_special_tokens=False)
            if len(ids) > max_prompt_tokens:
                skipped += 1
                continue
            prompts.append(ids)
            refs.append(ex.references)
        per_seed: dict[int, dict] = {}
        for seed in seeds:
            t0 = time.time()
            engine.reseed(seed)
            outs = engine.generate(prompts, max_new_tokens, temperature=1.0, stop_token_ids=[eos])
            responses = [o.token_ids[:-1] if o.finished_eos else o.token_ids for o in outs]
            texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
            per_seed[seed] = {
                "rouge_l": corpus_rouge_l(texts, refs), "dist_4": distinct_n(responses, 4),
                "mean_tokens": sum(len(r) for r in responses) / max(len(responses), 1),
                "seconds": round(time.time() - t0, 2),
            }
            print(f"[evaluate] {Path(path).name} seed {seed}: ROUGE-L {per_seed[seed]['rouge_l']:.2f} "
                  f"({len(prompts)} prompts, {per_seed[seed]['seconds']:.1f}s)", flush=True)
        rouge_mean, rouge_sd = mean_and_spread([r["rouge_l"] for r in per_seed.values()])
        dist_mean, _ = mean_and_spread([r["dist_4"] for r in per_seed.values()])
        results["datasets"][str(path)] = {"n_prompts": len(prompts), "skipped_long_prompts": skipped,
                                          "rouge_l_mean": rouge_mean, "rouge_l_std": rouge_sd,
                                          "dist_4_mean": dist_mean, "per_seed": per_seed}
    return results


def format_table(results: dict) -> str:
    lines = [f"{'dataset':<40} {'n':>5} {'ROUGE-L':>8} {'+-':>6} {'Dist-4':>7}"]
    for name, r in results["datasets"].items():
        lines.append(f"{Path(name).name:<40} {r['n_prompts']:>5} {r['rouge_l_mean']:>8.2f} {r['rouge_l_std']:>6.2f} "
                     f"{r['dist_4_mean']:>7.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m learner.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face folder (model + tokenizer)")
    parser.add_argument("--data", action="append", required=True, help="Dolly-schema JSONL (repeatable)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[10, 20, 30, 40, 50])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-prompt-tokens", type=int, default=512)
    parser.add_argument("--limit", type=int, default=None, help="first N examples of each file")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    try:
        results = evaluate_model(args.model, args.data, args.seeds, args.max_new_tokens, args.max_prompt_tokens,
                                 args.limit)
    except (DataError, ModelError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
