"""`builtin:gettext-<lang>`: a parallel English → <lang> corpus from the gettext catalogues a Debian
machine carries (`share/locale/<lang>/LC_MESSAGES/*.mo`): each program's messages and their human
translations, read with the standard library's `gettext`. Rows are instruction rows (translate this
message), so decoders and encoder-decoders fine-tune and evaluate on them alike.

Pairs whose translation equals the source, or that are only format strings (`%s: %d`, `{0}`), are
dropped: nothing in them is translated. A plural message gives its singular pair. The split is by
catalogue, with the rule the embedded corpus uses (a stable hash of the catalogue's name), so one
program's messages never straddle training and evaluation; an English message many programs share is
kept once, on the first side that has it (train, then val, then test)."""

from __future__ import annotations

import functools
import gettext
import re
import sys
from pathlib import Path

from lmkiln.data.split import is_heldout
from lmkiln.errors import UserError

PREFIX = "builtin:gettext-"
LANGUAGES = {  # the names instructions use; any other code is named by its code
    "de": "German",
    "fr": "French",
    "es": "Spanish",
    "it": "Italian",
    "pt": "Portuguese",
    "pt_BR": "Brazilian Portuguese",
    "nl": "Dutch",
    "sv": "Swedish",
    "pl": "Polish",
    "cs": "Czech",
    "ru": "Russian",
    "uk": "Ukrainian",
    "ja": "Japanese",
    "zh_CN": "Simplified Chinese",
    "ko": "Korean",
}
# printf (%s, %5.2f, %1$s, %'d, %%), Python (%(name)s, {0}, {name!r:>8}) and shell ($VAR, ${VAR}) formats
_FORMAT = re.compile(
    r"%(\([^)]*\))?(\d+\$)?[-#0 +'I]*(\d+|\*)?(\.(\d+|\*))?(hh|h|ll|l|L|q|j|z|t)?[diouxXeEfFgGaAcspnm%]"
    r"|\{[^{}]*\}|\$\{?\w+\}?"
)


def locale_roots() -> list[Path]:
    """Where catalogues live: the system prefix's share/locale, and /usr's (a Python built elsewhere)."""
    roots = [Path(sys.base_prefix) / "share" / "locale", Path("/usr/share/locale"), Path("/usr/local/share/locale")]
    return list(dict.fromkeys(roots))


def language_of(source: str) -> str:
    lang = source[len(PREFIX) :]
    if not re.fullmatch(r"[a-z]{2,3}(_[A-Z]{2})?(@\w+)?", lang):
        raise UserError(f"'{source}': expected {PREFIX}LANG with a locale code such as de, fr or pt_BR")
    return lang


def catalogues(lang: str, roots: list[Path] | None = None) -> list[Path]:
    """The .mo files for `lang` under the locale roots, sorted (one per program)."""
    found = {p.name: p for root in roots or locale_roots() for p in sorted((root / lang / "LC_MESSAGES").glob("*.mo"))}
    return [found[name] for name in sorted(found)]


def catalogue_fingerprint(source: str) -> str:
    """Identifies the catalogues a source reads, for caching: names, sizes and mtimes."""
    import hashlib

    h = hashlib.sha256(source.encode())
    for path in catalogues(language_of(source)):
        st = path.stat()
        h.update(f"{path}:{st.st_size}:{int(st.st_mtime)};".encode())
    return h.hexdigest()


def checked_catalogues(source: str, roots: tuple[Path, ...] | None = None) -> list[Path]:
    """The catalogues of `builtin:gettext-<lang>`, or a UserError saying where none was found."""
    lang = language_of(source)
    files = catalogues(lang, list(roots) if roots else None)
    if not files:
        where = ", ".join(str(r / lang / "LC_MESSAGES") for r in (roots or locale_roots()))
        raise UserError(
            f"'{source}': no gettext catalogue (*.mo) for '{lang}' on this machine (looked in {where}); "
            f"Debian installs them with the programs' translations"
        )
    return files


def format_only(text: str) -> bool:
    """Nothing to translate: no letter is left once format specifiers are removed."""
    return not any(c.isalpha() for c in _FORMAT.sub("", text))


def read_catalogue(path: Path) -> list[tuple[str, str]]:
    """(English, translation) pairs of one .mo file, in the file's order; contexts stripped, plurals
    as their singular; empty, identical and format-only pairs left out."""
    with open(path, "rb") as fh:
        catalog = gettext.GNUTranslations(fh)._catalog  # the parsed messages; gettext offers no public view
    pairs = []
    for key, translated in catalog.items():
        if isinstance(key, tuple):  # a plural: (msgid, form index)
            if key[1] != 0:
                continue
            key = key[0]
        source = key.split("\x04", 1)[-1]  # "context\x04message"
        if not source or not translated or translated == source or format_only(source):
            continue
        pairs.append((source, translated))
    return pairs


@functools.lru_cache(maxsize=4)
def gettext_splits(
    source: str, test_fraction: float, val_fraction: float, roots: tuple[Path, ...] | None = None
) -> dict[str, list[dict]]:
    """train/val/test instruction rows of `builtin:gettext-<lang>`, split by catalogue. Cached: finetune
    and eval both ask; treat the result as read-only."""
    files = checked_catalogues(source, roots)
    lang = language_of(source)
    name = LANGUAGES.get(lang, lang)
    instruction = f"Translate this program message from English to {name}."
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for path in files:
        domain = path.stem
        try:
            pairs = read_catalogue(path)
        except (OSError, UnicodeDecodeError, ValueError):  # a damaged or oddly encoded catalogue: skip it
            continue
        if is_heldout(domain, test_fraction):
            side = "test"
        elif is_heldout(domain, val_fraction, salt="val:"):
            side = "val"
        else:
            side = "train"
        splits[side] += [
            {"instruction": instruction, "input": en, "output": out, "group": domain, "id": f"{path}:{i + 1}"}
            for i, (en, out) in enumerate(pairs)
        ]
    return _deduplicated(splits)


def _deduplicated(splits: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Each English message once per split (programs share "Cancel" and "File not found"), and none in
    validation or test that training has: a held-out score is on messages the model never saw."""
    seen: set[str] = set()
    out = {}
    for side in ("train", "val", "test"):
        kept = []
        for row in splits[side]:
            if row["input"] not in seen:
                seen.add(row["input"])
                kept.append(row)
        out[side] = kept
    return out
