"""Arms of bench/throughput.py, each run in its own process (one JSON line of results on stdout, last line):

  loop    MiniLLM's maths in one plain torch process, no Ray, no vLLM: lockstep teacher-mixed sampling with both
          models' KV caches (HF), teacher scoring at the response positions, and one update of the student with
          the project's objective (learner/objectives.py: single-step + PPO-clipped long-term + L_PT), every step
          on the same models, prompts and lengths as the service.
  stages  the service's own stage classes (actors.sampler.Sampler, actors.teacher.Teacher,
          learner.worker.LearnerWorker) in one process, each stage timed alone on every batch (nothing overlaps):
          sample -> score -> update -> weight push, with the thread count each actor gets in the service.

    python -m bench._single_process loop|stages --steps 8 [key=value overrides as learner.main takes]

Thread counts are fixed before torch loads (OpenMP reads them once): --threads (default: every core).
lockstep_sample is also bench/mixture_sampling.py's arm B.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

from bench.harness import pin_threads

if __name__ == "__main__":  # imported (bench/mixture_sampling.py), the importer has set its threads
    pin_threads()
from common.engine_env import set_engine_env  # noqa: E402

set_engine_env(quiet=True)  # in-process engines, as in the service's actors

import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from transformers import PreTrainedModel  # noqa: E402

from common.config import DistillConfig, load_config, resolve_path  # noqa: E402
from common.data import (  # noqa: E402
    TokenizedExample,
    iterate_batches,
    iterate_pretrain,
    load_jsonl,
    load_pretrain_blocks,
    tokenize_examples,
)
from common.models import final_hidden_states, load_model, load_tokenizer  # noqa: E402
from common.rollout import PackedRollouts, gather_positions, pack_sequences  # noqa: E402
from common.tiny import tiny_models_for  # noqa: E402
from learner.objectives import minillm_token_losses, sequence_future_reward, token_nll  # noqa: E402


class Setup:
    """The run's models, prompts (the service's MiniLLM batch order) and pre-training batches, from the config."""

    def __init__(self, cfg: DistillConfig):
        self.cfg = cfg
        m = cfg.models
        if m.source == "tiny":
            tiny = tiny_models_for(cfg)
            self.teacher_dir, self.student_dir, tok_dir = str(tiny.teacher), str(tiny.student), str(tiny.tokenizer)
        else:
            assert m.teacher and m.student
            self.teacher_dir, self.student_dir = str(resolve_path(m.teacher)), str(resolve_path(m.student))
            tok_dir = str(resolve_path(m.tokenizer or m.student))
        if m.sft_checkpoint:
            self.student_dir = str(resolve_path(m.sft_checkpoint))
        self.tok = load_tokenizer(tok_dir)
        self.eos, self.pad = self.tok.eos_token_id, self.tok.pad_token_id
        examples = load_jsonl(resolve_path(cfg.data.train), limit=cfg.data.max_train_examples)
        items, _ = tokenize_examples(examples, self.tok, cfg.data.max_prompt_tokens, cfg.data.max_response_tokens)
        self.items: list[TokenizedExample] = items
        # the service draws MiniLLM's prompt batches this way (learner/recipe.py, minillm_phase)
        self.batches = iterate_batches(items, cfg.learner.batch_size, cfg.seed + 1)
        o = cfg.objective
        self.pretrain = (
            iterate_pretrain(
                load_pretrain_blocks(
                    resolve_path(cfg.data.pretrain), self.tok, cfg.data.pretrain_block_size, max_blocks=4096
                ),
                cfg.learner.pretrain_batch_size,
                cfg.seed,
            )
            if cfg.data.pretrain and o.pt_weight > 0
            else None
        )

    def next_prompts(self) -> list[list[int]]:
        return [it.prompt_ids for it in next(self.batches)]

    def next_pretrain(self) -> Tensor | None:
        return next(self.pretrain) if self.pretrain is not None else None


# ===== the single-process loop ======================================================================
@torch.no_grad()
def lockstep_sample(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    prompts: list[list[int]],
    max_new: int,
    alpha: float,
    temperature: float,
    eos: int,
    gen: torch.Generator,
) -> tuple[list[list[int]], list[list[float]]]:
    """Exact samples of alpha*p + (1-alpha)*q, one coin per position (drawn independently of the tokens): every
    step both models decode the last token of every sequence from their KV caches (left-padded batch). Returns
    the responses and q_old (the student's raw log-prob of each token). alpha = 0 runs the student alone."""
    width = max(len(p) for p in prompts)
    n = len(prompts)
    ids = torch.tensor([[eos] * (width - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    models = [student] + ([teacher] if teacher is not None and alpha > 0 else [])
    outs = [mod(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True) for mod in models]
    done = torch.zeros(n, dtype=torch.bool)
    responses: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list[float]] = [[] for _ in range(n)]
    for _ in range(max_new):
        logq = torch.log_softmax(outs[0].logits[:, -1].float(), -1)
        probs = torch.softmax(outs[0].logits[:, -1].float() / temperature, -1)
        if len(outs) > 1:
            coin = torch.rand(n, generator=gen) < alpha
            p = torch.softmax(outs[1].logits[:, -1].float() / temperature, -1)
            probs = torch.where(coin.unsqueeze(-1), p, probs)
        nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        lq = logq.gather(-1, nxt[:, None]).squeeze(-1)
        for i in (~done).nonzero().flatten().tolist():
            responses[i].append(int(nxt[i]))
            logprobs[i].append(float(lq[i]))
        done |= nxt == eos
        if done.all():
            break
        attn = torch.cat([attn, torch.ones(n, 1, dtype=attn.dtype)], 1)
        pos = pos[:, -1:] + 1
        outs = [
            mod(
                input_ids=nxt[:, None],
                attention_mask=attn,
                position_ids=pos,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
            for mod, out in zip(models, outs, strict=True)
        ]
    return responses, logprobs


@torch.no_grad()
def teacher_score(teacher: PreTrainedModel, packed: PackedRollouts) -> Tensor:
    """The teacher's log-probs [N, V] at the positions predicting real response tokens (row-major), as the
    service's teacher returns them (head and log-softmax only there)."""
    hidden = final_hidden_states(teacher, packed.input_ids, packed.attention_mask)
    flat = gather_positions(hidden, packed.predict_pos)[packed.mask > 0]
    head = teacher.get_output_embeddings()
    return torch.log_softmax(head(flat).float(), -1)


def learner_update(
    student: PreTrainedModel,
    opt: torch.optim.Optimizer,
    packed: PackedRollouts,
    teacher_logp: Tensor,
    pt_ids: Tensor | None,
    cfg: DistillConfig,
) -> dict[str, float]:
    """One MiniLLM update, the service's loss on one process: hidden states of every position, the head only at
    the response positions, per-token single + long terms (token-mean), plus pt_weight * L_PT."""
    o = cfg.objective
    student.train()
    opt.zero_grad(set_to_none=True)
    where = packed.mask > 0
    tokens, old = packed.tokens[where], packed.old_logprobs[where]
    teacher_y = teacher_logp.gather(-1, tokens[:, None]).squeeze(-1)
    reward = torch.zeros_like(packed.old_logprobs)
    reward[where] = teacher_y - old
    future = sequence_future_reward(reward, packed.mask, o.length_norm)[where]
    hidden = final_hidden_states(student, packed.input_ids, packed.attention_mask)
    flat = gather_positions(hidden, packed.predict_pos)[where]
    head = student.get_output_embeddings()
    ones = torch.ones(flat.shape[0])
    terms = minillm_token_losses(
        head(flat),
        teacher_logp,
        tokens,
        ones,
        old,
        o.alpha,
        o.clip_eps,
        teacher_token_logprobs=teacher_y,
        future_reward=future,
    )
    n = max(flat.shape[0], 1)
    loss = (o.single_weight * terms.single.sum() + o.long_weight * terms.long.sum()) / n
    if pt_ids is not None:
        logits = student(input_ids=pt_ids[:, :-1]).logits
        loss = loss + o.pt_weight * token_nll(logits, pt_ids[:, 1:], torch.ones(pt_ids[:, 1:].shape)).mean()
    loss.backward()
    if cfg.learner.grad_clip:
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.learner.grad_clip)
    opt.step()
    return {"loss": loss.item(), "reverse_kl": terms.kl.mean().item()}


def run_loop(cfg: DistillConfig, steps: int, skip: int) -> dict[str, object]:
    s = Setup(cfg)
    student = load_model(s.student_dir)
    teacher = load_model(s.teacher_dir).eval()
    decay = cfg.learner.weight_decay
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.learner.lr, weight_decay=decay, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    alpha, limit = cfg.objective.alpha, cfg.sampler.max_new_tokens
    rows = []
    for step in range(1, steps + 1):
        prompts, pt_ids = s.next_prompts(), s.next_pretrain()
        t0 = time.perf_counter()
        student.eval()
        responses, old = lockstep_sample(student, teacher, prompts, limit, alpha, cfg.sampler.temperature, s.eos, gen)
        t1 = time.perf_counter()
        packed = pack_sequences(prompts, responses, s.pad, old)
        teacher_logp = teacher_score(teacher, packed)
        t2 = time.perf_counter()
        m = learner_update(student, opt, packed, teacher_logp, pt_ids, cfg)
        t3 = time.perf_counter()
        row = {"step": step, "tokens": sum(len(r) for r in responses), "sample_s": t1 - t0, "score_s": t2 - t1}
        rows.append(row | {"update_s": t3 - t2, "step_s": t3 - t0, **m})
        print(f"[loop] step {step}: {rows[-1]['tokens']} tokens in {t3 - t0:.2f}s", file=sys.stderr, flush=True)
    kept = rows[skip:]
    wall = sum(r["step_s"] for r in kept)
    return {
        "arm": "loop",
        "tok_per_s": sum(r["tokens"] for r in kept) / wall,
        "step_s": statistics.median(r["step_s"] for r in kept),
        "stage_s": {k: statistics.median(r[f"{k}_s"] for r in kept) for k in ("sample", "score", "update")},
        "steps": rows,
    }


# ===== the service's stages, each alone ===============================================================
def run_stages(cfg: DistillConfig, steps: int, skip: int) -> dict[str, object]:
    """Sample, score, update and push one batch at a time with the service's classes, timing each alone."""
    import socket

    from actors.sampler import Sampler, sampler_spec
    from actors.teacher import Teacher
    from learner.worker import LearnerWorker

    s = Setup(cfg)
    c = cfg
    alpha = c.objective.alpha
    # the spec learner/recipe.py (start_actors) builds for the sampler actor
    sampler = Sampler(sampler_spec(c, s.student_dir, s.teacher_dir, s.eos, alpha))
    vocab = len(s.tok)
    how = {"batch_size": c.teacher.batch_size, "transport": c.teacher.transport, "top_k": c.teacher.top_k}
    how |= {"dtype": c.models.dtype, "chunk_tokens": c.learner.logit_chunk_tokens}
    teacher = Teacher(s.teacher_dir, vocab, s.pad, **how)
    with socket.socket() as sock:  # a free port for the learner's process group of one
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    learner = LearnerWorker(s.student_dir, c.learner, c.objective, vocab, 0, 1, address, c.models.dtype, c.seed)
    rows = []
    for step in range(1, steps + 1):
        prompts, pt_ids = s.next_prompts(), s.next_pretrain()
        t0 = time.perf_counter()
        rollouts = sampler.sample(prompts)
        t1 = time.perf_counter()
        _info, shard = teacher.score(rollouts, 1)
        t2 = time.perf_counter()
        m = learner.minillm_step(shard, alpha, pt_ids)
        t3 = time.perf_counter()
        sampler.load_weights(learner.full_state_dict() or {}, step)  # object_store push: gather + load
        t4 = time.perf_counter()
        row = {"step": step, "tokens": rollouts.num_tokens, "sample_s": t1 - t0, "score_s": t2 - t1}
        rows.append(row | {"update_s": t3 - t2, "learner_step_s": m["step_seconds"], "push_s": t4 - t3})
        print(f"[stages] step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items()), file=sys.stderr)
    kept = rows[skip:]
    tokens = statistics.median(r["tokens"] for r in kept)
    stage_s = {k: statistics.median(r[f"{k}_s"] for r in kept) for k in ("sample", "score", "update", "push")}
    return {
        "arm": "stages",
        "tokens_per_step": tokens,
        "stage_s": stage_s,
        # each stage's rate alone, in completion tokens/s at this batch
        "stage_tok_per_s": {k: tokens / v if v > 0 else math.inf for k, v in stage_s.items()},
        "steps": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["loop", "stages"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--skip", type=int, default=2, help="first steps left out of the medians (warm-up)")
    ap.add_argument("--threads", help="torch/OpenMP threads (read before torch loads)")
    ap.add_argument("overrides", nargs="*", help="key=value, as python -m learner.main takes them")
    args = ap.parse_intermixed_args()
    cfg = load_config(None, args.overrides)
    torch.manual_seed(cfg.seed)
    out = (run_loop if args.what == "loop" else run_stages)(cfg, args.steps, args.skip)
    out["threads"] = torch.get_num_threads()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
