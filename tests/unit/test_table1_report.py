"""learner/reports/table1.py: ROUGE-L by reference length, the share of answers at the cap, and named tables that
leave each other's text in docs/results.md alone."""

import json

from learner.reports.table1 import at_cap_share, by_reference_length, markers, write_report


def _row(index, ref_words, rouge, tokens):
    return {"references": [" ".join(["w"] * ref_words)], "rouge_l": rouge, "tokens": tokens, "index": index}


def test_rouge_by_reference_length_buckets_and_means():
    rows = {
        ("d", 10, 0): _row(0, 3, 10.0, 5),  # 1-15
        ("d", 10, 1): _row(1, 15, 20.0, 5),  # 1-15 (bounds inclusive)
        ("d", 10, 2): _row(2, 16, 30.0, 5),  # 16-40
        ("d", 10, 3): _row(3, 81, 40.0, 5),  # >80
    }
    assert by_reference_length({"sft": rows}) == {"sft": {"1-15": 15.0, "16-40": 30.0, ">80": 40.0}}


def test_at_cap_share_counts_responses_that_reached_the_cap():
    rows = {("d", 10, i): _row(i, 5, 0.0, tokens) for i, tokens in enumerate([128, 12, 128, 127])}
    assert at_cap_share({"m": rows}, 128) == {"m": 50.0}


def test_named_tables_fill_their_own_markers(tmp_path):
    docs, work = tmp_path / "docs", tmp_path / "work"
    docs.mkdir()
    (work / "eval").mkdir(parents=True)
    old_begin, old_end = markers("table1")
    new_begin, new_end = markers("table1-healed")
    text = f"# R\n{old_begin}\nOLD TABLE\n{old_end}\nprose\n{new_begin}\n{new_end}\ntail\n"
    (docs / "results.md").write_text(text)
    per_seed = {"10": {"rouge_l": 5.0, "dist_4": 99.0, "mean_tokens": 64.0}}
    result = {"rouge_l_mean": 5.0, "rouge_l_std": 0.0, "dist_4_mean": 99.0, "lm_loss": 3.0}
    result.update(per_seed=per_seed, n_prompts=2)
    (work / "eval" / "sft.json").write_text(json.dumps({"datasets": {"test": result}}))
    sample = {"dataset": "t", "seed": 10, "index": 0, "prompt": "p", "references": ["a b c"], "response": "a b"}
    (work / "eval" / "sft.samples.jsonl").write_text(json.dumps({**sample, "tokens": 128, "rouge_l": 80.0}) + "\n")
    write_report(work, {}, docs, test_limit=2, config="c.yaml", extra=[], name="table1-healed", max_new_tokens=128)
    out = (docs / "results.md").read_text()
    assert "OLD TABLE" in out and out.endswith("tail\n") and "prose" in out
    table = out.split(new_begin)[1].split(new_end)[0]
    assert "| SFT w/o KD | 5.00 ± 0.00 |" in table and "128 new tokens" in table
    assert "| 100 |" in table  # the one response reached the cap
    assert json.loads((docs / "table1-healed.json").read_text())["rouge_l_by_reference_words"] == {
        "sft": {"1-15": 80.0}
    }
    assert not (docs / "results.json").exists()  # the default table's files are left alone
