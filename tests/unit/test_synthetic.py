"""common/synthetic.py and common/synthetic_measures.py against brute force: the language, the tokenizer, exact
sequence log-probs, the sampler, the split (exact + Monte-Carlo) KL, precision, coverage and the exact fit, on spaces
small enough to enumerate."""

import itertools
import math
from collections import Counter

import pytest
import torch
import transformers
from scipy.stats import chisquare

from common.data import format_prompt, load_jsonl
from common.synthetic import (
    Language,
    LanguageSpec,
    build_language,
    build_tokenizer,
    fit_to_distribution,
    response_logprobs,
    sample_responses,
    tokenize_language,
    write_jsonl,
)
from common.synthetic_measures import (
    coverage,
    exact_precision,
    expected_coverage,
    ground_truth_fit,
    measure,
    precision,
    split_kl,
)
from tests.toy_models import next_token_probs

VOCAB, EOS, MAX_NEW = 4, 0, 3  # tokens 0..3, EOS = 0: at most 4^3 + ... sequences, enumerable
PROMPT = [2, 3, 1]


def _tiny_llama(seed: int, vocab: int = VOCAB, head_std: float = 1.0) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=32,
        bos_token_id=EOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).float()
    with torch.no_grad():  # peaked, distinct distributions rather than near-uniform ones
        model.lm_head.weight.normal_(0.0, head_std)
    return model.eval()


def _all_responses(vocab: int = VOCAB, max_new: int = MAX_NEW) -> list[list[int]]:
    """Every outcome of sampling with a cap: EOS-terminated sequences up to the cap, and unfinished ones at it."""
    out = []
    body = [t for t in range(vocab) if t != EOS]
    for n in range(max_new):
        out += [[*seq, EOS] for seq in itertools.product(body, repeat=n)]
    out += [list(seq) for seq in itertools.product(body, repeat=max_new)]
    return out


# ----- the language ---------------------------------------------------------------------------------------------


def test_language_is_a_distribution_with_modes_first():
    spec = LanguageSpec(num_topics=3, num_words=6, mode_probs=(0.5, 0.2), num_rare=10, rare_len=(2, 3))
    lang = build_language(spec)
    assert len(lang.topics) == 3 and len(set(lang.words)) == 6
    for t in lang.topics:
        assert math.isclose(sum(t.probs), 1.0)
        assert t.probs[:2] == (0.5, 0.2) and all(math.isclose(p, 0.03) for p in t.probs[2:])
        assert len(set(t.responses)) == len(t.responses) == 12  # a set: each response has one probability
        assert all(6 <= len(r.split()) <= 8 for r in t.modes)
        assert all(2 <= len(r.split()) <= 3 for r in t.responses[2:])
        assert all(w in lang.words for r in t.responses for w in r.split())
        assert t.prompt == format_prompt(t.instruction)
    assert build_language(spec) == lang  # a function of the spec
    assert Language.from_json(lang.to_json()) == lang


def test_bad_specs_are_refused():
    with pytest.raises(ValueError):
        LanguageSpec(mode_probs=(0.7, 0.4))
    with pytest.raises(ValueError):
        LanguageSpec(mode_probs=(0.5, 0.5), num_rare=3)  # rare responses with no mass left
    with pytest.raises(ValueError):
        LanguageSpec(num_topics=0)


def test_sampled_rows_follow_the_ground_truth(tmp_path):
    lang = build_language(LanguageSpec(num_topics=2, num_words=5, mode_probs=(0.6, 0.3), num_rare=2))
    rows = lang.sample_rows(4000, seed=3)
    examples = load_jsonl(write_jsonl(rows, tmp_path / "d.jsonl"))  # the project's loader reads them
    assert len(examples) == 8000
    for t in lang.topics:
        counts = Counter(ex.response for ex in examples if ex.instruction == t.instruction)
        observed = [counts[r] for r in t.responses]
        assert sum(observed) == 4000
        assert chisquare(observed, [4000 * p for p in t.probs]).pvalue > 1e-3


