"""In-run evaluation through the service's actors: validation ROUGE-L and the reverse KL to the teacher,
both from responses sampled from the student alone (alpha = 0, temperature 1)."""

from __future__ import annotations

from dataclasses import dataclass

import ray

from common.data import Example, TokenizedExample
from common.metrics import corpus_rouge_l
from common.rollout import pack_rollouts


@dataclass(frozen=True)
class EvalResult:
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


def _strip_eos(ids: list[int], eos: int) -> list[int]:
    return ids[:-1] if ids and ids[-1] == eos else ids


def evaluate_student(
    sampler,
    teacher,
    group,
    tokenizer,
    items: list[TokenizedExample],
    examples: list[Example],
    max_new_tokens: int,
    kl_items: list[TokenizedExample],
    vocab_size: int,
) -> EvalResult:
    """ROUGE-L of student samples on `items` against their references, and the reverse KL on `kl_items`.

    The KL is Rao-Blackwellised: responses are sampled from the student, and at every position the exact
    KL[q || p] over the whole vocabulary is added (student logits from the learner, which holds the same
    weights as the sampler at evaluation time; teacher log-probs from a teacher actor). Its expectation is
    the sequence-level KL[q || p], with far less variance than log q(y) - log p(y) of single samples."""
    eos = tokenizer.eos_token_id
    prompts = [it.prompt_ids for it in items]
    kl_prompts = [it.prompt_ids for it in kl_items]
    rollouts = ray.get(
        sampler.sample.remote(
            prompts + kl_prompts, [it.index for it in items + kl_items], alpha=0.0, max_new_tokens=max_new_tokens
        )
    )
    texts = [
        tokenizer.decode(_strip_eos(r, eos), skip_special_tokens=True) for r in rollouts.response_ids[: len(items)]
    ]
    rouge = corpus_rouge_l(texts, [examples[it.index].references for it in items])
    kl_rollouts = rollouts.select(list(range(len(items), len(items) + len(kl_items))))
    scores = ray.get(teacher.score.remote(kl_rollouts))
    kl_sum, tokens, seqs = group.reverse_kl(
        pack_rollouts(kl_rollouts, tokenizer.pad_token_id), scores.dense(vocab_size)
    )
    mean_len = sum(len(r) for r in rollouts.response_ids[: len(items)]) / max(len(items), 1)
    return EvalResult(rouge, kl_sum / max(seqs, 1), kl_sum / max(tokens, 1.0), mean_len)
