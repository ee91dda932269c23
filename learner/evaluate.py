"""Evaluate a student the paper's way: sample with temperature 1 for each seed through vLLM, the paper's prompt
wrapper, ROUGE-L against the best reference, mean and spread across seeds; also Dist-4 and the test-set LM loss
of the references (diversity, Appendix B.4). With --teacher: the reverse KL[q||p] on the student's samples, the
forward KL[p||q] on the teacher's samples (both exact over the vocabulary at each position) and the exposure
bias ExAccErr (Appendix B.5) on the first --kl-prompts prompts.

    python -m learner.evaluate --model runs/tiny/checkpoints/best --data data/dolly/test.jsonl \
        [--data FILE2.jsonl ...] [--seeds 10 20 30 40 50] [--max-new-tokens 64] [--limit N] [--out results.json] \
        [--teacher DIR --kl-prompts 100] [--samples samples.jsonl] \
        [--format dolly|chat|prompt] [--template auto|chat|dolly|none] [--column messages=conversations ...]

--data takes what a run's data.train / data.valid take (a .jsonl / .json / .parquet file, a folder, or a datasets
Hub name `org/name:split`), read as --format with the run's column names; --model and --teacher take folders or
Hub ids (`org/name[@revision]`). Prompts are rendered as a run renders them (common/templates.py): pass the run's
data.format and data.template. Rows without a reference (prompt data) get no ROUGE-L or LM loss; the KLs need none.

--samples writes every generated response (dataset, seed, example index, prompt, references, response, its
token count and ROUGE-L) as JSON lines, to read what a score stands for.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common.data import DataError, strip_eos
from common.metrics import distinct_n, exposure_accumulated_error, mean_and_spread, rouge_l_scores
from common.models import ModelError, check_compatible, load_model, load_tokenizer


def teacher_analysis(
    student,
    teacher,
    teacher_engine,
    prompts: list[list[int]],
    student_samples: list[list[int]],
    vocab_size: int,
    pad_id: int,
    eos: int,
    max_new_tokens: int,
) -> dict:
    """Reverse KL on the student's samples, forward KL on the teacher's, ExAccErr from both (per position)."""
    from learner.analysis import position_kls

    own = position_kls(student, teacher, prompts, student_samples, vocab_size, pad_id, batch_size=4)
    teacher_samples = [
        o.token_ids for o in teacher_engine.generate(prompts, max_new_tokens, temperature=1.0, stop_token_ids=[eos])
    ]
    theirs = position_kls(student, teacher, prompts, teacher_samples, vocab_size, pad_id, batch_size=4)
    rev_seq, rev_tok = own.reverse_means()
    fwd_seq, fwd_tok = theirs.forward_means()
    length = max_new_tokens
    try:
        exacc: float | None = exposure_accumulated_error(own.forward, theirs.forward, length)
    except ValueError:  # student == teacher on every teacher prefix
        exacc = None
    return {
        "kl_prompts": len(prompts),
        "reverse_kl_seq": rev_seq,
        "reverse_kl_token": rev_tok,
        "forward_kl_seq": fwd_seq,
        "forward_kl_token": fwd_tok,
        "exacc_err_pct": exacc,
        "exacc_length": length,
    }


def evaluate_model(
    model_dir: str,
    data_files: list[str],
    seeds: list[int],
    max_new_tokens: int,
    max_prompt_tokens: int = 512,
    limit: int | None = None,
    kv_cache_mb: int = 256,
    teacher_dir: str | None = None,
    kl_prompts: int = 100,
    samples: list[dict] | None = None,
    fmt: str = "dolly",
    template: str = "auto",
    columns: dict[str, str] | None = None,
) -> dict:
    """The results dict (per dataset: per-seed scores, spread, analysis); generated responses are appended to
    `samples` when a list is given."""
    from actors.engine import VLLMEngine
    from common.formats import load_examples
    from common.hub import resolve_model
    from common.templates import render_prompt_ids, render_prompt_text, resolve_template
    from learner.analysis import lm_loss

    model_dir = str(resolve_model(model_dir).path)
    teacher_dir = str(resolve_model(teacher_dir).path) if teacher_dir is not None else None
    tokenizer = load_tokenizer(model_dir)
    eos = tokenizer.eos_token_id
    template = resolve_template(template, fmt, tokenizer)
    # fail on bad data before the engine starts
    datasets = {path: load_examples(path, fmt, columns, limit, base=Path.cwd()) for path in data_files}
    vocab_size = len(tokenizer)
    if teacher_dir is not None:
        vocab_size = check_compatible(teacher_dir, model_dir, tokenizer).tokenizer_size
    max_len = max_prompt_tokens + max_new_tokens + 8
    engine = VLLMEngine(model_dir, kv_cache_bytes=kv_cache_mb << 20, seed=seeds[0], max_model_len=max_len)
    student = load_model(model_dir).eval()
    teacher = teacher_engine = None
    if teacher_dir is not None:
        teacher = load_model(teacher_dir).eval()
        teacher_engine = VLLMEngine(teacher_dir, kv_cache_bytes=kv_cache_mb << 20, seed=seeds[0], max_model_len=max_len)
    stops = {eos, *engine.eos_token_ids}  # what generate stops on (finished_eos)
    results: dict = {"model": str(model_dir), "seeds": seeds, "max_new_tokens": max_new_tokens, "datasets": {}}
    for path, examples in datasets.items():
        prompts, refs, kept, skipped = [], [], [], 0
        for i, ex in enumerate(examples):
            ids = render_prompt_ids(ex, tokenizer, template)
            if len(ids) > max_prompt_tokens:
                skipped += 1
                continue
            prompts.append(ids)
            refs.append(ex.references)
            kept.append((i, render_prompt_text(ex, tokenizer, template)))
        per_seed: dict[int, dict] = {}
        first_samples: list[list[int]] = []
        for seed in seeds:
            t0 = time.time()
            engine.reseed(seed)
            outs = engine.generate(prompts, max_new_tokens, temperature=1.0, stop_token_ids=[eos])
            # an output that finished on EOS ends with one of these (vLLM checks stop tokens before the length)
            responses = [strip_eos(o.token_ids, stops) for o in outs]
            first_samples = first_samples or [o.token_ids for o in outs]
            texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
            # scored once: the seed's mean and, with --samples, each response (None: a row without a reference)
            scored = [k for k, r in enumerate(refs) if r]
            some = rouge_l_scores([texts[k] for k in scored], [refs[k] for k in scored])
            scores: list[float | None] = [None] * len(refs)
            for k, score in zip(scored, some, strict=True):
                scores[k] = score
            per_seed[seed] = {
                "rouge_l": sum(some) / len(some) if some else None,
                "dist_4": distinct_n(responses, 4),
                "mean_tokens": sum(len(r) for r in responses) / max(len(responses), 1),
                "seconds": round(time.time() - t0, 2),
            }
            if samples is not None:
                samples.extend(
                    {
                        "dataset": str(path),
                        "seed": seed,
                        "index": i,
                        "prompt": prompt,
                        "references": ref,
                        "response": text,
                        "tokens": len(resp),
                        "rouge_l": score,
                    }
                    for (i, prompt), ref, text, resp, score in zip(kept, refs, texts, responses, scores, strict=True)
                )
            rouge = per_seed[seed]["rouge_l"]
            print(
                f"[evaluate] {Path(path).name} seed {seed}: ROUGE-L {'-' if rouge is None else f'{rouge:.2f}'} "
                f"({len(prompts)} prompts, {per_seed[seed]['seconds']:.1f}s)",
                flush=True,
            )
        with_refs = [k for k, r in enumerate(refs) if r]
        rouge_mean: float | None = None
        rouge_sd: float | None = None
        if with_refs:
            rouge_mean, rouge_sd = mean_and_spread([r["rouge_l"] for r in per_seed.values()])
        dist_mean, _ = mean_and_spread([r["dist_4"] for r in per_seed.values()])
        ref_ids = [tokenizer.encode(refs[k][0], add_special_tokens=False) + [eos] for k in with_refs]
        loss = None
        if with_refs:
            ref_prompts = [prompts[k] for k in with_refs]
            loss = lm_loss(student, ref_prompts, ref_ids, vocab_size, tokenizer.pad_token_id, batch_size=4)
        entry = {
            "n_prompts": len(prompts),
            "n_with_references": len(with_refs),
            "skipped_long_prompts": skipped,
            "format": fmt,
            "template": template,
            "rouge_l_mean": rouge_mean,
            "rouge_l_std": rouge_sd,
            "dist_4_mean": dist_mean,
            "lm_loss": loss,
            "per_seed": per_seed,
        }
        if teacher is not None:
            t0 = time.time()
            n = min(kl_prompts, len(prompts))
            entry.update(
                teacher_analysis(
                    student,
                    teacher,
                    teacher_engine,
                    prompts[:n],
                    first_samples[:n],
                    vocab_size,
                    tokenizer.pad_token_id,
                    eos,
                    max_new_tokens,
                )
            )
            print(
                f"[evaluate] {Path(path).name}: reverse KL {entry['reverse_kl_seq']:.3f}/response, forward KL "
                f"{entry['forward_kl_seq']:.3f}/response on {n} prompts ({time.time() - t0:.1f}s)",
                flush=True,
            )
        results["datasets"][str(path)] = entry
    return results


def format_table(results: dict) -> str:
    lines = [
        f"{'dataset':<32} {'n':>5} {'ROUGE-L':>8} {'+-':>6} {'Dist-4':>7} {'LM loss':>8} {'rev KL':>7} "
        f"{'fwd KL':>7} {'ExAccErr%':>9}"
    ]

    def num(r: dict, key: str, width: int) -> str:
        return f"{r[key]:>{width}.2f}" if r.get(key) is not None else f"{'-':>{width}}"

    for name, r in results["datasets"].items():
        lines.append(
            f"{Path(name).name:<32} {r['n_prompts']:>5} {num(r, 'rouge_l_mean', 8)} {num(r, 'rouge_l_std', 6)} "
            f"{r['dist_4_mean']:>7.2f} {num(r, 'lm_loss', 8)} {num(r, 'reverse_kl_seq', 7)} "
            f"{num(r, 'forward_kl_seq', 7)} {num(r, 'exacc_err_pct', 9)}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m learner.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="Hugging Face folder or Hub id (model + tokenizer)")
    parser.add_argument(
        "--data", action="append", required=True, help="file, folder or datasets Hub name org/name:split (repeatable)"
    )
    parser.add_argument("--format", default="dolly", choices=["dolly", "chat", "prompt"], help="how rows read")
    parser.add_argument(
        "--template", default="auto", choices=["auto", "chat", "dolly", "none"], help="prompt rendering"
    )
    parser.add_argument(
        "--column",
        action="append",
        default=[],
        metavar="ROLE=NAME",
        help="a column's name, e.g. messages=conversations",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[10, 20, 30, 40, 50])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-prompt-tokens", type=int, default=512)
    parser.add_argument("--limit", type=int, default=None, help="first N examples of each file")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--teacher", default=None, help="teacher folder or Hub id: adds reverse/forward KL, ExAccErr")
    parser.add_argument("--kl-prompts", type=int, default=100, help="prompts (of each file) for the KL measures")
    parser.add_argument("--samples", type=Path, default=None, help="write every generated response here (JSONL)")
    args = parser.parse_args(argv)
    samples: list[dict] | None = [] if args.samples else None
    from common.formats import DEFAULT_COLUMNS

    columns = dict(c.split("=", 1) for c in args.column if "=" in c)
    unknown = [c for c in args.column if "=" not in c or c.split("=", 1)[0] not in DEFAULT_COLUMNS]
    if unknown:
        print(
            f"error: --column {unknown[0]!r}: expected ROLE=NAME, ROLE one of {', '.join(DEFAULT_COLUMNS)}",
            file=sys.stderr,
        )
        return 2
    try:
        results = evaluate_model(
            args.model,
            args.data,
            args.seeds,
            args.max_new_tokens,
            args.max_prompt_tokens,
            args.limit,
            teacher_dir=args.teacher,
            kl_prompts=args.kl_prompts,
            samples=samples,
            fmt=args.format,
            template=args.template,
            columns=columns,
        )
    except (DataError, ModelError, FileNotFoundError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    if args.samples and samples is not None:
        args.samples.parent.mkdir(parents=True, exist_ok=True)
        args.samples.write_text("".join(json.dumps(row) + "\n" for row in samples))
        print(f"wrote {len(samples)} responses to {args.samples}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
