"""The embedded default end to end: `python -m learner.main` in a subprocess (local Ray, configs/tiny.yaml),
then its run folder, its students in transformers and vLLM, and the reverse KL going down."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.engine_env import IN_PROCESS_ENGINE

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_models):
    out = tmp_path_factory.mktemp("e2e") / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    proc = subprocess.run(
        [sys.executable, "-m", "learner.main", f"output_dir={out}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "[minillm] step 40/40" in proc.stdout  # progress lines
    return out


def test_run_folder_is_complete(run_dir):
    for name in ["config.yaml", "metrics.jsonl", "summary.json"]:
        assert (run_dir / name).is_file(), name
    for ckpt in ["sft_best", "best", "final"]:
        assert (run_dir / "checkpoints" / ckpt / "config.json").is_file(), ckpt
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["phase"] == "minillm"]
    assert len(steps) == 40 and [r["step"] for r in steps] == list(range(1, 41))
    for key in [
        "loss_single",
        "loss_long",
        "loss_pt",
        "reverse_kl",
        "mean_response_tokens",
        "rho_min",
        "rho_max",
        "sampler_tokens_per_s",
        "teacher_tokens_per_s",
        "learner_tokens_per_s",
        "queue_depth",
        "version_lag",
        "weight_version",
    ]:
        assert all(key in r for r in steps), key
    assert all(0 <= r["version_lag"] <= 1 for r in steps)
    assert any(r["phase"] == "sft" and "valid_loss" in r for r in records)


def test_each_phase_keeps_the_checkpoint_its_rule_names(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Phase 1 (learner.sft_init_select_by: valid_loss): the kept weights, measured again, have the lowest loss
    losses = {r["step"]: r["valid_loss"] for r in records if r["phase"] == "sft" and "valid_loss" in r}
    (kept,) = [r["kept_valid_loss"] for r in records if r["phase"] == "selection" and r["of"] == "sft"]
    assert kept == pytest.approx(min(losses.values()), rel=1e-6, abs=0)
    # Phase 2 (learner.minillm_select_by: rouge_l): a step is marked best exactly when it beats every earlier
    # evaluation, the start included
    best = next(r["eval_rouge_l"] for r in records if r.get("label") == "minillm-start")
    for r in records:
        if r["phase"] == "minillm" and "eval_rouge_l" in r:
            assert bool(r.get("best")) == (r["eval_rouge_l"] > best), r["step"]
            best = max(best, r["eval_rouge_l"])


def test_reverse_kl_goes_down(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    start, final = summary["start"], summary["final"]
    print(
        f"reverse KL on held-out prompts, SFT start -> after MiniLLM: per token {start['reverse_kl_token']:.4f} "
        f"-> {final['reverse_kl_token']:.4f}, per response {start['reverse_kl_seq']:.3f} -> "
        f"{final['reverse_kl_seq']:.3f} (mean length {start['response_tokens']:.1f} -> "
        f"{final['response_tokens']:.1f})"
    )
    # per token: responses also change length over training, which moves the per-response sum on its own
    assert final["reverse_kl_token"] < start["reverse_kl_token"]


def test_students_load_in_transformers_and_vllm(run_dir):
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "from actors.engine import VLLMEngine\n"
        "engines = []  # keep each engine alive: dropping one tears down state the next one shares\n"
        "for d in sys.argv[1:]:\n"
        "    tok = AutoTokenizer.from_pretrained(d)\n"
        "    m = AutoModelForCausalLM.from_pretrained(d)\n"
        "    ids = tok.encode('### Instruction:\\nName a colour.\\n\\n### Response:\\n')\n"
        "    hf = m(torch.tensor([ids])).logits[0].log_softmax(-1)\n"
        "    e = VLLMEngine(d, kv_cache_bytes=32 << 20, max_model_len=256)\n"
        "    engines.append(e)\n"
        "    lp = e.prompt_logprobs([ids], [1])[0]\n"
        "    ref = [hf[j - 1, ids[j]].item() for j in range(1, len(ids))]\n"
        "    assert max(abs(a - b) for a, b in zip(lp, ref)) < 1e-3, d\n"
        "print('ok')\n"
    )
    dirs = [str(run_dir / "checkpoints" / c) for c in ("best", "final")]
    proc = subprocess.run(
        [sys.executable, "-c", code, *dirs],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **IN_PROCESS_ENGINE},
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
