"""Sources: files, globs, folders and builtin corpora, read as a stream of Documents.

txt/md: a document per file. jsonl: a document per line (`text_field`). parquet: a document per row.
A path that matches nothing is a user error raised before any work starts.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lmkiln.errors import UserError
from lmkiln.io import iter_jsonl

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
RECORD_SUFFIXES = {".jsonl", ".parquet"}


@dataclass
class Document:
    id: str
    source: str
    group: str  # documents of one group land in the same split (a module, a file)
    text: str


def expand(source: str) -> list[Path]:
    """The files a source names; UserError if it names none we can read."""
    if any(ch in source for ch in "*?["):
        paths = [Path(p) for p in sorted(glob.glob(source, recursive=True))]
    else:
        path = Path(source)
        if not path.exists():
            raise UserError(f"data source '{source}' does not exist")
        paths = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    files = [p for p in paths if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES | RECORD_SUFFIXES]
    if not files:
        kinds = ", ".join(sorted(TEXT_SUFFIXES | RECORD_SUFFIXES))
        raise UserError(f"data source '{source}' matches no readable file (expected {kinds})")
    return files


def check(sources: list[str]) -> None:
    from lmkiln.data import builtin  # noqa: F401 (import check only)

    for source in sources:
        if source.startswith("builtin:"):
            if source not in BUILTINS:
                raise UserError(f"data source '{source}' is not a builtin (known: {', '.join(BUILTINS)})")
        else:
            expand(source)


def _read_jsonl(path: Path, field: str) -> Iterator[Document]:
    for lineno, record in iter_jsonl(path):
        if not isinstance(record.get(field), str):
            raise UserError(f"{path}:{lineno}: expected a string field '{field}'")
        yield Document(id=f"{path}:{lineno}", source=str(path), group=f"{path}:{lineno}", text=record[field])


def _read_parquet(path: Path, field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise UserError(f"{path}: not a readable Parquet file ({exc})") from None
    if field not in table.schema_arrow.names:
        raise UserError(f"{path}: no column '{field}' (columns: {', '.join(table.schema_arrow.names)})")
    row = 0
    for batch in table.iter_batches(columns=[field]):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is not None:
                yield Document(id=f"{path}:{row}", source=str(path), group=f"{path}:{row}", text=text)


def _read_file(path: Path, field: str) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path, field)
    elif suffix == ".parquet":
        yield from _read_parquet(path, field)
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}: not valid UTF-8 at byte {exc.start}") from None
        yield Document(id=str(path), source=str(path), group=str(path), text=text)


def _builtin_stdlib() -> Iterator[Document]:
    from lmkiln.data.builtin import python_stdlib

    return python_stdlib()


BUILTINS = {"builtin:python-stdlib": _builtin_stdlib}


def read(sources: list[str], text_field: str = "text") -> Iterator[Document]:
    for source in sources:
        if source.startswith("builtin:"):
            check([source])
            yield from BUILTINS[source]()
        else:
            for path in expand(source):
                yield from _read_file(path, text_field)


def fingerprint(sources: list[str]) -> dict[str, str]:
    """Content identity of the sources, for the stage cache."""
    from lmkiln.data.builtin import stdlib_fingerprint
    from lmkiln.io import sha256_file

    out = {}
    for source in sources:
        if source == "builtin:python-stdlib":
            out[source] = stdlib_fingerprint()
        else:
            for path in expand(source):
                out[str(path)] = sha256_file(path)
    return out
