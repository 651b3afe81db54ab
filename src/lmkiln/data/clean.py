"""Cleaning: mojibake repair (ftfy), Unicode normalisation, line endings, control characters, trailing and
repeated blank space, and optionally boilerplate lines (javascript and cookie/policy notices, as C4 does)."""

from __future__ import annotations

import re
import unicodedata

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{4,}")
POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


def is_boilerplate(line: str) -> bool:
    """A line C4 drops whatever else it says: it mentions javascript or a cookie/policy notice."""
    lower = line.lower()
    return "javascript" in lower or any(p in lower for p in POLICY)


def fix_mojibake(text: str) -> str:
    """Undo text decoded with the wrong codec (`doesnÃ¢â‚¬â„¢t` -> `doesn't`), changing nothing else:
    quotes, ligatures, widths and HTML entities are the author's."""
    if text.isascii():  # mojibake needs non-ASCII characters; most text is done here, fast
        return text
    import ftfy

    return ftfy.fix_text(
        text,
        unescape_html=False,
        uncurl_quotes=False,
        fix_latin_ligatures=False,
        fix_character_width=False,
        fix_line_breaks=False,
        normalization=None,
        remove_terminal_escapes=False,
        restore_byte_a0=True,
        fix_surrogates=True,
    )


def clean_text(text: str, unicode_form: str = "NFC", mojibake: bool = False, boilerplate: bool = False) -> str:
    if mojibake:
        text = fix_mojibake(text)
    if unicode_form != "none":
        text = unicodedata.normalize(unicode_form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    text = _CONTROL.sub("", text)
    text = _TRAILING.sub("", text)
    if boilerplate:
        text = "\n".join(line for line in text.split("\n") if not is_boilerplate(line))
    # Keep up to two blank lines (code uses them between definitions); drop longer runs.
    text = _BLANK_RUNS.sub("\n\n\n", text)
    return text.strip("\n") + "\n" if text.strip() else ""
