"""Text spans from pydoc, ARC grids and folders, cut with a trivial character tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pips.data.text import (
    TextError,
    cut_spans,
    documents_of,
    grid_text,
    load_documents,
    shuffled,
)


class Characters:
    """A tokenizer of code points below 256 (the test's stand-in for an LM's)."""

    def encode(self, text: str) -> list[int]:
        return [min(ord(c), 255) for c in text]


def test_pydoc_topics_split_by_a_stable_hash_into_disjoint_sets():
    train = load_documents("pydoc", "training")
    val = load_documents("pydoc", "validation")
    assert len(train) + len(val) == 79 and val
    assert not {n for n, _ in train} & {n for n, _ in val}
    assert load_documents("pydoc", "validation") == val


def test_arc_grids_are_one_row_of_digits_per_line():
    assert grid_text(np.array([[0, 7], [3, 9]])) == "07\n39"
    train = load_documents("arc", "training")
    assert set(train[0][1]) <= set("0123456789\n")


def test_spans_are_consecutive_pieces_of_each_document_with_their_predecessor():
    documents = [("a", "abcdefghij"), ("b", "xy"), ("c", "0123456")]
    spans, previous = cut_spans(documents, Characters(), 3)
    text = ["".join(map(chr, row)) for row in spans]
    assert text == ["abc", "def", "ghi", "012", "345"]  # "b" is shorter than a span
    assert previous.tolist() == [-1, 0, 1, -1, 3]
    assert [d.tolist() for d in documents_of(previous)] == [[0, 1, 2], [3, 4]]
    assert [d.tolist() for d in documents_of(previous[:2])] == [[0, 1]]


def test_shuffled_spans_keep_their_documents():
    documents = [(str(i), "abcdefghijklmnopqrstuvwxyz"[: 3 * (i + 2)]) for i in range(6)]
    spans, previous = cut_spans(documents, Characters(), 3)
    mixed, renumbered = shuffled(spans, previous, seed=1)
    assert sorted(map(bytes, mixed.astype(np.uint8))) == sorted(map(bytes, spans.astype(np.uint8)))
    assert not np.array_equal(mixed, spans)
    text = lambda rows: ["".join(map(chr, rows[i])) for i in range(len(rows))]  # noqa: E731
    # each document's spans, followed through the renumbered predecessors, in their order
    before = sorted("".join(text(spans[d])) for d in documents_of(previous))
    after = sorted("".join(text(mixed[d])) for d in documents_of(renumbered))
    assert before == after
    # a prefix of the shuffled spans: a span whose predecessor is cut off begins a document
    cut = documents_of(renumbered[:7])
    assert sorted(int(i) for d in cut for i in d) == list(range(7))
    for document in cut:
        for a, b in zip(document[:-1], document[1:], strict=True):
            assert renumbered[b] == a


def test_a_folder_of_txt_and_jsonl_files(tmp_path):
    (tmp_path / "one.txt").write_text("hello world")
    (tmp_path / "two.jsonl").write_text(
        "\n".join(json.dumps({"text": f"line {i}"}) for i in range(40))
    )
    everything = load_documents(str(tmp_path), "training", 0.0)
    assert len(everything) == 41 and everything[0] == ("one.txt", "hello world")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(TextError, match="bad.jsonl, line 1"):
        load_documents(str(tmp_path), "training")
    with pytest.raises(TextError, match="not pydoc, arc or a folder"):
        load_documents(str(tmp_path / "missing"), "training")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("latin1.txt", "caf\xe9".encode("latin-1"), "latin1.txt is not UTF-8 text .byte 0xe9"),
        ("bytes.jsonl", b'{"text": "ok"}\n\xff\n', "bytes.jsonl is not UTF-8"),
        ("number.jsonl", b'{"text": "ok"}\n{"text": 5}\n', "number.jsonl, line 2: 'text' is 5"),
        ("list.jsonl", b'{"text": ["a"]}\n', "line 1: 'text' is .\"a\"., not a string"),
        ("array.jsonl", b'["text"]\n', "array.jsonl, line 1: expected a JSON object"),
    ],
)
def test_an_unreadable_file_in_a_folder_is_a_sentence_naming_it(tmp_path, name, content, message):
    (tmp_path / "fine.txt").write_text("hello world")
    (tmp_path / name).write_bytes(content)
    with pytest.raises(TextError, match=message):
        load_documents(str(tmp_path), "training", 0.0)
