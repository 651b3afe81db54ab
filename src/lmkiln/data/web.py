"""Web sources: HTML pages and WARC archives (Common Crawl's format), reduced to their main text with
resiliparse (navigation, footers, scripts and forms dropped), the encoding detected from the bytes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from lmkiln.errors import UserError

HTML_SUFFIXES = {".html", ".htm", ".xhtml"}


def _resiliparse():
    try:
        from resiliparse.extract.html2text import extract_plain_text
        from resiliparse.parse.encoding import detect_encoding
        from resiliparse.parse.html import HTMLTree
    except ImportError:
        raise UserError("HTML and WARC sources need resiliparse: pip install 'lmkiln[data]'") from None
    return extract_plain_text, detect_encoding, HTMLTree


def html_to_text(raw: bytes, encoding: str | None = None) -> str:
    """The main content of an HTML page as plain text, paragraphs separated by blank lines."""
    extract_plain_text, detect_encoding, HTMLTree = _resiliparse()
    tree = HTMLTree.parse_from_bytes(raw, encoding or detect_encoding(raw))
    return extract_plain_text(tree, main_content=True, alt_texts=False, comments=False)


def read_warc(path: Path, on_error: Callable[[str], None]) -> Iterator[tuple[str, str, str]]:
    """(record id, target URI, main text) of each HTML response in a WARC file (.warc, .warc.gz)."""
    _resiliparse()
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    try:
        with open(path, "rb") as fh:
            for record in ArchiveIterator(fh, record_types=WarcRecordType.response, parse_http=True):
                content_type = (record.http_content_type or "").lower()
                if "html" not in content_type:
                    continue
                uri = record.headers.get("WARC-Target-URI", "")
                body = record.reader.read()
                yield record.record_id, uri, html_to_text(body, record.http_charset)
    except Exception as exc:  # fastwarc's parse errors have no common base class
        if isinstance(exc, UserError):
            raise
        on_error(f"{path}: not a readable WARC file ({type(exc).__name__}: {exc})")
