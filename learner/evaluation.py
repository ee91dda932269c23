"""In-run evaluation through the service's actors: validation ROUGE-L and the reverse KL to the teacher,
both from responses sampled from the student alone (alpha = 0, temperature 1)."""

from __future__ import annotations

from dataclasses import dataclass

import ray

from common.data import Example, TokenizedExample
from common.metrics import corpus_rouge_l, sequence_kl_estimate


@dataclass(frozen=True)
class EvalResult:
    rouge_l: float
    reverse_kl_seq: float  # per sequence: E_q[log q(y) - log p(y)]
    reverse_kl_token: float  # the same summed over tokens / number of tokens
    mean_response_tokens: float

    def as_dict(self, prefix: str = "eval_") -> dict[str, float]:
        return {f"{prefix}rouge_l": self.rouge_l, f"{prefix}reverse_kl_seq": self.reverse_kl_seq,
                f"{prefix}reverse_kl_token": self.reverse_kl_token,
                f"{prefix}response_tokens": self.mean_response_tokens}


def _strip_eos(ids: list[int], eos: int) -> list[int]:
    return ids[:-1] if ids and ids[-1] == eos else ids


def evaluate_student(sampler, teacher, tokenizer, items: list[TokenizedExample], examples: list[Example],
                     max_new_tokens: int, kl_items: list[TokenizedExample] | None = None) -> EvalResult:
    """ROUGE-L of student samples on `items` against their references; reverse KL on `kl_items`
    (default: the same prompts) scored by the teacher actor."""
    eos = tokenizer.eos_token_id
    rollouts = ray.get(sampler.sample.remote([it.prompt_ids for it in items], [it.index for it in items],
                                             alpha=0.0, max_new_tokens=max_new_tokens))
    texts = [tokenizer.decode(_strip_eos(r, eos), skip_special_tokens=True) for r in rollouts.response_ids]
    refs = [examples[it.index].references for it in items]
    rouge = corpus_rouge_l(texts, refs)
    if kl_items is not None:
        kl_rollouts = ray.get(sampler.sample.remote([it.prompt_ids for it in kl_items],
                                                    [it.index for it in kl_items], alpha=0.0,
                                                    max_new_tokens=max_new_tokens))
    else:
        kl_rollouts = rollouts
    scores = ray.get(teacher.score.remote(kl_rollouts))
    teacher_lps = [scores.token_logprobs[b, : len(r)].tolist() for b, r in enumerate(kl_rollouts.response_ids)]
    kl_seq, kl_tok = sequence_kl_estimate(kl_rollouts.old_logprobs, teacher_lps)
    mean_len = sum(len(r) for r in rollouts.response_ids) / max(len(rollouts), 1)
    return EvalResult(rouge, kl_seq, kl_tok, mean_len)
