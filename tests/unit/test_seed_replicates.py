"""learner/reports/replicates.py: per-run figures, means and spreads over training seeds, and same-seed pairs, on
hand-made evaluation files."""

import json

import pytest

from common.metrics import mean_and_spread
from learner.reports.replicates import main

REFS = ["cats sit on mats"]


def _eval(work, run, responses, rouge, rkl):
    """A `learner.evaluate` output pair: the --out json and the --samples lines (one seed, one example each)."""
    (work / "eval").mkdir(parents=True, exist_ok=True)
    result = {"rouge_l_mean": rouge, "reverse_kl_token": rkl, "forward_kl_token": 2.0, "lm_loss": 4.0}
    (work / "eval" / f"{run}.json").write_text(json.dumps({"datasets": {"d.jsonl": result}}))
    lines = [
        {"dataset": "d.jsonl", "seed": 10, "index": i, "references": REFS, "response": r, "tokens": len(r.split())}
        for i, r in enumerate(responses)
    ]
    (work / "eval" / f"{run}.samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_groups_and_same_seed_pairs(tmp_path, capsys):
    _eval(tmp_path, "sft", ["cats sit"], 10.0, 1.0)
    _eval(tmp_path, "a1", ["cats sit on mats"], 8.0, 0.5)  # whole reference: length-matched to 2 words, = base
    _eval(tmp_path, "a2", ["dogs sit on mats"], 6.0, 0.7)
    _eval(tmp_path, "b1", ["dogs sit"], 7.0, 1.2)
    _eval(tmp_path, "b2", ["dogs sit"], 9.0, 1.4)
    out = tmp_path / "r.json"
    argv = ["--work", str(tmp_path), "--group", "a=a1,a2", "--group", "b=b1,b2", "--pair", "a:b"]
    assert main([*argv, "--max-new-tokens", "4", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["groups"]["a"]["rouge_l"] == {"mean": 7.0, "std": 1.0}
    assert res["groups"]["b"]["reverse_kl_token"]["mean"] == pytest.approx(1.3)
    assert res["runs"]["a1"]["at_cap_pct"] == 100 and res["runs"]["b1"]["at_cap_pct"] == 0
    # against sft ("cats sit", F 2/3): a1 cut to "cats sit" ties, a2 "dogs sit" (F 1/3) trails by 100/3
    assert res["runs"]["a1"]["matched_vs_base"] == pytest.approx(0.0)
    assert res["runs"]["a2"]["matched_vs_base"] == pytest.approx(-100 / 3)
    # same-seed pairs: a1 ("cats sit") beats b1 ("dogs sit") by 100/3, a2 and b2 both "dogs sit" tie
    assert res["pairs"]["a:b"]["diffs"] == pytest.approx([100 / 3, 0.0])
    assert "a - b over 2 training seed(s): +16.67 ± 16.67" in capsys.readouterr().out


def test_unequal_pairs_and_missing_runs_fail_with_the_cause(tmp_path):
    _eval(tmp_path, "sft", ["cats sit"], 10.0, 1.0)
    _eval(tmp_path, "a1", ["cats"], 8.0, 0.5)
    with pytest.raises(SystemExit, match="same number of runs"):
        main(["--work", str(tmp_path), "--group", "a=a1", "--group", "b=a1,a1", "--pair", "a:b"])
    with pytest.raises(SystemExit, match="no .*missing.json"):
        main(["--work", str(tmp_path), "--group", "a=missing"])


def test_mean_spread_is_the_population_spread():
    assert mean_and_spread([1.0, 3.0]) == (2.0, 1.0)
    assert mean_and_spread([5.0]) == (5.0, 0.0)
