"""Prompt-only data with a chat-template tokenizer runs MiniLLM end to end (no SFT phase, no reference responses in
training), prompts rendered by the tokenizer's chat template; the handed-out student keeps that template, its special
tokens and the generation settings, and chats in transformers and in a vLLM engine."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.models import load_tokenizer
from tests.bad_inputs import build_setup
from tests.unit.test_formats import CHAT_TEMPLATE

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]


def _prompt_rows(start: int, n: int, with_response: bool) -> list[dict]:
    rows = [{"prompt": f"Name a colour for item {i}."} for i in range(start, start + n)]
    return [{**r, "response": f"Item {start + k} is blue."} if with_response else r for k, r in enumerate(rows)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    setup = build_setup(root / "setup")  # toy teacher and student, a BPE tokenizer trained on these prompts
    tok = load_tokenizer(setup.tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(root / "tokenizer"))
    gen = {"eos_token_id": tok.eos_token_id, "do_sample": True, "temperature": 0.7, "max_new_tokens": 24}
    (root / "tokenizer" / "generation_config.json").write_text(json.dumps(gen))
    for name, start, n, refs in (("train", 0, 32, False), ("valid", 100, 8, True)):
        rows = _prompt_rows(start, n, refs)
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "learner.main",
            f"output_dir={out}",
            "models.source=local",
            f"models.teacher={setup.teacher}",
            f"models.student={setup.student}",
            f"models.tokenizer={root / 'tokenizer'}",
            "data.format=prompt",
            f"data.train={root / 'train.jsonl'}",
            f"data.valid={root / 'valid.jsonl'}",
            "learner.sft_steps=0",
            "learner.minillm_steps=2",
            "eval.every_steps=2",
            "eval.num_prompts=4",
            "eval.kl_prompts=4",
            "eval.max_new_tokens=8",
            "sampler.max_new_tokens=8",
        ],
        cwd=ROOT,
        env={**env, "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "(prompt data, chat template)" in proc.stdout
    return out, tok


def test_prompt_data_runs_minillm(run):
    out, _ = run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["phase"] == "minillm"]
    assert [r["step"] for r in steps] == [1, 2]
    assert not any(r["phase"] == "sft" for r in records)
    # the learner scores each sampled response under the prompt ids the sampler continued: before the first update
    # its log-probs of the sampled tokens are the sampler's (a prompt rendered differently would move them by far more)
    print("logprob gap sampler vs learner, step 1:", steps[0]["logprob_gap_mean"], steps[0]["logprob_gap_max"])
    assert steps[0]["logprob_gap_max"] < 1e-2
    assert json.loads((out / "summary.json").read_text())["final"] is not None


def test_final_keeps_template_tokens_and_generation_settings(run):
    out, tok = run
    final = out / "checkpoints" / "final"
    saved = load_tokenizer(final)
    assert saved.chat_template == CHAT_TEMPLATE
    assert saved.eos_token == tok.eos_token and saved.get_vocab() == tok.get_vocab()
    gen = json.loads((final / "generation_config.json").read_text())
    assert gen["temperature"] == 0.7 and gen["eos_token_id"] == tok.eos_token_id and gen["max_new_tokens"] == 24


def test_final_chats_in_transformers_and_vllm(run):
    out, _ = run
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "from actors.engine import VLLMEngine\n"
        "d = sys.argv[1]\n"
        "tok = AutoTokenizer.from_pretrained(d)\n"
        "model = AutoModelForCausalLM.from_pretrained(d)\n"
        "msgs = [{'role': 'user', 'content': 'Name a colour.'}]\n"
        "ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors='pt', return_dict=True)\n"
        "gen = model.generate(**ids, max_new_tokens=8)\n"
        "assert gen.shape[1] > ids['input_ids'].shape[1]\n"
        "prompt = ids['input_ids'][0].tolist()\n"
        "e = VLLMEngine(d, kv_cache_bytes=32 << 20, max_model_len=256)\n"
        "outs = e.generate([prompt], 8, temperature=1.0)\n"
        "assert len(outs[0].token_ids) > 0\n"
        "print('ok', tok.decode(gen[0, len(prompt):]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(out / "checkpoints" / "final")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
