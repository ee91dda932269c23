"""common/rouge_calibration.py: constant-answer floors and length-matched ROUGE-L on hand-computed cases."""

import json

import pytest

from common.rouge_calibration import floors, length_matched, load_samples


def _row(seed, index, response, refs):
    return {
        "dataset": "d.jsonl",
        "seed": seed,
        "index": index,
        "prompt": "p",
        "references": refs,
        "response": response,
        "tokens": len(response.split()),
        "rouge_l": 0.0,
    }


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_samples(path)


def test_length_matched_cuts_each_pair_to_the_shorter_answer(tmp_path):
    refs = ["cats sit on mats"]
    base = _write(tmp_path / "a.jsonl", [_row(10, 0, "cats sit", refs)])
    # the longer answer matches the whole reference, but only its first two words count against a 2-word answer
    other = _write(tmp_path / "b.jsonl", [_row(10, 0, "dogs sit on mats", refs)])
    m = length_matched(base, other)
    # "cats sit" vs 4-word ref: LCS 2, P 1, R 1/2 -> F 2/3; "dogs sit": LCS 1, P 1/2, R 1/4 -> F 1/3
    assert m["pairs"] == 1
    assert m["base"] == pytest.approx(200 / 3) and m["other"] == pytest.approx(100 / 3)
    assert m["base_words"] == 2 and m["other_words"] == 4


def test_length_matched_needs_shared_examples(tmp_path):
    base = _write(tmp_path / "a.jsonl", [_row(10, 0, "x", ["y"])])
    other = _write(tmp_path / "b.jsonl", [_row(20, 0, "x", ["y"])])
    with pytest.raises(SystemExit, match="share no"):
        length_matched(base, other)


def test_floor_of_a_constant_answer(tmp_path):
    rows = _write(
        tmp_path / "a.jsonl", [_row(10, 0, "", ["the cat"]), _row(20, 0, "", ["the cat"]), _row(10, 1, "", ["a dog"])]
    )
    # "the" against "the cat": P 1, R 1/2 -> 66.7; against "a dog": 0; each example counted once across seeds
    assert floors(rows)["the"] == pytest.approx(100 / 3)


def test_bad_samples_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_row(10, 0, "x", ["y"])) + '\n{"seed": 1}\n')
    with pytest.raises(SystemExit, match="bad.jsonl:2"):
        load_samples(path)


def test_one_split_typed_two_ways_is_one_dataset_and_the_diff_spread_is_across_seeds(tmp_path):
    refs = ["cats sit on mats"]
    base_rows = [_row(s, 0, "cats sit", refs) for s in (10, 20)]
    other_rows = [_row(10, 0, "cats sit", refs), _row(20, 0, "dogs sit", refs)]
    for r in base_rows:
        r["dataset"] = "../data/test.jsonl"
    for r in other_rows:
        r["dataset"] = "/abs/data/test.jsonl"
    m = length_matched(_write(tmp_path / "a.jsonl", base_rows), _write(tmp_path / "b.jsonl", other_rows))
    assert m["pairs"] == 2 and m["seeds"] == 2
    # per-seed differences 0 and 100/3 - 200/3: their population std is half the gap
    assert m["diff_seed_std"] == pytest.approx(100 / 6)
