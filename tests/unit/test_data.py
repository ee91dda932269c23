import json

import pytest
import torch

from common.data import (
    DataError,
    Example,
    collate_prompt_response,
    format_prompt,
    iterate_batches,
    load_jsonl,
    load_pretrain_blocks,
    strip_eos,
    tokenize_examples,
)


class CharTokenizer:
    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [1 + (ord(c) % 50) for c in text]


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def test_prompt_wrapper_with_and_without_input():
    assert format_prompt("Do X.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nDo X.\n\n### Response:\n"
    )
    with_input = format_prompt("Do X.", "ctx")
    assert "paired with an input" in with_input and "### Input:\nctx\n\n### Response:\n" in with_input


def test_load_jsonl_handles_reference_lists(tmp_path):
    f = tmp_path / "d.jsonl"
    _write(
        f,
        [
            {"instruction": "a", "context": "", "response": "b", "category": "qa"},
            {"instruction": "c", "context": "d", "response": ["e", "f"]},
        ],
    )
    exs = load_jsonl(f)
    assert exs[0].references == ("b",) and exs[1].references == ("e", "f") and exs[1].response == "e"


@pytest.mark.parametrize(
    "bad,why",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"context": "", "response": "x"}), "'instruction'"),
        (json.dumps({"instruction": "a", "response": 3}), "'response'"),
        (json.dumps([1, 2]), "JSON object"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad, why):
    f = tmp_path / "d.jsonl"
    _write(f, [{"instruction": "a", "context": "", "response": "b"}, bad])
    with pytest.raises(DataError, match=rf"d\.jsonl:2: .*{why}"):
        load_jsonl(f)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_jsonl(tmp_path / "none.jsonl")


def test_filtering_counts_drops():
    exs = [Example("short", "", ("ok",)), Example("x" * 500, "", ("ok",)), Example("short", "", ("y" * 100,))]
    kept, report = tokenize_examples(exs, CharTokenizer(), max_prompt_tokens=200, max_response_tokens=20)
    assert report.kept == 1 and report.dropped_prompt == 1 and report.dropped_response == 1
    assert kept[0].response_ids[-1] == 0 and kept[0].index == 0


def test_collate_masks_only_response_targets():
    batch = collate_prompt_response([([5, 6], [7, 0]), ([5], [8, 9, 0])], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 0], [5, 8, 9, 0]]
    # loss_mask[t] marks input_ids[t+1] as a target
    assert batch.loss_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    batch = collate_prompt_response([([5, 6, 4], [7, 0]), ([5], [8])], pad_id=0)
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch.loss_mask.tolist() == [[0, 0, 1, 1], [1, 0, 0, 0]]


def test_batches_are_deterministic_and_cover_epoch():
    items = list(range(10))
    a = list(iterate_batches(items, 3, seed=7, epochs=2))
    b = list(iterate_batches(items, 3, seed=7, epochs=2))
    assert a == b and len(a) == 6
    assert len(set(x for batch in a[:3] for x in batch)) == 9
    assert a[:3] != a[3:]


def test_pretrain_blocks(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello world\n\nsecond doc here\n\n")
    blocks = load_pretrain_blocks(f, CharTokenizer(), block_size=8)
    assert blocks.shape == (3, 8) and blocks.dtype == torch.long
    assert 0 in blocks.flatten().tolist()  # documents are joined with EOS
    with pytest.raises(DataError, match="fewer than"):
        load_pretrain_blocks(f, CharTokenizer(), block_size=1000)


def test_non_utf8_line_and_byte_order_mark(tmp_path):
    f = tmp_path / "d.jsonl"
    good = json.dumps({"instruction": "a", "response": "b"}).encode()
    f.write_bytes(good + b"\n" + good.replace(b'"b"', b'"caf\xe9"') + b"\n")  # latin-1 e-acute
    with pytest.raises(DataError, match=r"d\.jsonl:2: not UTF-8 text \(byte 0xe9"):
        load_jsonl(f)
    f.write_bytes(b"\xef\xbb\xbf" + good + b"\n")  # what some editors write first: still one valid example
    assert load_jsonl(f)[0].response == "b"


def test_strip_eos_drops_only_a_final_stop_token():
    assert strip_eos([5, 6, 2], {2, 3}) == [5, 6] and strip_eos([5, 2, 6], {2}) == [5, 2, 6]
    assert strip_eos([], {2}) == [] and strip_eos([3], (3,)) == []
