"""Text as spans of LM tokens: documents from a source, split into training and validation by a
stable hash of their names, tokenized and cut into consecutive spans of ``span_tokens`` tokens.

Sources, all offline: ``pydoc`` (the topics of ``pydoc_data.topics``, English prose that ships
with every Python, one document per topic), ``arc`` (ARC grids written as text, one row of digits
per line, one document per grid; ARC-AGI-1's own training/evaluation split), or a folder of
``.txt`` files (one document each) and ``.jsonl`` files (one document per line, its ``text``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from pips.data.arc import is_evaluation_task, load_grids

TEXT_SOURCES = ("pydoc", "arc")


class TextError(ValueError):
    """A text source that cannot be read; the message names the file or the fix."""


def grid_text(grid: np.ndarray) -> str:
    """An ARC grid as text: one row of digits per line."""
    return "\n".join("".join(str(int(c)) for c in row) for row in grid)


def _split(documents: list[tuple[str, str]], split: str, val_fraction: float):
    return [
        (name, text)
        for name, text in documents
        if is_evaluation_task(name, val_fraction) == (split == "validation")
    ]


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise TextError(
            f"{file} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
            f"{error.start}); save it as UTF-8 or move it out of the folder"
        ) from None


def _folder_documents(root: Path) -> list[tuple[str, str]]:
    if not root.is_dir():
        raise TextError(
            f"text.source {root} is not pydoc, arc or a folder; give a folder of .txt or "
            f".jsonl files"
        )
    files = sorted([*root.rglob("*.txt"), *root.rglob("*.jsonl")])
    if not files:
        raise TextError(f"text folder {root} holds no .txt or .jsonl files")
    documents = []
    for file in files:
        name = file.relative_to(root).as_posix()
        if file.suffix == ".txt":
            documents.append((name, _read_text(file)))
            continue
        for number, line in enumerate(_read_text(file).splitlines()):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise TextError(
                    f"{file}, line {number + 1}: expected a JSON object with a 'text' field"
                ) from None
            if not isinstance(text, str):
                raise TextError(
                    f"{file}, line {number + 1}: 'text' is {json.dumps(text)[:40]}, not a "
                    f"string; give each line's text as a JSON string"
                )
            documents.append((f"{name}:{number}", text))
    return documents


def load_documents(source: str, split: str, val_fraction: float = 0.1) -> list[tuple[str, str]]:
    """(name, text) of the documents of ``source``'s ``split`` (training or validation), in a
    deterministic order."""
    if split not in ("training", "validation"):
        raise ValueError(f"split must be training or validation; got {split!r}")
    if source == "pydoc":
        from pydoc_data.topics import topics

        return _split(sorted(topics.items()), split, val_fraction)
    if source == "arc":
        records = load_grids("arc1", "training" if split == "training" else "evaluation")
        return [
            (f"{r.task_id}/{r.subset}{r.pair_index}/{r.role}", grid_text(r.grid)) for r in records
        ]
    return _split(_folder_documents(Path(source).expanduser()), split, val_fraction)


def token_ids(tokenizer, text: str) -> list[int]:
    """``text``'s token ids without special tokens (BOS/EOS), from a Hugging Face tokenizer or
    any object with ``encode(text)``."""
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:
        return list(tokenizer.encode(text))


def cut_spans(
    documents: list[tuple[str, str]], tokenizer, span_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive spans ``[S, span_tokens]`` of each document's tokens (a document's last,
    shorter piece is dropped), and each span's predecessor in its document (``[S]``, -1 for a
    document's first span): the overlap mode's context."""
    spans, previous = [], []
    for _, text in documents:
        ids = token_ids(tokenizer, text)
        count = len(ids) // span_tokens
        if count == 0:
            continue
        start = len(spans)
        spans.extend(
            np.asarray(ids[: count * span_tokens], dtype=np.int64).reshape(count, span_tokens)
        )
        previous.extend([-1, *range(start, start + count - 1)])
    if not spans:
        return np.zeros((0, span_tokens), dtype=np.int64), np.zeros((0,), dtype=np.int64)
    return np.stack(spans), np.asarray(previous, dtype=np.int64)


def documents_of(previous: np.ndarray) -> list[np.ndarray]:
    """The spans of each document in order (index arrays), from each span's predecessor
    (``cut_spans``'s second result, -1 where a document begins, in any order of the spans). A
    span whose predecessor is not among them (cut off by a limit on the spans) begins a
    document; documents come in the order of their first span."""
    previous = np.asarray(previous)
    count = len(previous)
    following = {int(p): i for i, p in enumerate(previous) if 0 <= p < count}
    documents = []
    for start in (i for i, p in enumerate(previous) if not 0 <= p < count):
        chain = [start]
        while chain[-1] in following:
            chain.append(following[chain[-1]])
        documents.append(np.asarray(chain, dtype=np.int64))
    return documents


def first_items(documents: list, limit: int | None) -> list[list]:
    """The documents' first ``limit`` items in order (None: all), whole documents first and the
    last one cut short; empty documents left out."""
    out, left = [], math.inf if limit is None else limit
    for document in documents:
        if left <= 0:
            break
        if len(document):
            out.append(list(document[: int(min(left, len(document)))]))
            left -= len(out[-1])
    return out


def shuffled(spans: np.ndarray, previous: np.ndarray, seed: int = 0):
    """``spans`` in a fixed random order, with ``previous`` renumbered to match: validation
    batches then hold spans of many documents, so that "another span's codes" (the batch rolled
    by one) are not the next span's of the same text, and a prefix of them spreads over the
    documents."""
    order = np.random.default_rng(seed).permutation(len(spans))
    where = np.empty(len(spans), dtype=np.int64)
    where[order] = np.arange(len(spans))
    renumbered = np.where(previous[order] >= 0, where[np.maximum(previous[order], 0)], -1)
    return spans[order], renumbered
