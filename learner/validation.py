"""In-run validation through the service's actors (not the offline `learner.evaluate` CLI): validation ROUGE-L and
the reverse KL to the teacher, both from responses sampled from the student alone (alpha = 0, temperature 1); the
validation loss of the student and of the teacher."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray

from common.config import DistillConfig
from common.data import Example, LMBatch, TokenizedExample, collate_prompt_response, strip_eos
from common.metrics import corpus_rouge_l
from common.resumable import EVAL, sampling_seed
from learner.group import LearnerGroup
from learner.run_log import RunLogger

if TYPE_CHECKING:
    from learner.actor_set import ActorSet
    from learner.weights import WeightPublisher

Split = tuple[list[Example], list[TokenizedExample]]


@dataclass(frozen=True)
class ValidationResult:
    rouge_l: float
    reverse_kl_seq: float  # per response: E_{y~q} sum_t KL[q(.|y<t) || p(.|y<t)]
    reverse_kl_token: float  # the same sum over all response tokens / number of tokens
    mean_response_tokens: float

    def as_dict(self, prefix: str = "eval_") -> dict[str, float]:
        return {
            f"{prefix}rouge_l": self.rouge_l,
            f"{prefix}reverse_kl_seq": self.reverse_kl_seq,
            f"{prefix}reverse_kl_token": self.reverse_kl_token,
            f"{prefix}response_tokens": self.mean_response_tokens,
        }


def validate(
    sampler: Any,
    teacher: Any,
    learner: LearnerGroup,
    tokenizer: Any,
    items: list[TokenizedExample],
    examples: list[Example],
    max_new_tokens: int,
    kl_items: list[TokenizedExample],
) -> ValidationResult:
    """ROUGE-L of student samples on `items` against their references, and the reverse KL on `kl_items`.

    One sampling call covers both. The KL is Rao-Blackwellised: at every position of the student's own samples the
    per-position KL[q || p] (exact over the vocabulary with a dense teacher) is added, student logits from the
    learner (same weights as the sampler at validation time), teacher log-probs sent by the teacher straight to the
    learner ranks. Its expectation is the sequence-level KL[q || p], with far less variance than
    log q(y) - log p(y) of single samples. The driver only sees token ids (to decode) and sums."""
    eos = tokenizer.eos_token_id
    prompts = [it.prompt_ids for it in items + kl_items]
    rollouts_ref = sampler.sample.remote(
        prompts, [it.index for it in items + kl_items], alpha=0.0, max_new_tokens=max_new_tokens
    )
    n = learner.n
    kl_rows = list(range(len(items), len(items) + len(kl_items)))
    _info, *shards = teacher.score.options(num_returns=1 + n).remote(rollouts_ref, n, kl_rows)
    kl_sum, tokens, seqs = learner.reverse_kl(shards)
    responses = ray.get(rollouts_ref).response_ids[: len(items)]
    texts = [tokenizer.decode(strip_eos(r, (eos,)), skip_special_tokens=True) for r in responses]
    # prompt-only rows (data.format=prompt without a response column) have no reference: ROUGE-L over the rest, NaN
    # when none has one (such runs select by reverse KL; preflight refuses rouge_l selection for them)
    scored = [
        (t, examples[it.index].references) for t, it in zip(texts, items, strict=True) if examples[it.index].references
    ]
    rouge = corpus_rouge_l([t for t, _ in scored], [r for _, r in scored]) if scored else float("nan")
    mean_len = sum(len(r) for r in responses) / max(len(items), 1)
    return ValidationResult(rouge, kl_sum / max(seqs, 1), kl_sum / max(tokens, 1.0), mean_len)


def lm_batch(items: list[TokenizedExample], pad_id: int) -> LMBatch:
    return collate_prompt_response([(it.prompt_ids, it.response_ids) for it in items], pad_id)


def _even_chunks(items: list[TokenizedExample], batch_size: int, n: int) -> list[list[TokenizedExample]]:
    """`items` in chunks of `batch_size`, each cut to a multiple of `n` rows (every learner rank scores an equal
    share); empty chunks left out."""
    chunks = [items[s : s + batch_size] for s in range(0, len(items), batch_size)]
    return [c[: (len(c) // n) * n] for c in chunks if len(c) >= n]


def valid_loss(learner: LearnerGroup, items: list[TokenizedExample], batch_size: int, pad_id: int) -> float:
    """Token-mean NLL of the validation responses (the rows that split evenly over the learner ranks)."""
    total = tokens = 0.0
    for chunk in _even_chunks(items, batch_size, learner.n):
        s, t = learner.eval_nll(lm_batch(chunk, pad_id))
        total, tokens = total + s, tokens + t
    return total / max(tokens, 1.0)


def teacher_valid_loss(teachers: list, items: list[TokenizedExample], batch_size: int, n: int, pad_id: int) -> float:
    """The teacher's token-mean NLL on the validation items, the same rows as valid_loss with `n` learner ranks."""
    refs = [
        teachers[k % len(teachers)].lm_nll.remote(lm_batch(chunk, pad_id))
        for k, chunk in enumerate(_even_chunks(items, batch_size, n))
    ]
    sums = ray.get(refs)
    return sum(s for s, _ in sums) / max(sum(t for _, t in sums), 1.0)


