"""The one reader of record files, behind data sources (data/sources.py) and fine-tuning examples
(data/examples.py): JSONL, JSON, CSV/TSV or Parquet (any of them .gz/.zst/.bz2), each record with the
reference a user finds it by: `file:line` for JSONL, CSV and the paragraphs of a .txt/.md file, `file:item N` for a JSON array,
`file:row N` for Parquet."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lmkiln.errors import UserError
from lmkiln.io import base_suffix, iter_jsonl, read_text, text_lines

TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
RECORD_SUFFIXES = TABLE_SUFFIXES + (".txt", ".md", ".conll")

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # a long reply or document is one field, not an error


@dataclass
class Document:
    """A text of the corpus the data stage builds."""

    id: str
    source: str
    group: str  # documents of one group land in the same split (a module, a file)
    text: str
    origin: str = ""  # the recipe's source entry it came from, for per-source statistics


def read_records(path: Path, on_bad: Callable[[str], None], column: str | None = None) -> Iterator[tuple[str, dict]]:
    """(reference, record) for each row; a row, or a file, that cannot be parsed is passed to `on_bad` as a
    message (which raises, or records it and goes on). With `column`, a CSV or Parquet file without that
    column is one such message, and Parquet reads that column alone."""
    kind = base_suffix(path)
    if kind == ".jsonl":
        for lineno, record in iter_jsonl(path, on_bad=on_bad):
            yield f"{path}:{lineno}", record
    elif kind == ".json":
        try:
            items = json.loads(read_text(path))
        except json.JSONDecodeError as exc:
            return on_bad(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})")
        if not isinstance(items, list):
            return on_bad(f"{path}: expected a JSON array of objects, got {type(items).__name__}")
        for i, item in enumerate(items, 1):
            if isinstance(item, dict):
                yield f"{path}:item {i}", item
            else:
                on_bad(f"{path}:item {i}: expected an object, got {type(item).__name__}")
    elif kind in (".csv", ".tsv"):
        reader = csv.DictReader((line for _, line in text_lines(path)), delimiter="\t" if kind == ".tsv" else ",")
        try:
            if column is not None and column not in (reader.fieldnames or []):
                return on_bad(f"{path}: no column '{column}' (columns: {', '.join(reader.fieldnames or [])})")
            for row in reader:
                if None in row or None in row.values():
                    on_bad(f"{path}:{reader.line_num}: expected {len(reader.fieldnames or [])} columns")
                    continue
                yield f"{path}:{reader.line_num}", row
        except csv.Error as exc:
            on_bad(f"{path}:{reader.line_num}: not valid CSV ({exc})")
    elif kind in (".txt", ".md"):  # a plain-text corpus: a {text} record per paragraph
        start, lines = 1, []
        for lineno, line in text_lines(path):
            if line.strip():
                start = start if lines else lineno
                lines.append(line)
            elif lines:
                yield f"{path}:{start}", {"text": "".join(lines).rstrip("\n")}
                lines = []
        if lines:
            yield f"{path}:{start}", {"text": "".join(lines).rstrip("\n")}
    elif kind == ".conll":  # a sentence per blank-line block: a word and its tag per line
        yield from _conll(path, on_bad)
    elif kind == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types for a broken file
            return on_bad(f"{path}: not a readable Parquet file ({exc})")
        names = table.schema_arrow.names
        if column is not None and column not in names:
            return on_bad(f"{path}: no column '{column}' (columns: {', '.join(names)})")
        row = 0
        for batch in table.iter_batches(columns=[column] if column is not None else None):
            for record in batch.to_pylist():
                row += 1
                yield f"{path}:row {row}", record
    else:
        raise UserError(f"{path}: expected one of {', '.join(RECORD_SUFFIXES)} (optionally compressed)")


def _conll(path: Path, on_bad: Callable[[str], None]) -> Iterator[tuple[str, dict]]:
    """{tokens, tags} per sentence of a CoNLL file: the first field of a line is the word, the last its tag
    (columns between, as CoNLL-2003's, are ignored); -DOCSTART- lines are skipped."""
    start, tokens, tags = 1, [], []
    for lineno, line in text_lines(path):
        fields = line.split()
        if fields and fields[0] != "-DOCSTART-":
            if len(fields) < 2:
                on_bad(f"{path}:{lineno}: expected a word and its tag")
                continue
            start = start if tokens else lineno
            tokens.append(fields[0])
            tags.append(fields[-1])
        elif tokens:
            yield f"{path}:{start}", {"tokens": tokens, "tags": tags}
            tokens, tags = [], []
    if tokens:
        yield f"{path}:{start}", {"tokens": tokens, "tags": tags}
