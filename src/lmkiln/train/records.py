"""Fine-tuning records from JSONL, JSON, CSV/TSV or Parquet (any of them .gz/.zst/.bz2), each with the
reference a user finds it by: `file:line` for JSONL, CSV and the paragraphs of a .txt/.md file, `file:item N` for a JSON array,
`file:row N` for Parquet."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Callable, Iterator

from lmkiln.errors import UserError
from lmkiln.io import base_suffix, iter_jsonl, read_text, text_lines

RECORD_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", ".md")

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # a long reply or document is one field, not an error


def read_records(path: Path, on_bad: Callable[[str], None]) -> Iterator[tuple[str, dict]]:
    """(reference, record) for each row; a row that cannot be parsed is passed to `on_bad` as a message."""
    kind = base_suffix(path)
    if kind == ".jsonl":
        for lineno, record in iter_jsonl(path, on_bad=on_bad):
            yield f"{path}:{lineno}", record
    elif kind == ".json":
        try:
            items = json.loads(read_text(path))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(items, list):
            raise UserError(f"{path}: expected a JSON array of objects, got {type(items).__name__}")
        for i, item in enumerate(items, 1):
            if isinstance(item, dict):
                yield f"{path}:item {i}", item
            else:
                on_bad(f"{path}:item {i}: expected an object, got {type(item).__name__}")
    elif kind in (".csv", ".tsv"):
        reader = csv.DictReader((line for _, line in text_lines(path)), delimiter="\t" if kind == ".tsv" else ",")
        try:
            for row in reader:
                if None in row or None in row.values():
                    on_bad(f"{path}:{reader.line_num}: expected {len(reader.fieldnames or [])} columns")
                    continue
                yield f"{path}:{reader.line_num}", row
        except csv.Error as exc:
            raise UserError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None
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
    elif kind == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types for a broken file
            raise UserError(f"{path}: not a readable Parquet file ({exc})") from None
        row = 0
        for batch in table.iter_batches():
            for record in batch.to_pylist():
                row += 1
                yield f"{path}:row {row}", record
    else:
        raise UserError(f"{path}: expected one of {', '.join(RECORD_SUFFIXES)} (optionally compressed)")
