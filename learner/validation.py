"""In-run validation through the service's actors (not the offline `learner.evaluate` CLI): validation ROUGE-L and
the reverse KL to the teacher, both from responses sampled from the student alone (alpha = 0, temperature 1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray

from common.data import Example, TokenizedExample, strip_eos
from common.metrics import corpus_rouge_l
from learner.group import LearnerGroup


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
    rouge = corpus_rouge_l(texts, [examples[it.index].references for it in items])
    mean_len = sum(len(r) for r in responses) / max(len(items), 1)
    return ValidationResult(rouge, kl_sum / max(seqs, 1), kl_sum / max(tokens, 1.0), mean_len)