def test_tokenizer_wraps_prompts_in_four_tokens_and_round_trips_responses(tmp_path):
    lang = build_language(LanguageSpec(num_topics=3, num_rare=5))
    tok = build_tokenizer(lang)
    topics = tokenize_language(lang, tok)
    for t, ids in zip(lang.topics, topics, strict=True):
        assert len(ids.prompt) == 4  # wrapper head, "topic", the name, wrapper tail
        assert tok.decode(ids.prompt).replace(" ", "") == t.prompt.replace(" ", "")
        for text, r in zip(t.responses, ids.support, strict=True):
            assert r[-1] == tok.eos_token_id and tok.unk_token_id not in r
            assert tok.decode(r, skip_special_tokens=True) == text
    tok.save_pretrained(str(tmp_path / "tok"))
    again = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert again.encode(lang.topics[0].prompt, add_special_tokens=False) == topics[0].prompt


# ----- models as distributions ----------------------------------------------------------------------------------


def test_response_logprobs_match_a_token_by_token_forward():
    model = _tiny_llama(0)
    responses = [[1, 2, EOS], [3], [2, 2, 2], [EOS]]
    got = response_logprobs(model, PROMPT, responses, VOCAB, EOS, batch_size=3)
    for r, value in zip(responses, got.tolist(), strict=True):
        expect = sum(math.log(next_token_probs(model, PROMPT + r[:i])[tok]) for i, tok in enumerate(r))
        assert value == pytest.approx(expect, abs=1e-5)


def test_capped_responses_form_a_distribution():
    model = _tiny_llama(1)
    total = response_logprobs(model, PROMPT, _all_responses(), VOCAB, EOS).exp().sum()
    assert float(total) == pytest.approx(1.0, abs=1e-6)


def test_sampler_draws_the_model_distribution():
    model = _tiny_llama(2)
    space = _all_responses()
    probs = response_logprobs(model, PROMPT, space, VOCAB, EOS).exp()
    draws = sample_responses(model, PROMPT, 6000, MAX_NEW, EOS, VOCAB, torch.Generator().manual_seed(0))
    counts = Counter(tuple(d) for d in draws)
    assert set(counts) <= {tuple(s) for s in space}
    keep = probs * 6000 >= 5  # chi-square on the cells with enough expected counts, the rest pooled
    observed = [counts[tuple(s)] for s, k in zip(space, keep, strict=True) if k]
    expected = (probs[keep] * 6000).tolist()
    observed.append(6000 - sum(observed))
    expected.append(6000 - sum(expected))
    assert chisquare(observed, expected).pvalue > 1e-3
    again = sample_responses(model, PROMPT, 6000, MAX_NEW, EOS, VOCAB, torch.Generator().manual_seed(0))
    assert again == draws  # a fixed seed gives the same draws


# ----- measures -------------------------------------------------------------------------------------------------


def _kl_pair():
    a, b = _tiny_llama(3), _tiny_llama(4)
    space = _all_responses()
    la = response_logprobs(a, PROMPT, space, VOCAB, EOS)
    lb = response_logprobs(b, PROMPT, space, VOCAB, EOS)
    brute = float((la.exp() * (la - lb)).sum())
    return a, b, space, la, lb, brute


def test_split_kl_is_exact_when_the_support_is_everything():
    _, _, space, la, lb, brute = _kl_pair()
    est = split_kl(la, lb, la[:5], lb[:5], torch.ones(5, dtype=torch.bool))
    assert est.exact == pytest.approx(brute, rel=1e-9) and est.off_support == 0 and est.stderr == 0
    assert brute > 0.05  # the two models differ: the check is not 0 == 0


def test_split_kl_off_support_part_is_unbiased():
    a, b, space, la, lb, brute = _kl_pair()
    support = [i for i, s in enumerate(space) if len(s) <= 2]  # short responses exact, the rest sampled
    inside = {tuple(space[i]) for i in support}
    off_exact = sum(float(la[i].exp() * (la[i] - lb[i])) for i in range(len(space)) if tuple(space[i]) not in inside)
    assert off_exact > 0.01
    draws = sample_responses(a, PROMPT, 20000, MAX_NEW, EOS, VOCAB, torch.Generator().manual_seed(1))
    sa = response_logprobs(a, PROMPT, draws, VOCAB, EOS)
    sb = response_logprobs(b, PROMPT, draws, VOCAB, EOS)
    est = split_kl(la[support], lb[support], sa, sb, torch.tensor([tuple(d) in inside for d in draws]))
    assert est.exact + off_exact == pytest.approx(brute, rel=1e-9)
    assert abs(est.off_support - off_exact) < 4 * est.stderr
    assert abs(est.value - brute) < 4 * est.stderr


