"""Integration tests of actors.engine.VLLMEngine against the Hugging Face forward of the same tiny models.

Real vLLM (vllm-cpu 0.32 here), in-process. The engine is built once per module (start-up about 2 s after the
vLLM import, about 7 s).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")
transformers = pytest.importorskip("transformers")

from actors.engine import Continuation, VLLMEngine  # noqa: E402

pytestmark = pytest.mark.integration

VOCAB = 512
EOS = 2
TOL = 1e-4  # abs tolerance, float32 vLLM-cpu vs float32 HF (measured differences are ~1e-6)
KV = 64 << 20


def _build(path, seed: int, tied: bool = False) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=EOS,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).float()
    with torch.no_grad():  # a non-trivial distribution: logits with std ~2 instead of ~0.2
        model.lm_head.weight.normal_(0.0, 0.25)
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(0.0, 0.08)
    model.save_pretrained(str(path))
    return model.eval()


@torch.no_grad()
def _hf_logprobs(model, seq: list[int], start: int) -> list[float]:
    """log p(seq[j] | seq[:j]) for j >= start, teacher-forced."""
    ids = torch.tensor([seq])
    logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    return [logp[j - 1, seq[j]].item() for j in range(start, len(seq))]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_models")
    a = _build(root / "A", seed=0)
    b = _build(root / "B", seed=1)
    return {"A": (root / "A", a), "B": (root / "B", b)}


@pytest.fixture(scope="module")
def engine(models):
    return VLLMEngine(str(models["A"][0]), kv_cache_bytes=KV, seed=0, max_model_len=256)


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 12))] for _ in range(n)]


def _check_against_hf(model, prompts, outs, max_tokens=None):
    worst = 0.0
    for i, (p, c) in enumerate(zip(prompts, outs, strict=True)):
        assert isinstance(c, Continuation)
        assert len(c.logprobs) == len(c.token_ids)
        if max_tokens is not None:
            assert len(c.token_ids) <= max_tokens[i]
        if not c.token_ids:
            continue
        assert all(lp <= 0.0 and lp == lp and lp > -1e9 for lp in c.logprobs)
        ref = _hf_logprobs(model, p + c.token_ids, len(p))
        worst = max(worst, max(abs(x - y) for x, y in zip(c.logprobs, ref, strict=True)))
    assert worst < TOL, f"max |vLLM - HF| log-prob difference {worst:.2e}"
    return worst


def test_generate_lengths_and_logprobs_match_hf(engine, models):
    model_a = models["A"][1]
    prompts = _prompts(12, seed=1)
    max_tokens = [1, 2, 3, 5, 8, 13, 21, 0, 4, 30, 7, 16]
    outs = engine.generate(prompts, max_tokens)
    assert len(outs) == len(prompts)
    assert outs[7] == Continuation([], [], False, "")
    for c, m in zip(outs, max_tokens, strict=True):
        if c.finished_eos:
            assert c.token_ids[-1] == EOS and EOS not in c.token_ids[:-1]
        elif m > 0:
            assert len(c.token_ids) == m and c.finish_reason == "length"
            assert EOS not in c.token_ids
    assert sum(len(c.token_ids) for c in outs) > 20
    _check_against_hf(model_a, prompts, outs, max_tokens)

    # temperature changes the sampling, not the returned log-probs (raw model distribution at temperature 1)
    hot = engine.generate(prompts[:6], 12, temperature=0.5, ignore_eos=True)
    assert all(len(c.token_ids) == 12 and not c.finished_eos for c in hot)
    _check_against_hf(model_a, prompts[:6], hot)

    # an extra stop token ends the continuation on it
    first = outs[9].token_ids[0]
    stopped = engine.generate([prompts[9]] * 4, 30, stop_token_ids=[first], ignore_eos=True)
    for c in stopped:
        assert first not in c.token_ids[:-1]
        if c.token_ids[-1] == first:
            assert c.finished_eos and c.finish_reason == "stop"
        else:
            assert len(c.token_ids) == 30 and not c.finished_eos
    # numpy integers are accepted; a continuation stops early at max_model_len
    trunc = engine.generate([[5] * 250], np.int64(20), ignore_eos=True)[0]
    assert len(trunc.token_ids) == 256 - 250 and trunc.finish_reason == "length" and not trunc.finished_eos


def test_generate_rejects_bad_input(engine):
    with pytest.raises(ValueError):
        engine.generate([[1, 2, VOCAB]], 3)
    with pytest.raises(ValueError):
        engine.generate([[1, 2], [3]], [3])
    with pytest.raises(ValueError):
        engine.generate([[]], 3)


def test_prompt_logprobs_match_hf(engine, models):
    model_a = models["A"][1]
    seqs = _prompts(6, seed=2)
    seqs = [s + [5, 6, 7] for s in seqs]
    starts = [1, 2, len(seqs[2]) - 1, 1, 3, len(seqs[5])]
    got = engine.prompt_logprobs(seqs, starts)
    for s, st, g in zip(seqs, starts, got, strict=True):
        assert len(g) == len(s) - st
        ref = _hf_logprobs(model_a, s, st)
        assert max((abs(x - y) for x, y in zip(g, ref, strict=True)), default=0.0) < TOL


def _max_logprob_err(engine, seqs, model) -> float:
    """Largest gap between the engine's prompt log-probs (from position 1) and the HF model's."""
    got = engine.prompt_logprobs(seqs, [1] * len(seqs))
    return max(
        abs(x - y) for s, g in zip(seqs, got, strict=True) for x, y in zip(g, _hf_logprobs(model, s, 1), strict=True)
    )


def test_load_weights_switches_model_and_rejects_bad_pushes(engine, models):
    model_a, model_b = models["A"][1], models["B"][1]
    seqs = [s + [9, 10, 11, 12] for s in _prompts(4, seed=3)]

    def max_err(model):
        return _max_logprob_err(engine, seqs, model)

    assert max_err(model_a) < TOL
    try:
        engine.load_weights(model_b.state_dict())
        assert max_err(model_b) < TOL
        assert max_err(model_a) > 0.1  # really a different model
        # sampling uses the new weights too (and no stale prefix-cache KV from model A)
        prompts = _prompts(4, seed=4)
        _check_against_hf(model_b, prompts, engine.generate(prompts, 16))

        sd = dict(model_b.state_dict())
        bad_pushes = {
            "unknown name": {**sd, "model.layers.0.mlp.bogus.weight": torch.zeros(3)},
            "wrong shape": {**sd, "model.layers.0.mlp.down_proj.weight": torch.zeros(64, 64)},
            "missing tensor": {k: v for k, v in sd.items() if "q_proj" not in k},
            "integer tensor": {**sd, "model.norm.weight": torch.ones(64, dtype=torch.int64)},
        }
        for what, push in bad_pushes.items():
            with pytest.raises(ValueError):
                engine.load_weights(push)
            assert max_err(model_b) < TOL, f"a rejected push ({what}) changed the engine"

        # a list of (name, tensor) pairs works as well; back to model A
        engine.load_weights(list(model_a.state_dict().items()))
        assert max_err(model_a) < TOL
    finally:
        engine.load_weights(model_a.state_dict())


def test_failed_push_inside_vllm_marks_engine_broken_until_a_full_push(engine, models, monkeypatch):
    model_a = models["A"][1]
    sd = dict(model_a.state_dict())
    # bypass the checks so vLLM itself sees an unknown name (it fails half-way, leaving meta tensors)
    monkeypatch.setattr(engine, "_validated", lambda nt: list(nt.items()))
    with pytest.raises(RuntimeError, match="failed inside vLLM"):
        engine.load_weights({**sd, "model.bogus.weight": torch.zeros(3)})
    with pytest.raises(RuntimeError, match="undefined state"):
        engine.generate([[1, 2, 3]], 2)
    monkeypatch.undo()
    engine.load_weights(sd)
    seq = [3, 4, 5, 6, 7]
    got = engine.prompt_logprobs([seq], [1])[0]
    assert max(abs(x - y) for x, y in zip(got, _hf_logprobs(model_a, seq, 1), strict=True)) < TOL


@pytest.fixture(scope="module")
def engine32(models):
    """A second engine over model A with 32-token KV blocks (built before any engine of this module is deleted)."""
    return VLLMEngine(
        str(models["A"][0]), kv_cache_bytes=KV, seed=0, max_model_len=256, block_size=32, forced_tokens=True
    )


def test_sessions_continue_after_foreign_tokens(engine32, models):
    """A session keeps its KV between segments; the caller appends tokens it did not sample (as the other
    engine of a mixture does), across KV block boundaries, either prefilled or emitted as forced tokens. Every
    log-prob the session returns, forced tokens' included, must be the model's given the whole sequence before."""
    model_a = models["A"][1]
    assert engine32.block_size == 32 and engine32.forces_tokens
    rng = random.Random(6)
    seqs = {i: p for i, p in enumerate(_prompts(6, seed=6))}
    scored: dict[int, list[tuple[int, float]]] = {i: [] for i in seqs}  # (position, log-prob) the session gave
    want, forced = {}, dict.fromkeys(seqs, 0)
    for i, seq in seqs.items():
        want[i] = 1 + i % 4
        engine32.open_segment(i, seq, want[i], logprobs=i != 5)
    with pytest.raises(RuntimeError, match="sessions are open"):
        engine32.generate([[1, 2]], 1)
    with pytest.raises(RuntimeError, match="already generating"):
        engine32.open_segment(0, seqs[0], 1)
    segments = forced_tokens = 0
    while engine32.running_segments:
        for res in engine32.step_segments():
            i = res.key
            k = forced[i]
            assert len(res.token_ids) == want[i] or res.finished_eos
            assert res.token_ids[:k] == seqs[i][len(seqs[i]) - k :]  # the forced tokens come first
            assert len(res.logprobs) == (0 if i == 5 else len(res.token_ids))
            start = len(seqs[i]) - k
            scored[i] += [(start + j, lp) for j, lp in enumerate(res.logprobs)]
            seqs[i] = seqs[i] + res.token_ids[k:]
            segments += 1
            forced_tokens += k
            if not res.finished_eos and len(seqs[i]) < 150:
                foreign = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 40))]
                seqs[i] = seqs[i] + foreign
                forced[i] = min(len(foreign), 3) if segments % 2 else 0
                want[i] = forced[i] + rng.randint(1, 6)
                engine32.open_segment(i, seqs[i], want[i], logprobs=i != 5, forced=forced[i])
    with pytest.raises(ValueError, match="logprobs"):
        engine32.open_segment(5, seqs[5], 1, logprobs=True)  # fixed per session
    engine32.close_sessions()
    assert segments > 30 and forced_tokens > 20
    worst = 0.0
    for i, seq in seqs.items():
        ref = _hf_logprobs(model_a, seq, 1)  # ref[j - 1] = log p(seq[j] | seq[:j])
        worst = max([worst] + [abs(lp - ref[pos - 1]) for pos, lp in scored[i]])
    assert worst < TOL, f"max |session log-prob - HF| = {worst:.2e}"
    # closed: the engine serves plain calls again
    assert all(len(c.token_ids) == 2 for c in engine32.generate(_prompts(2, seed=7), 2, ignore_eos=True))


def test_bad_segments_are_refused_before_a_session_opens(engine, engine32):
    assert not engine.forces_tokens  # forcing is asked for at construction
    with pytest.raises(ValueError, match="cannot force"):
        engine.open_segment("a", [3, 4, 5], 2, forced=1)
    with pytest.raises(ValueError, match="max_model_len"):
        engine32.open_segment("b", [3] * 256, 2)
    with pytest.raises(ValueError, match="outside"):
        engine32.open_segment("c", [3, VOCAB], 2)
    assert engine.running_segments == engine32.running_segments == 0
    engine.generate([[3, 4]], 1)  # no session was left open
    engine32.generate([[3, 4]], 1)


def test_engine_seed_and_reseed_make_sampling_reproducible(engine, models):
    prompts = _prompts(8, seed=5)
    # same seed, two fresh engines: same samples (the engine seed seeds the process-global torch RNG at
    # start-up; in-process every engine and torch op in the process shares that RNG)
    e1 = VLLMEngine(str(models["A"][0]), kv_cache_bytes=KV, seed=123, max_model_len=256)
    out1 = e1.generate(prompts, 16, ignore_eos=True)
    e2 = VLLMEngine(str(models["A"][0]), kv_cache_bytes=KV, seed=123, max_model_len=256)
    out2 = e2.generate(prompts, 16, ignore_eos=True)
    assert [c.token_ids for c in out1] == [c.token_ids for c in out2]

    # reseed: the same engine repeats itself; another seed differs
    def run(seed):
        engine.reseed(seed)
        return [c.token_ids for c in engine.generate(prompts, 16, ignore_eos=True)]

    assert run(7) == run(7)
    assert run(7) != run(8)
    del e1, e2


@pytest.fixture(scope="module")
def tied_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied_models")
    return {k: (root / k, _build(root / k, seed=s, tied=True)) for k, s in (("A", 2), ("B", 3))}


def test_push_into_a_tied_head_model_reaches_the_head(tied_models):
    """SmolLM2-style tied embeddings: the LM head has no weight of its own in the checkpoint. vLLM-cpu packs the
    head at load time, so a push must repack it too, or the engine keeps sampling from the first model's head
    with the pushed body."""
    (dir_a, model_a), (_, model_b) = tied_models["A"], tied_models["B"]
    assert model_b.lm_head.weight.data_ptr() == model_b.model.embed_tokens.weight.data_ptr()
    engine = VLLMEngine(str(dir_a), kv_cache_bytes=KV, seed=0, max_model_len=256)
    seqs = [s + [9, 10, 11, 12] for s in _prompts(4, seed=5)]

    def max_err(model):
        return _max_logprob_err(engine, seqs, model)

    assert max_err(model_a) < TOL
    engine.load_weights(model_b.state_dict())
    assert max_err(model_a) > 0.1
    assert max_err(model_b) < TOL
    prompts = _prompts(4, seed=6)
    _check_against_hf(model_b, prompts, engine.generate(prompts, 16))