class Validator:
    """Validation as the recipe runs it: the held-out prompts drawn once, every evaluation with the same sampling
    seed, the results printed and logged."""

    def __init__(self, cfg: DistillConfig, actors: ActorSet, weights: WeightPublisher, log: RunLogger, valid: Split):
        self.cfg, self.actors, self.weights, self.log = cfg, actors, weights, log
        self.examples, self.items = valid
        held_out = list(self.items)
        random.Random(cfg.seed).shuffle(held_out)
        self.eval_items = held_out[: cfg.eval.num_prompts]
        n_kl = min(cfg.eval.kl_prompts, len(held_out))
        n_kl -= n_kl % cfg.learner.num_workers  # every learner rank scores an equal share
        self.kl_items = held_out[len(held_out) - n_kl :]

    def valid_loss(self) -> float:
        assert self.actors.learner is not None
        return valid_loss(
            self.actors.learner, self.items, self.cfg.learner.sft_batch_size, self.actors.tok.pad_token_id
        )

    def teacher_valid_loss(self) -> float:
        bs, n, pad = self.cfg.learner.sft_batch_size, self.cfg.learner.num_workers, self.actors.tok.pad_token_id
        return teacher_valid_loss(self.actors.teachers, self.items, bs, n, pad)

    def run(self, label: str, global_step: int) -> ValidationResult:
        """Validate the learner's weights (waiting until the samplers hold them) and log the result."""
        learner = self.actors.learner
        assert learner is not None
        self.weights.wait()  # the samplers must hold the learner's weights
        sampler, teacher = self.actors.samplers[0], self.actors.teachers[0]
        # every evaluation draws with the same seed (common random numbers): two checkpoints' scores differ by the
        # models, not by the draws, which is what selection compares; a resume draws the same too
        sampler.reseed.remote(sampling_seed(self.cfg.seed, EVAL, 0))
        t0 = time.time()
        tok, max_new = self.actors.tok, self.cfg.eval.max_new_tokens
        res = validate(sampler, teacher, learner, tok, self.eval_items, self.examples, max_new, self.kl_items)
        print(
            f"[eval] {label}: valid ROUGE-L {res.rouge_l:.2f}, reverse KL {res.reverse_kl_seq:.3f}/seq "
            f"({res.reverse_kl_token:.4f}/token), {res.mean_response_tokens:.1f} tokens "
            f"({time.time() - t0:.1f}s)",
            flush=True,
        )
        record = {"phase": "eval", "label": label, "global_step": global_step, "weight_version": self.weights.version}
        self.log.log({**record, **res.as_dict()})
        return res
