"""A synthetic instruction language whose response distribution is known exactly, with the tools to fit a model
to it and sample from one (issue 15: the paper's Figure 2, on sequences; the measures: common/synthetic_measures.py).

Each topic (one prompt) has a finite set of responses with known probabilities: a few dominant modes holding
most of the mass and many rare responses sharing the rest; every other token sequence has probability 0 (the
"void"). Because an autoregressive model's probability of a given response is one forward pass, every measure
here is exact on that finite support; only the part of a KL that lies off the support is estimated from
samples (unbiased, with its standard error), and it is reported apart so its size is visible.

A model's response distribution is over sequences of at most `max_new_tokens` tokens: a sequence that has not
produced EOS by then is one outcome (its prefix probability), exactly what a sampler with that cap draws.

No Ray: torch, the tokenizers library and the project's prompt wrapper only.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from common.data import PROMPT_NO_INPUT, collate_prompt_response, format_prompt

EOS = "<eos>"
UNK = "<unk>"
# topic names and content words are disjoint, so a topic's name never reads as part of a response
TOPIC_NAMES = (
    "amber birch cedar delta ember fjord garnet harbor indigo juniper kestrel lotus meadow nimbus onyx prism"
).split()
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclass(frozen=True)
class LanguageSpec:
    num_topics: int = 4
    num_words: int = 12  # content vocabulary of the responses
    mode_probs: tuple[float, ...] = (0.40, 0.25, 0.15)  # the dominant responses of every topic
    mode_len: tuple[int, int] = (6, 8)  # words, inclusive range (EOS comes on top)
    num_rare: int = 20  # rare responses per topic, sharing 1 - sum(mode_probs) equally
    rare_len: tuple[int, int] = (4, 8)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.num_topics <= len(TOPIC_NAMES):
            raise ValueError(f"num_topics must be in [1, {len(TOPIC_NAMES)}]")
        if not 2 <= self.num_words <= len(_CONSONANTS) * len(_VOWELS):
            raise ValueError("num_words out of range")
        mass = sum(self.mode_probs)
        if not self.mode_probs or any(p <= 0 for p in self.mode_probs) or mass > 1 + 1e-12:
            raise ValueError("mode_probs must be positive and sum to at most 1")
        if self.num_rare == 0 and abs(mass - 1) > 1e-9:
            raise ValueError("without rare responses the modes must hold all the mass")
        if self.num_rare > 0 and mass >= 1:
            raise ValueError("rare responses need some mass: sum(mode_probs) < 1")
        for lo, hi in (self.mode_len, self.rare_len):
            if not 1 <= lo <= hi:
                raise ValueError("length ranges must be 1 <= low <= high")


@dataclass(frozen=True)
class Topic:
    name: str
    responses: tuple[str, ...]  # space-separated content words; the first `num_modes` are the dominant modes
    probs: tuple[float, ...]  # ground-truth probability of each response given the prompt; sums to 1
    num_modes: int

    @property
    def instruction(self) -> str:
        return f"topic {self.name}"

    @property
    def prompt(self) -> str:
        return format_prompt(self.instruction)  # the project's Dolly wrapper, as every run applies it

    @property
    def modes(self) -> tuple[str, ...]:
        return self.responses[: self.num_modes]


@dataclass(frozen=True)
class Language:
    spec: LanguageSpec
    words: tuple[str, ...]
    topics: tuple[Topic, ...] = field(repr=False)

    def sample_rows(self, per_topic: int, seed: int) -> list[dict]:
        """Dolly-schema rows, `per_topic` ground-truth samples for every topic, topics interleaved."""
        rng = random.Random(seed)
        rows = []
        for _ in range(per_topic):
            for t in self.topics:
                response = rng.choices(t.responses, weights=t.probs)[0]
                rows.append({"instruction": t.instruction, "context": "", "response": response, "category": t.name})
        return rows

    def to_json(self) -> str:
        return json.dumps({"spec": asdict(self.spec), "words": self.words, "topics": [asdict(t) for t in self.topics]})

    @staticmethod
    def from_json(text: str) -> Language:
        raw = json.loads(text)
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in raw["spec"].items()}
        spec = LanguageSpec(**fields)  # JSON turns the tuples into lists
        topics = tuple(
            Topic(t["name"], tuple(t["responses"]), tuple(t["probs"]), t["num_modes"]) for t in raw["topics"]
        )
        return Language(spec, tuple(raw["words"]), topics)


def build_language(spec: LanguageSpec) -> Language:
    """Random responses over the content words; responses of one topic are distinct (the support is a set)."""
    rng = random.Random(spec.seed)
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    words = tuple(rng.sample(syllables, spec.num_words))
    rare_p = (1.0 - sum(spec.mode_probs)) / spec.num_rare if spec.num_rare else 0.0
    topics = []
    for name in TOPIC_NAMES[: spec.num_topics]:
        seen: set[str] = set()
        responses: list[str] = []
        for k in range(len(spec.mode_probs) + spec.num_rare):
            lo, hi = spec.mode_len if k < len(spec.mode_probs) else spec.rare_len
            while True:
                text = " ".join(rng.choices(words, k=rng.randint(lo, hi)))
                if text not in seen:
                    break
            seen.add(text)
            responses.append(text)
        probs = (*spec.mode_probs, *([rare_p] * spec.num_rare))
        topics.append(Topic(name, tuple(responses), probs, len(spec.mode_probs)))
    return Language(spec, words, tuple(topics))


def build_tokenizer(language: Language) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the instructions' and responses' words; EOS doubles as padding, as in the
    project's own tiny tokenizer. The Dolly wrapper's fixed text before and after the instruction is one added
    token each: it carries no information here, and the prompts shrink from 26 tokens to 4."""
    head, tail = PROMPT_NO_INPUT.split("{instruction}")
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for t in language.topics for text in (t.instruction, *t.responses) for w in text.split()})
    vocab = {EOS: 0, UNK: 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre
    tok.add_tokens([AddedToken(head, normalized=False), AddedToken(tail, normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=EOS, unk_token=UNK, model_max_length=256
    )


# ----- models as distributions over responses --------------------------------------------------------------


@torch.no_grad()
def response_logprobs(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    responses: Sequence[Sequence[int]],
    vocab_size: int,
    pad_id: int,
    batch_size: int = 1024,
) -> torch.Tensor:
    """log model(response | prompt) for each response (float64): the sum of its tokens' log-probs, EOS included
    when it ends with EOS. Padded embedding rows beyond `vocab_size` are not tokens and are dropped."""
    out = []
    for start in range(0, len(responses), batch_size):
        chunk = responses[start : start + batch_size]
        batch = collate_prompt_response([(prompt_ids, r) for r in chunk], pad_id)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1, :vocab_size]
        logp = torch.log_softmax(logits.double(), dim=-1)
        tok = logp.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
        out.append((tok * batch.loss_mask.double()).sum(-1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


@torch.no_grad()
def sample_responses(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    n: int,
    max_new_tokens: int,
    eos_id: int,
    vocab_size: int,
    generator: torch.Generator,
) -> list[list[int]]:
    """n ancestral samples at temperature 1 (EOS kept at the end of finished ones). Exact: each step is the
    model's full softmax over the vocabulary, recomputed from the whole prefix (these models are tiny)."""
    prompt = torch.tensor(list(prompt_ids), dtype=torch.long)
    seqs = prompt.repeat(n, 1)
    done = torch.zeros(n, dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits = model(input_ids=seqs).logits[:, -1, :vocab_size].double()
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)  # finished rows only carry padding
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        done |= nxt == eos_id
        if bool(done.all()):
            break
    out = []
    for row in seqs[:, len(prompt) :].tolist():
        cut = row.index(eos_id) + 1 if eos_id in row else len(row)
        out.append(row[:cut])
    return out


def fit_to_distribution(
    model: torch.nn.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    weights: Sequence[float],
    pad_id: int,
    steps: int,
    lr: float,
    log_every: int = 100,
    label: str = "fit",
) -> list[float]:
    """Minimise the exact cross-entropy sum_i w_i * -log model(y_i | x_i) over a whole finite support (one full
    batch per step, no sampling noise): with weights = ground-truth probabilities its minimum is the ground
    truth itself. Returns the loss per step."""
    batch = collate_prompt_response(list(pairs), pad_id)
    w = torch.tensor(list(weights), dtype=torch.float32)
    w = w / w.sum()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    losses = []
    for step in range(steps):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch.input_ids[:, 1:].reshape(-1), reduction="none"
        ).view_as(batch.loss_mask)
        loss = (w * (nll * batch.loss_mask).sum(-1)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            print(f"[{label}] step {step + 1}/{steps} cross-entropy {loss.item():.4f}", flush=True)
    model.eval()
    return losses


@dataclass(frozen=True)
class TopicIds:
    prompt: list[int]
    support: list[list[int]]  # every response of the topic, tokenised, EOS-terminated
    gt_probs: list[float]
    num_modes: int


def tokenize_language(language: Language, tokenizer) -> list[TopicIds]:
    eos = tokenizer.eos_token_id
    out = []
    for t in language.topics:
        prompt = tokenizer.encode(t.prompt, add_special_tokens=False)
        support = [tokenizer.encode(r, add_special_tokens=False) + [eos] for r in t.responses]
        out.append(TopicIds(prompt, support, list(t.probs), t.num_modes))
    return out


def write_jsonl(rows: Sequence[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