def test_precision_and_coverage_against_counting():
    logq = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    gt = [0.6, 0.2, 0.0005, 0.1]
    assert exact_precision(logq, gt, 1e-3) == pytest.approx(0.5 + 0.3 + 0.05)
    assert exact_precision(logq, gt, 0.15) == pytest.approx(0.8)
    assert precision(torch.tensor([0.5, 1e-4, 2e-3, 0.0]).log(), 1e-3) == 0.5
    modes = [[1, 0], [2, 0], [3, 0]]
    assert coverage([[1, 0], [1, 0], [3, 0], [4, 0]], modes) == pytest.approx(2 / 3)
    # E[coverage] by enumerating every pair of draws from a small categorical
    q = {(1, 0): 0.5, (2, 0): 0.1, (3, 0): 0.3, (4, 0): 0.1}
    brute = sum(q[x] * q[y] * coverage([list(x), list(y)], modes) for x in q for y in q)
    got = expected_coverage(torch.tensor([q[tuple(m)] for m in modes], dtype=torch.float64).log(), 2)
    assert got == pytest.approx(brute, rel=1e-12)


def test_fit_to_distribution_recovers_a_known_distribution_and_ground_truth_fit_measures_it():
    lang = build_language(
        LanguageSpec(num_topics=2, num_words=3, mode_probs=(0.6, 0.3), mode_len=(2, 2), num_rare=2, rare_len=(1, 2))
    )
    tok = build_tokenizer(lang)
    topics = tokenize_language(lang, tok)
    model = _tiny_llama(5, vocab=len(tok), head_std=0.02)
    before = ground_truth_fit(model, topics, len(tok), EOS)
    pairs = [(t.prompt, y) for t in topics for y in t.support]
    weights = [g for t in topics for g in t.gt_probs]
    losses = fit_to_distribution(model, pairs, weights, EOS, steps=150, lr=1e-2, log_every=0)
    after = ground_truth_fit(model, topics, len(tok), EOS)
    entropy = sum(-g * math.log(g) for t in topics for g in t.gt_probs) / len(topics)
    assert losses[-1] == pytest.approx(entropy + after["forward_kl_to_model"], abs=1e-3)  # CE = H + KL
    assert before["total_variation"] > 0.5 and after["total_variation"] < 0.05
    assert 0.9 < after["mode_ratio_min"] <= after["mode_ratio_max"] < 1.1
    # the total variation counts the model's mass off the support: brute force over every capped response
    t, ids = lang.topics[0], topics[0]
    space = _all_responses(vocab=len(tok), max_new=3)
    lm = response_logprobs(model, ids.prompt, space, len(tok), EOS).exp()
    g = {tuple(s): p for s, p in zip(ids.support, t.probs, strict=True)}
    tv0 = 0.5 * sum(abs(g.get(tuple(s), 0.0) - float(m)) for s, m in zip(space, lm, strict=True))
    one = ground_truth_fit(model, topics[:1], len(tok), EOS)["total_variation"]
    assert one == pytest.approx(tv0, abs=1e-6)  # responses here are at most 3 tokens: the space is complete


def test_measure_of_a_model_against_itself():
    lang = build_language(LanguageSpec(num_topics=2, num_words=4, num_rare=4, mode_len=(2, 3), rare_len=(1, 3)))
    tok = build_tokenizer(lang)
    topics = tokenize_language(lang, tok)
    model = _tiny_llama(6, vocab=len(tok))
    m = measure(model, model, topics, len(tok), EOS, samples_per_topic=64, coverage_samples=16, max_new_tokens=5)
    assert m["reverse_kl"] == pytest.approx(0, abs=1e-9) and m["forward_kl"] == pytest.approx(0, abs=1e-9)
    assert 0 <= m["precision_exact"] <= 1 and m["mode_mass"] + m["rare_mass"] == pytest.approx(
        m["teacher_support_mass"]
    )
    # rare coverage: the mean over rare responses of P(seen among 16 draws), from each one's exact probability
    rare = [
        1 - (1 - float(response_logprobs(model, t.prompt, [y], len(tok), EOS).exp())) ** 16
        for t in topics
        for y in t.support[t.num_modes :]
    ]
    assert m["rare_coverage_expected"] == pytest.approx(sum(rare) / len(rare), rel=1e-6)
    other = _tiny_llama(7, vocab=len(tok))
    m2 = measure(other, model, topics, len(tok), EOS, samples_per_topic=64, coverage_samples=16, max_new_tokens=5)
    assert m2["reverse_kl"] > 0.1 and m2["forward_kl"] > 0.1
