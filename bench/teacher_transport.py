"""Teacher -> learner transports on real rollouts: payload bytes, single-step KL error, gradient cosine, learner peak.

    nice -n 5 python -m bench.teacher_transport [--prompts 32] [--max-new-tokens 64] [--ks 20 64 256] [--out F]

The SmolLM2 pair (/work/smol/teacher, /work/smol/student; V = 49,152). Rollouts are real: the student samples a
response to each of the first `--prompts` Dolly validation prompts (the paper's prompt wrapper, prompts up to
`--max-prompt-tokens`) with HF `generate` at temperature 1 (no top-k / top-p), stopping at EOS or
`--max-new-tokens` (`--responses reference` uses Dolly's reference responses instead, as a contrast on natural
text). The old log-probs are the student's current ones (lag 0). The project's `Teacher`
(actors/teacher.py) scores them once in float32 (dense fp32 transport, the old default); every other transport is
packed from those same log-probs by the teacher's own packing (`Teacher._pack_logprobs`): dense bf16 (what a GPU
teacher sends; here only the wire precision differs, not the teacher's compute) and top-k for each k. `hidden fp32`
(teacher.transport=hidden) is scored by a second `Teacher` with that transport: the teacher's final hidden states
and its exact sampled-token log-probs; the KL and the learner's step expand them to full-vocabulary log-probs with
the teacher's output layer (`common.teacher_head`), as the learner does, the step's process holding that layer.

Per transport:
  bytes     the shard as Ray would move it: `len(pickle.dumps(shard, protocol=5))` (Ray serialises with
            cloudpickle at protocol 5; torch tensors pickle in-band), the teacher field alone, and the raw tensor
            bytes (`ScoredShard.teacher_bytes`), each per response token
  KL        the single-step KL as the learner computes it (`learner.objectives.reverse_kl_per_token`, student
            logits at the response positions): |sum_t KL_x - sum_t KL_dense| / sum_t KL_dense, and the per-token
            gap KL_dense,t - KL_x,t (mean, max; >= 0 for top-k, a lower bound)
  gradient  cosine between the gradient of the MiniLLM loss (single + long, no pre-training batch, alpha 0.2,
            PPO clip 0.2, token mean) w.r.t. all student parameters under the transport and under dense fp32,
            both from the real `LearnerWorker.minillm_step` (FSDP2, gloo group of one, lr 0). The long-term term
            uses the teacher's exact token log-probs under every transport, so it is the same for all; one extra
            dense step with long_weight 0 separates it, giving the cosine of the single-step gradients alone too
  memory    peak resident set of the learner process during that step (VmHWM, reset just before the step;
            one fresh subprocess per transport; see bench/memory.py for why not ru_maxrss)

`--kl-only-ks` adds top-k transports measured for bytes and KL only (no learner step). KL, bytes and gradients
are deterministic for the sampled rollouts; the memory columns are medians of `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SMOL = Path("/work/smol")
DOLLY_VALID = Path("/work/shared/data/dolly/valid.jsonl")


def log(t0: float, msg: str) -> None:
    print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)


@torch.no_grad()
def sample_responses(
    student: Any, prompts: list[list[int]], max_new: int, eos: int, batch: int, seed: int
) -> list[list[int]]:
    """Student samples at temperature 1 (left-padded batches); each response is cut after its first EOS."""
    torch.manual_seed(seed)
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch):
        group = prompts[start : start + batch]
        width = max(len(p) for p in group)
        ids = torch.tensor([[eos] * (width - len(p)) + p for p in group])
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        gen = student.generate(
            input_ids=ids,
            attention_mask=attn,
            do_sample=True,
            temperature=1.0,
            top_k=0,  # 0 disables HF's default top-k of 50: the student's full distribution
            top_p=1.0,
            max_new_tokens=max_new,
            pad_token_id=eos,
        )
        for row in gen[:, width:].tolist():
            out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


@torch.no_grad()
def student_hidden(student: Any, packed: Any, batch: int) -> torch.Tensor:
    """Final hidden states [N, H] at the positions that predict the response tokens (row-major over mask)."""
    from common.models import final_hidden_states
    from common.rollout import gather_positions

    parts = []
    for start in range(0, packed.tokens.shape[0], batch):
        b = slice(start, start + batch)
        hidden = final_hidden_states(student, packed.input_ids[b], packed.attention_mask[b])
        parts.append(gather_positions(hidden, packed.predict_pos[b])[packed.mask[b] > 0])
    return torch.cat(parts)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm() * b.norm()))


def main(argv: list[str] | None = None) -> int:
    from bench.memory import measure_in_subprocess
    from common.data import load_jsonl, tokenize_examples
    from common.logprobs import TopKLogprobs, vocab_log_softmax
    from common.models import load_model, load_tokenizer
    from common.rollout import Rollouts, ScoredShard, pack_sequences
    from common.teacher_head import TeacherHead, expand_teacher
    from learner.objectives import reverse_kl_per_token

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=SMOL / "teacher")
    parser.add_argument("--student", type=Path, default=SMOL / "student")
    parser.add_argument("--data", type=Path, default=DOLLY_VALID)
    parser.add_argument("--prompts", type=int, default=32)
    # student: sampled by the student (the MiniLLM case); reference: Dolly's references cut to --max-new-tokens
    parser.add_argument("--responses", choices=["student", "reference"], default="student")
    parser.add_argument("--max-prompt-tokens", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--ks", type=int, nargs="+", default=[20, 64, 256], help="top-k transports")
    # more top-k transports measured for bytes and KL only (no learner step: each costs minutes)
    parser.add_argument("--kl-only-ks", type=int, nargs="*", default=[800, 4096, 16384])
    parser.add_argument("--alpha", type=float, default=0.2)
    parser.add_argument("--chunk-tokens", type=int, default=1024, help="the learner's logit_chunk_tokens")
    parser.add_argument("--repeats", type=int, default=1, help="memory subprocesses per transport (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and in each step subprocess")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="8 prompts, 32 new tokens, k in {20, 64}")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.max_new_tokens, args.ks, args.kl_only_ks = 8, 32, [20, 64], [800]
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    # ----- real rollouts ---------------------------------------------------------------------------------
    from actors.teacher import Teacher

    tok = load_tokenizer(args.student)
    vocab, eos = len(tok), tok.eos_token_id
    examples = load_jsonl(args.data)
    kept, report = tokenize_examples(examples, tok, args.max_prompt_tokens, None)
    prompts = [k.prompt_ids for k in kept[: args.prompts]]
    student = load_model(args.student).eval()
    if args.responses == "student":
        log(t0, f"sampling {len(prompts)} responses from the student (T=1, up to {args.max_new_tokens} tokens)")
        responses = sample_responses(student, prompts, args.max_new_tokens, eos, 8, args.seed)
    else:
        responses = [k.response_ids[: args.max_new_tokens] for k in kept[: args.prompts]]
    packed = pack_sequences(prompts, responses, eos)
    hidden = student_hidden(student, packed, 8)
    head = student.get_output_embeddings()
    real = packed.mask > 0
    old_flat = torch.cat(
        [
            vocab_log_softmax(head(hidden[i : i + 512]), vocab)
            .gather(-1, packed.tokens[real][i : i + 512, None])
            .squeeze(-1)
            for i in range(0, hidden.shape[0], 512)
        ]
    )
    old = [old_flat[s:e].tolist() for s, e in zip(*_row_bounds(responses), strict=True)]
    lengths = [len(r) for r in responses]
    n_tok = sum(lengths)
    log(
        t0,
        f"{n_tok} response tokens (length min {min(lengths)}, median {statistics.median(lengths)}, max "
        f"{max(lengths)}; {sum(r[-1] == eos for r in responses)} ended with EOS); scoring with the teacher",
    )

    teacher = Teacher(str(args.teacher), vocab, eos, batch_size=8, transport="dense", dtype="float32")
    rollouts = Rollouts(prompts, responses, old, [[0] * n for n in lengths], weight_version=0)
    _, dense = teacher.score(rollouts, 1)
    dense_lp = dense.teacher
    assert isinstance(dense_lp, torch.Tensor) and dense_lp.dtype == torch.float32

    # every transport packed by the service's own code from the same float32 log-probs
    transports: dict[str, ScoredShard] = {}
    for name, transport, k, wire in [
        ("dense fp32", "dense", 0, torch.float32),
        ("dense bf16", "dense", 0, torch.bfloat16),
        *[(f"top-k {k}", "topk", k, torch.float32) for k in [*args.ks, *args.kl_only_ks]],
    ]:
        teacher.transport, teacher.top_k, teacher.wire_dtype = transport, k, wire
        transports[name] = ScoredShard(dense.packed, dense.teacher_token_logprobs, teacher._pack_logprobs(dense_lp))
    del teacher
    hidden_teacher = Teacher(str(args.teacher), vocab, eos, batch_size=8, transport="hidden", dtype="float32")
    _, transports["hidden fp32"] = hidden_teacher.score(rollouts, 1)
    del hidden_teacher
    teacher_head = TeacherHead.from_folder(args.teacher, vocab, torch.float32)
    teacher_entropy = float(-(dense_lp.exp() * dense_lp).sum(-1).mean())
    stepped = [n for n in transports if not n.startswith("top-k") or int(n.split()[-1]) in args.ks]

    # ----- bytes and single-step KL ----------------------------------------------------------------------
    rows: dict[str, dict[str, Any]] = {}
    for name, shard in transports.items():
        rows[name] = {
            "shard_pickle_bytes_per_token": len(pickle.dumps(shard, protocol=5)) / n_tok,
            "teacher_pickle_bytes_per_token": len(pickle.dumps(shard.teacher, protocol=5)) / n_tok,
            "teacher_raw_bytes_per_token": shard.teacher_bytes / n_tok,
        }
    kl: dict[str, list[torch.Tensor]] = {name: [] for name in transports}
    # why top-k loses what it loses: how much of each distribution's mass the teacher's top-k tokens hold
    mass: dict[str, list[torch.Tensor]] = {f"{who}_{name}": [] for name in transports for who in ("p", "q")}
    entropy: list[torch.Tensor] = []
    with torch.no_grad():
        for i in range(0, n_tok, 256):
            logits = head(hidden[i : i + 256])[..., :vocab]
            ones = torch.ones(logits.shape[0])
            logq = vocab_log_softmax(logits, vocab)
            entropy.append(-(logq.exp() * logq).sum(-1).double())
            for name, shard in transports.items():
                part = expand_teacher(shard.teacher[i : i + 256], teacher_head)
                kl[name].append(reverse_kl_per_token(logits, part, ones).double())
                if isinstance(part, TopKLogprobs):
                    mass[f"p_{name}"].append(-torch.expm1(part.tail.double()))
                    mass[f"q_{name}"].append(logq.gather(-1, part.ids).logsumexp(-1).exp().double())
    kl_dense = torch.cat(kl["dense fp32"])
    for name in transports:
        per_token = torch.cat(kl[name])
        gap = kl_dense - per_token
        rel = float((per_token.sum() - kl_dense.sum()).abs() / kl_dense.sum())
        rows[name].update(kl_sum=float(per_token.sum()), kl_rel_error=rel, gap_mean=float(gap.mean()))
        rows[name].update(gap_max=float(gap.max()), gap_abs_max=float(gap.abs().max()))
        if mass[f"p_{name}"]:
            rows[name]["teacher_mass_in_topk"] = float(torch.cat(mass[f"p_{name}"]).mean())
            rows[name]["student_mass_in_teacher_topk"] = float(torch.cat(mass[f"q_{name}"]).mean())
    student_entropy = float(torch.cat(entropy).mean())
    log(
        t0,
        f"KL done (dense fp32: {float(kl_dense.mean()):.3f} nats per token; entropy: student {student_entropy:.2f}, "
        f"teacher {teacher_entropy:.2f} nats); learner steps in subprocesses",
    )
    del student, hidden, kl

    # ----- learner steps: gradient and peak memory, one fresh process each --------------------------------
    base = {"student": str(args.student), "vocab": vocab, "chunk_tokens": args.chunk_tokens, "alpha": args.alpha}
    with tempfile.TemporaryDirectory(prefix="transport-") as tmp:
        grads: dict[str, Path] = {}
        jobs = [(name, 1.0) for name in stepped] + [("dense fp32", 0.0)]
        for name, long_weight in jobs:
            tag = name.replace(" ", "_") + ("" if long_weight else "_single_only")
            shard_path = Path(tmp) / f"{tag}.pt"
            torch.save(transports[name], shard_path)
            runs = []
            for rep in range(args.repeats if long_weight else 1):
                spec = {**base, "shard": str(shard_path), "long_weight": long_weight}
                if name.startswith("hidden"):
                    spec["teacher_dir"] = str(args.teacher)  # the learner holds the teacher's output layer
                if rep == 0:
                    spec["grad_out"] = str(Path(tmp) / f"{tag}.grad.pt")
                runs.append(measure_in_subprocess(spec, args.threads))
            shard_path.unlink()
            grads[tag] = Path(tmp) / f"{tag}.grad.pt"
            med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
            if long_weight:
                rows[name].update({f"mem_{k}": v for k, v in med.items() if k.endswith("_mb")})
                rows[name].update(step_seconds=med["step_seconds"], rho_min=med["rho_min"], rho_max=med["rho_max"])
            log(t0, f"{tag}: peak {med['peak_mb']:.0f} MB, rise {med['rise_mb']:.0f} MB, {med['step_seconds']:.0f} s")
        ref = torch.load(grads["dense_fp32"])
        long_grad = ref - torch.load(grads["dense_fp32_single_only"])  # the long term's gradient (transport-free)
        ref_single = ref - long_grad
        for name in stepped:
            g = torch.load(grads[name.replace(" ", "_")])
            rel_l2 = float((g.double() - ref.double()).norm() / ref.double().norm())
            rows[name].update(grad_cosine=cosine(g, ref), grad_rel_l2=rel_l2)
            rows[name]["single_grad_cosine"] = cosine(g - long_grad, ref_single)
        rows["dense fp32"]["single_to_long_grad_norm"] = float(ref_single.norm() / long_grad.norm())

    # ----- report -----------------------------------------------------------------------------------------
    what = {"student": "sampled by the student at T=1", "reference": "Dolly reference responses"}
    dense_bytes = rows["dense fp32"]["shard_pickle_bytes_per_token"]
    dense_peak = rows["dense fp32"]["mem_peak_mb"]
    print(
        f"\nTeacher transports on {len(prompts)} Dolly validation prompts, {n_tok} response tokens "
        f"({what[args.responses]}, <= {args.max_new_tokens} each), SmolLM2-135M teacher -> 12-layer student, "
        f"V = {vocab:,}; "
        f"learner chunk {args.chunk_tokens}, alpha {args.alpha}; memory medians of {args.repeats}\n"
    )
    print(
        "| transport | shard B/token (pickle) | teacher raw B/token | x fewer bytes | KL rel. error | "
        "per-token gap mean / max (nats) | grad cosine (single+long) | single-step grad cosine | "
        "learner peak (MB) | peak vs dense fp32 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        if "grad_cosine" in r:
            step_cols = (
                f"{r['grad_cosine']:.6f} | {r['single_grad_cosine']:.6f} | {r['mem_peak_mb']:,.0f} | "
                f"{r['mem_peak_mb'] / dense_peak:.2f}"
            )
        else:
            step_cols = "(no step) | | |"
        print(
            f"| {name} | {r['shard_pickle_bytes_per_token']:,.0f} | {r['teacher_raw_bytes_per_token']:,.0f} | "
            f"{dense_bytes / r['shard_pickle_bytes_per_token']:.1f} | {r['kl_rel_error']:.2e} | "
            f"{r['gap_mean']:.2e} / {r['gap_max']:.2e} | {step_cols} |"
        )
    ok = [
        n
        for n, r in rows.items()
        if n.startswith("top-k")
        and dense_bytes / r["shard_pickle_bytes_per_token"] >= 20
        and r["kl_rel_error"] <= 0.01
        and r.get("grad_cosine", 0.0) >= 0.99
    ]
    kl_ok = [n for n, r in rows.items() if n.startswith("top-k") and r["kl_rel_error"] <= 0.01]
    print("\n| transport | teacher mass in its top-k | student mass in the teacher's top-k |")
    print("|---|---:|---:|")
    for name, r in rows.items():
        if "teacher_mass_in_topk" in r:
            print(f"| {name} | {r['teacher_mass_in_topk']:.3f} | {r['student_mass_in_teacher_topk']:.3f} |")
    print(f"\ngoal (>= 20x fewer bytes, KL error <= 1%, gradient cosine >= 0.99) met by: {', '.join(ok) or 'none'}")
    print(f"KL error <= 1% alone met by: {', '.join(kl_ok) or 'none'}")
    if args.out:
        meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        result = {"config": meta, "prompts": len(prompts), "filter": str(report), "response_tokens": n_tok}
        result |= {"response_lengths": lengths, "kl_dense_mean_per_token": float(kl_dense.mean())}
        result |= {"student_entropy_mean": student_entropy, "teacher_entropy_mean": teacher_entropy}
        result |= {"seconds": time.perf_counter() - t0, "transports": rows}
        result |= {"goal_met_by": ok, "kl_error_within_1pct": kl_ok}
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def _row_bounds(responses: list[list[int]]) -> tuple[list[int], list[int]]:
    """Start and end of each response's rows in the flat (row-major) token order."""
    ends = torch.tensor([len(r) for r in responses]).cumsum(0).tolist()
    return [e - len(r) for e, r in zip(ends, responses, strict=True)], ends


if __name__ == "__main__":
    sys.exit(main())
