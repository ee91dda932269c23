"""Teacher-mixed sampling, measured side by side in one run (medians of repeats, ratios):

  A  coin-segment mixture on two vLLM engines (actors/sampler.py, what the service uses)
  B  lockstep mixture in plain torch: both models decode every position with a KV cache, one coin per token
  C  student-only vLLM sampling (alpha = 0), the cost floor

    python bench/mixture_sampling.py [--prompts 64] [--tokens 48] [--alpha 0.2] [--repeats 3]

Uses the embedded default's tiny teacher and student (built once, cached).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402

from actors.sampler import Sampler, SamplerSpec  # noqa: E402
from common.config import load_config, resolve_path  # noqa: E402
from common.data import load_jsonl, tokenize_examples  # noqa: E402
from common.models import load_model, load_tokenizer  # noqa: E402
from common.tiny import build_tiny_models  # noqa: E402


@torch.no_grad()
def lockstep_mixture(
    student, teacher, prompts: list[list[int]], max_new: int, alpha: float, eos: int, gen: torch.Generator
) -> int:
    """Left-padded batch; every step both models score the last token, a coin picks whose distribution
    samples it (exact per-token mixture). Returns the number of generated tokens."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[eos] * (width - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    s_out = student(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
    t_out = teacher(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
    done = torch.zeros(len(prompts), dtype=torch.bool)
    produced = 0
    for _ in range(max_new):
        q = s_out.logits[:, -1].softmax(-1)
        p = t_out.logits[:, -1].softmax(-1)
        coin = torch.rand(len(prompts), generator=gen) < alpha
        probs = torch.where(coin.unsqueeze(-1), p, q)
        nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
        produced += int((~done).sum())
        done |= nxt == eos
        if done.all():
            break
        attn = torch.cat([attn, torch.ones(len(prompts), 1, dtype=attn.dtype)], 1)
        pos = pos[:, -1:] + 1
        s_out = student(
            input_ids=nxt[:, None],
            attention_mask=attn,
            position_ids=pos,
            past_key_values=s_out.past_key_values,
            use_cache=True,
        )
        t_out = teacher(
            input_ids=nxt[:, None],
            attention_mask=attn,
            position_ids=pos,
            past_key_values=t_out.past_key_values,
            use_cache=True,
        )
    return produced


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--alpha", type=float, default=0.2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config()
    tiny = build_tiny_models(
        cfg.models.tiny, resolve_path(cfg.data.train), cfg.data.max_prompt_tokens, cfg.data.max_response_tokens
    )
    tok = load_tokenizer(tiny.tokenizer)
    items, _ = tokenize_examples(
        load_jsonl(resolve_path(cfg.data.valid), limit=400), tok, cfg.data.max_prompt_tokens, None
    )
    prompts = [it.prompt_ids for it in items[: args.prompts]]
    eos = tok.eos_token_id
    spec = dict(eos_token_id=eos, max_new_tokens=args.tokens, kv_cache_mb=256, max_model_len=512)
    mixed = Sampler(SamplerSpec(str(tiny.student), str(tiny.teacher), alpha=args.alpha, **spec))
    student_hf, teacher_hf = load_model(tiny.student).eval(), load_model(tiny.teacher).eval()
    gen = torch.Generator().manual_seed(0)

    rates: dict[str, list[float]] = {"A": [], "B": [], "C": []}
    calls: list[int] = []
    mixed.sample(prompts[:4])  # warm-up
    for _ in range(args.repeats):
        before = mixed.stats["engine_calls"]
        t0 = time.perf_counter()
        r = mixed.sample(prompts)
        rates["A"].append(r.num_tokens / (time.perf_counter() - t0))
        calls.append(mixed.stats["engine_calls"] - before)
        t0 = time.perf_counter()
        n = lockstep_mixture(student_hf, teacher_hf, prompts, args.tokens, args.alpha, eos, gen)
        rates["B"].append(n / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        r = mixed.sample(prompts, alpha=0.0)
        rates["C"].append(r.num_tokens / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(
        f"{args.prompts} prompts x {args.tokens} tokens, alpha {args.alpha}, {args.repeats} repeats "
        f"(torch threads {torch.get_num_threads()})"
    )
    print(f"A vLLM coin-segment mixture : {med['A']:8.0f} tok/s (median), {statistics.median(calls)} engine calls")
    print(f"B torch lockstep mixture    : {med['B']:8.0f} tok/s (median)")
    print(f"C vLLM student only         : {med['C']:8.0f} tok/s (median)")
    print(f"ratios: A/B = {med['A'] / med['B']:.2f}, A/C = {med['A'] / med['C']:.2f}")


if __name__ == "__main__":
    main()
