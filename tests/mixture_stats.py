"""The exactness statistic of teacher-mixed sampling (tests/integration/test_sampler.py, tests/gpu/smoke_scale.py):
each sampled token's randomized probability integral transform under the exact conditional alpha*p + (1-alpha)*q of
its prefix; under the right distribution these values are i.i.d. uniform on [0, 1), whatever the prefixes, segments
and stops, so a chi-square over equal bins tests every token of every sequence at once."""

import numpy as np
import torch
from scipy.stats import chisquare


@torch.no_grad()
def next_token_probs(
    model, prompts: list[list[int]], responses: list[list[int]], pad: int, vocab: int | None = None, rows: int = 64
) -> list[torch.Tensor]:
    """[len(response), V] next-token distribution (float64) at each response position of each sequence: HF forwards
    of `rows` right-padded sequences at a time; `vocab`: softmax over the first `vocab` rows only (padded
    embeddings)."""
    out: list[torch.Tensor] = []
    for at in range(0, len(responses), rows):
        part = list(zip(prompts[at : at + rows], responses[at : at + rows], strict=True))
        width = max(len(p) + len(r) for p, r in part)
        ids = torch.full((len(part), width), pad)
        attention = torch.zeros_like(ids)
        for b, (p, r) in enumerate(part):
            ids[b, : len(p) + len(r)] = torch.tensor(p + r)
            attention[b, : len(p) + len(r)] = 1
        logits = model(input_ids=ids, attention_mask=attention).logits
        out += [
            logits[b, len(p) - 1 : len(p) - 1 + len(r), :vocab].double().softmax(-1) for b, (p, r) in enumerate(part)
        ]
    return out


def pit_p_value(student_probs, teacher_probs, responses, alpha: float, bins: int = 10) -> float:
    """Chi-square p-value that the randomized PIT values of every token under alpha*p + (1-alpha)*q are uniform."""
    rng = np.random.default_rng(0)
    values = []
    for q, p, resp in zip(student_probs, teacher_probs, responses, strict=True):
        mix = (alpha * p + (1 - alpha) * q).numpy()
        cdf = np.cumsum(mix, axis=-1)
        for t, tok in enumerate(resp):
            below = cdf[t, tok] - mix[t, tok]
            values.append(below + rng.random() * mix[t, tok])
    counts = np.histogram(np.clip(values, 0, 1 - 1e-12), bins=bins, range=(0, 1))[0]
    return float(chisquare(counts).pvalue)
