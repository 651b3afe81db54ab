"""Sources: files, globs, folders and builtin corpora, read as a stream of Documents.

txt/md: a document per file. jsonl: a document per line (`text_field`); json: a document per object of
a top-level array. csv/tsv and parquet: a document per row (`text_field` names the column). html: the
page's main text. WARC: the main text of each HTML response. Any of them may be compressed (.gz, .zst,
.bz2). `hf:OWNER/NAME[:CONFIG][@SPLIT]` streams a Hugging Face dataset (needs `datasets` and a network).
A path that matches nothing is a user error raised before any work starts. A bad file or line stops the
run with its name and line, or, with `on_error="skip"`, is reported, counted and skipped.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmkiln.data.records import TABLE_SUFFIXES, Document, read_records
from lmkiln.data.web import HTML_SUFFIXES, html_to_text, read_warc
from lmkiln.errors import EncodingError, UserError
from lmkiln.io import base_suffix, check_utf8, open_bytes, read_text

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
RECORD_SUFFIXES = {*TABLE_SUFFIXES, ".warc"} | HTML_SUFFIXES


def expand(source: str) -> list[Path]:
    """The files a source names; UserError if it names none we can read."""
    if any(ch in source for ch in "*?["):
        paths = [Path(p) for p in sorted(glob.glob(source, recursive=True))]
    else:
        path = Path(source)
        if not path.exists():
            raise UserError(f"data source '{source}' does not exist")
        paths = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    files = [p for p in paths if p.is_file() and base_suffix(p) in TEXT_SUFFIXES | RECORD_SUFFIXES]
    if not files:
        kinds = ", ".join(sorted(TEXT_SUFFIXES | RECORD_SUFFIXES))
        raise UserError(f"data source '{source}' matches no readable file (expected {kinds}, optionally .gz/.zst/.bz2)")
    return files


@dataclass
class Errors:
    """What to do with bad input: raise it (`fail`), or report, count and skip it (`skip`)."""

    policy: str = "fail"
    messages: list[str] = field(default_factory=list)

    def __call__(self, message: str) -> None:
        if self.policy == "fail":
            raise UserError(message)
        from lmkiln.log import console

        console.print(f"[yellow]skipped: {message}[/yellow]")
        self.messages.append(message)


def check(sources: list[str], on_error: str = "fail") -> None:
    """Every source exists; with on_error=fail, every text file is valid UTF-8, before any work (HTML and
    WARC pages carry their own encodings; Parquet is binary)."""
    for source in sources:
        if source.startswith("hf:"):
            hf_spec(source)
        elif source.startswith("builtin:"):
            if source not in BUILTINS:
                raise UserError(f"data source '{source}' is not a builtin (known: {', '.join(BUILTINS)})")
        else:
            for path in expand(source):
                if on_error == "fail" and base_suffix(path) in TEXT_SUFFIXES | {".jsonl", ".json", ".csv", ".tsv"}:
                    check_utf8(path)


def _read_table(path: Path, field: str, errors: Errors) -> Iterator[Document]:
    """A document per record of a JSONL, JSON, CSV/TSV or Parquet file: its `field`."""
    try:
        for ref, record in read_records(path, errors, column=field):
            text = record.get(field)
            if text is None and base_suffix(path) == ".parquet":
                continue  # a null cell: no document
            if not isinstance(text, str):
                errors(f"{ref}: expected a string field '{field}'")
                continue
            yield Document(id=ref, source=str(path), group=ref, text=text)
    except EncodingError as exc:  # the records before it are kept; the rest of the file is skipped
        errors(f"{exc}; the rest of the file is skipped")


def _read_html(path: Path, field: str, errors: Errors) -> Iterator[Document]:
    with open_bytes(path) as fh:
        raw = fh.read()
    yield Document(id=str(path), source=str(path), group=str(path), text=html_to_text(raw))


def _read_warc(path: Path, field: str, errors: Errors) -> Iterator[Document]:
    for record_id, uri, text in read_warc(path, errors):
        yield Document(id=record_id, source=str(path), group=uri or record_id, text=text)


def hf_spec(source: str) -> tuple[str, str | None, str]:
    """`hf:OWNER/NAME[:CONFIG][@SPLIT]` -> (name, config, split); the split defaults to train."""
    spec = source[3:]
    spec, _, split = spec.partition("@")
    name, _, config = spec.partition(":")
    if not name or name.count("/") > 1 or " " in name:
        raise UserError(f"data source '{source}': expected hf:OWNER/NAME[:CONFIG][@SPLIT]")
    return name, config or None, split or "train"


def _read_hf(source: str, field: str, errors: Errors) -> Iterator[Document]:
    name, config, split = hf_spec(source)
    try:
        import datasets
    except ImportError:
        raise UserError(f"data source '{source}' needs the datasets package: pip install datasets") from None
    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
        for i, record in enumerate(stream):
            if not isinstance(record.get(field), str):
                errors(f"{source}: row {i}: expected a string field '{field}'")
                continue
            yield Document(id=f"{source}:{i}", source=source, group=f"{source}:{i}", text=record[field])
    except (OSError, ValueError, ConnectionError) as exc:  # offline, unknown dataset, bad config
        raise UserError(f"data source '{source}': cannot stream it from the Hugging Face hub ({exc})") from None


def _read_text(path: Path, field: str, errors: Errors) -> Iterator[Document]:
    try:
        text = read_text(path)
    except EncodingError as exc:
        errors(str(exc))
        return
    yield Document(id=str(path), source=str(path), group=str(path), text=text)


READERS = {**{s: _read_table for s in TABLE_SUFFIXES}, ".warc": _read_warc, **{s: _read_html for s in HTML_SUFFIXES}}


def _builtin_stdlib() -> Iterator[Document]:
    from lmkiln.data.builtin import python_stdlib

    return python_stdlib()


BUILTINS = {"builtin:python-stdlib": _builtin_stdlib}


def read(sources: list[str], text_field: str = "text", errors: Errors | None = None) -> Iterator[Document]:
    errors = errors or Errors()
    for source in sources:
        for doc in _read_source(source, text_field, errors):
            doc.origin = source
            yield doc


def _read_source(source: str, text_field: str, errors: Errors) -> Iterator[Document]:
    if source.startswith("hf:"):
        yield from _read_hf(source, text_field, errors)
    elif source.startswith("builtin:"):
        check([source])
        yield from BUILTINS[source]()
    else:
        for path in expand(source):
            yield from READERS.get(base_suffix(path), _read_text)(path, text_field, errors)


def fingerprint(sources: list[str]) -> dict[str, str]:
    """Content identity of the sources, for the stage cache."""
    from lmkiln.data.builtin import stdlib_fingerprint
    from lmkiln.io import sha256_file

    out = {}
    for source in sources:
        if source == "builtin:python-stdlib":
            out[source] = stdlib_fingerprint()
        elif source.startswith("hf:"):  # a hub dataset is named, not hashed: streaming it twice costs too much
            out[source] = source
        else:
            for path in expand(source):
                out[str(path)] = sha256_file(path)
    return out
