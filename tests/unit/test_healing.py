import json

import pytest

from common.data import DataError, collate_prompt_response, text_documents
from common.healing import dolly_contexts, pack_blocks, split_documents


class CharTokenizer:
    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [1 + (ord(c) % 50) for c in text]


def test_dolly_contexts_keeps_distinct_nonempty_passages_in_order(tmp_path):
    f = tmp_path / "d.jsonl"
    rows = [
        {"instruction": "a", "context": "First passage.", "response": "never read"},
        {"instruction": "b", "context": "", "response": "x"},
        {"instruction": "c", "context": "  Second passage. ", "response": "y"},
        {"instruction": "d", "context": "First passage.", "response": "z"},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert dolly_contexts(f) == ["First passage.", "Second passage."]


def test_dolly_contexts_names_the_bad_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"context": "ok"}) + "\n{oops\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
        dolly_contexts(f)
    f.write_text(json.dumps({"context": 3}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'context' must be a string"):
        dolly_contexts(f)
    with pytest.raises(DataError, match="not found"):
        dolly_contexts(tmp_path / "missing.jsonl")


def test_text_documents_split_on_blank_lines(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("one\nline two\n\n\n  \n\nthree\n")
    assert text_documents(f) == ["one\nline two", "three"]


def test_split_is_disjoint_seeded_and_covers_every_document():
    docs = [f"doc {i}" for i in range(40)]
    train, held = split_documents(docs, 0.1, seed=0)
    assert len(held) == 4 and len(train) == 36
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(docs)
    assert split_documents(docs, 0.1, seed=0) == (train, held)
    assert split_documents(docs, 0.1, seed=1) != (train, held)
    # at least one document on each side
    assert [len(x) for x in split_documents(docs[:2], 0.9, seed=0)] == [1, 1]
    with pytest.raises(DataError, match="at least 2"):
        split_documents(docs[:1], 0.1, seed=0)


def test_blocks_are_the_eos_joined_stream_and_train_on_every_token_but_the_first():
    tok = CharTokenizer()
    docs = ["abcdef", "ghij"]
    stream = tok.encode("abcdef") + [0] + tok.encode("ghij") + [0]  # 12 tokens
    blocks = pack_blocks(docs, tok, 5)
    assert len(blocks) == 2  # the ragged tail (2 tokens) is dropped
    for k, b in enumerate(blocks):
        assert b.prompt_ids + b.response_ids == stream[5 * k : 5 * k + 5] and b.index == k
    batch = collate_prompt_response([(b.prompt_ids, b.response_ids) for b in blocks], pad_id=0)
    assert batch.loss_mask.tolist() == [[1.0] * 4, [1.0] * 4]  # targets: tokens 1..4 of each block
    assert len(pack_blocks(docs, tok, 5, max_blocks=1)) == 1
    assert pack_blocks(docs, tok, 50) == []
    with pytest.raises(DataError, match="at least 2"):
        pack_blocks(docs, tok, 1)
