"""Quality filters with their published thresholds as defaults: Gopher quality and repetition (Rae et al.
2021, table A1), C4 (Raffel et al. 2020), FineWeb (Penedo et al. 2024).

Each filter is a function `(text, cfg) -> (text or None, reason)`: None with a reason drops the
document; C4 may also return the text with lines removed. Words come from one fast regex, not spaCy.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

from lmkiln.data.clean import is_boilerplate
from lmkiln.errors import UserError
from lmkiln.io import read_text

WORD_RE = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]+")
ALNUM_WORD_RE = re.compile(r"\w+(?:['’]\w+)*")
PUNCT_RE = re.compile(r"[^\w\s]+")
INWORD_APOSTROPHE_RE = re.compile(r"(?<=\w)['’](?=\w)")  # part of a word (don't), not punctuation
TERMINAL_PUNCT = (".", "!", "?", '"', "'", "”", "’", "…")
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "●", "○", "▪", "‣", "⁃", "◦", "-", "*", "–", "—")
# a sentence ends at . ! or ? (and any closing quote or bracket) before a space or the end, but not after
# a common abbreviation (Mr. Smith)
SENTENCE_END = re.compile(
    r"(?<!\bMr)(?<!\bMrs)(?<!\bMs)(?<!\bDr)(?<!\bSt)(?<!\bvs)(?<!\be\.g)(?<!\bi\.e)"
    r"[.!?]+[\"'”’)\]]*(?=\s|$)"
)


def words_of(text: str) -> list[str]:
    """Words and punctuation runs, by one regex (no spaCy in the hot path)."""
    return WORD_RE.findall(text)


@lru_cache(maxsize=8)  # the Gopher filters read the same text one after the other
def _words(text: str) -> list[str]:
    return ALNUM_WORD_RE.findall(text)


def _other_tokens(text: str) -> tuple[int, int]:
    """(how many contractions English tokenizers split off words (you'll -> you 'll), how many
    punctuation tokens there are besides)."""
    contractions = len(INWORD_APOSTROPHE_RE.findall(text))
    return contractions, len(PUNCT_RE.findall(text)) - contractions


def gopher_quality(text: str, cfg) -> tuple[str | None, str]:
    """Ratios over tokens (words and punctuation) where the paper speaks of words per symbol, as
    datatrove (FineWeb's reference code) reads it; lengths and counts over words alone."""
    words = _words(text)
    n = len(words)
    if n < cfg.min_words:
        return None, "gopher_too_few_words"
    if n > cfg.max_words:
        return None, "gopher_too_many_words"
    mean_len = sum(map(len, words)) / n
    if not cfg.min_mean_word_length <= mean_len <= cfg.max_mean_word_length:
        return None, "gopher_mean_word_length"
    n_contractions, n_punct = _other_tokens(text)
    n_tokens = n + n_contractions + n_punct
    if max(text.count("#"), text.count("...") + text.count("…")) / n_tokens > cfg.max_symbol_word_ratio:
        return None, "gopher_symbol_ratio"
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and sum(line.lstrip().startswith(BULLETS) for line in lines) / len(lines) > cfg.max_bullet_lines_ratio:
        return None, "gopher_bullet_lines"
    if (
        lines
        and sum(line.rstrip().endswith(("...", "…")) for line in lines) / len(lines) > cfg.max_ellipsis_lines_ratio
    ):
        return None, "gopher_ellipsis_lines"
    if (n + n_contractions - sum(map(str.isdigit, words))) / n_tokens < cfg.min_alpha_words_ratio:
        return None, "gopher_alpha_words"
    if len(STOP_WORDS.intersection(map(str.lower, words))) < cfg.min_stop_words:
        return None, "gopher_stop_words"
    return text, ""


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(how many items repeat an earlier one, their characters)."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


def _ngram_hashes(ids: np.ndarray, up_to: int):
    """(n, a 64-bit hash of each word n-gram) for n = 2 .. up_to, each from the last by one multiply-add
    (over word ids; collisions are vanishingly rare)."""
    h = ids
    for n in range(2, min(up_to, len(ids)) + 1):
        h = h[:-1] * np.uint64(1_000_003) + ids[n - 1 :]
        yield n, h


def _repeats(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(stable sort order, whether each sorted item equals the one before, start of each group in sorted
    order): one sort serves both n-gram rules."""
    order = np.argsort(hashes, kind="stable")
    ordered = hashes[order]
    same = np.empty(len(ordered), dtype=bool)
    same[0] = False
    np.equal(ordered[1:], ordered[:-1], out=same[1:])
    return order, same, np.flatnonzero(~same)


def _repetition(words: list[str], cfg, total: int) -> str:
    """The Gopher n-gram rule a word sequence breaks, or ''. Top n-gram: characters of the most frequent
    n-gram (joined by spaces) times its count. Duplicate n-grams: characters of the words covered by
    n-grams that repeat an earlier one. Both over all characters of the text, as datatrove computes them."""
    ids = np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    top_limits, dup_limits = cfg.top_ngram_char_frac, cfg.dup_ngram_char_frac
    for n, hashes in _ngram_hashes(ids, max([*top_limits, *dup_limits], default=0)):
        order, same, starts = _repeats(hashes)
        if not same.any():
            return ""  # no n-gram repeats, so no longer one does
        if n in top_limits:
            counts = np.diff(np.append(starts, len(hashes)))
            top = counts.max()
            chars = max(int(lengths[i : i + n].sum()) for i in order[starts[counts == top]]) + n - 1
            if chars * top / total > top_limits[n]:
                return f"gopher_top_{n}gram"
        if n in dup_limits:
            repeats = np.zeros(len(hashes), dtype=np.int8)
            repeats[order[same]] = 1  # stable order: the first of each group is its earliest occurrence
            covered = np.convolve(repeats, np.ones(n, dtype=np.int8))[: len(words)] > 0
            fraction = lengths[covered].sum() / total
            if fraction > dup_limits[n]:
                return f"gopher_dup_{n}gram"
            # words covered by repeated (n+1)-grams are covered by repeated n-grams: the fraction only
            # falls as n grows, so below every later limit nothing later can fail
            later = [v for k, v in dup_limits.items() if k > n]
            if not any(k > n for k in top_limits) and fraction <= min(later, default=1.0):
                return ""
    return ""


def gopher_repetition(text: str, cfg) -> tuple[str | None, str]:
    paragraphs = [p for p in re.split(r"\n{2,}", text.strip()) if p]
    lines = [line for line in text.splitlines() if line.strip()]
    for unit, items, max_frac, max_char_frac in (
        ("paragraph", paragraphs, cfg.max_dup_para_frac, cfg.max_dup_para_char_frac),
        ("line", lines, cfg.max_dup_line_frac, cfg.max_dup_line_char_frac),
    ):
        if items:
            dup, chars = _duplicates(items)
            if dup / len(items) > max_frac:
                return None, f"gopher_dup_{unit}s"
            if chars / len(text) > max_char_frac:
                return None, f"gopher_dup_{unit}_chars"
    words = _words(text)
    reason = _repetition(words, cfg, len(text)) if words else ""
    return (None, reason) if reason else (text, "")


def c4(text: str, cfg) -> tuple[str | None, str]:
    """Drops lines (a very long word, no terminal punctuation, too few words, 'javascript', policy
    notices), and the document if a line it would keep has lorem ipsum or a curly bracket, or if too few
    sentences are left; in the order of C4's own code (TFDS c4_utils), so the same pages go."""
    kept = []
    for line in text.splitlines():
        stripped = line.strip()
        words = stripped.split()
        if not words or max(map(len, words)) > cfg.max_word_length:
            continue
        if not stripped.endswith(TERMINAL_PUNCT) or stripped.endswith("..."):
            continue
        if len(words) < cfg.min_words_per_line:
            continue
        lower = stripped.lower()
        if cfg.drop_lorem_ipsum and "lorem ipsum" in lower:
            return None, "c4_lorem_ipsum"
        if "javascript" in lower:
            continue
        if cfg.drop_curly_bracket and "{" in stripped:
            return None, "c4_curly_bracket"
        if is_boilerplate(lower):
            continue
        kept.append(stripped)
    if not kept:
        return None, "c4_no_lines_left"
    out = "\n".join(kept) + "\n"
    # every kept line ends a sentence (it ends in terminal punctuation), even one ending in a bare quote
    if sum(max(1, len(SENTENCE_END.findall(line))) for line in kept) < cfg.min_sentences:
        return None, "c4_too_few_sentences"
    return out, ""


def fineweb(text: str, cfg) -> tuple[str | None, str]:
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        return None, "fineweb_empty"
    if sum(line.rstrip().endswith(TERMINAL_PUNCT) for line in lines) / len(lines) < cfg.min_line_punct_ratio:
        return None, "fineweb_line_punct"
    if sum(len(line) <= cfg.short_line_length for line in lines) / len(lines) > cfg.max_short_line_ratio:
        return None, "fineweb_short_lines"
    if _duplicates(lines)[1] / len(text) > cfg.max_char_dup_ratio:
        return None, "fineweb_dup_line_chars"
    n_words = len([w for w in words_of(text) if any(ch.isalnum() for ch in w)])
    if n_words and text.count("\n") / n_words > cfg.max_newline_ratio:
        return None, "fineweb_newlines"
    return text, ""


@lru_cache(maxsize=4)
def load_blocklist(path: str) -> tuple[frozenset[str], re.Pattern | None]:
    """(blocked single words, one pattern for blocked phrases) from a file of one entry per line;
    blank lines and lines starting with # are ignored; matching ignores case."""
    try:
        lines = read_text(path).splitlines()
    except OSError as exc:
        raise UserError(f"data.blocklist.file: cannot read '{path}' ({exc.strerror})") from None
    entries = [line.strip().lower() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not entries:
        raise UserError(f"data.blocklist.file: '{path}' lists no words")
    words = frozenset(e for e in entries if len(words_of(e)) == 1)
    phrases = sorted((e for e in entries if e not in words), key=len, reverse=True)
    pattern = (
        re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, phrases)) + r")(?!\w)", re.IGNORECASE) if phrases else None
    )
    return words, pattern


def blocklist(text: str, cfg) -> tuple[str | None, str]:
    words, phrases = load_blocklist(cfg.file)
    matches = sum(w.lower() in words for w in words_of(text))
    if phrases is not None:
        matches += len(phrases.findall(text))
    return (None, "blocklist") if matches > cfg.max_matches else (text, "")


def language(text: str, cfg) -> tuple[str | None, str]:
    from lmkiln.data.language import top_language

    lang, score = top_language(text, cfg.max_chars)
    if lang not in cfg.languages or score < cfg.min_score:
        return None, "language"
    return text, ""


FILTERS = {
    "language": language,
    "gopher_quality": gopher_quality,
    "gopher_repetition": gopher_repetition,
    "c4": c4,
    "fineweb": fineweb,
    "blocklist": blocklist,
}


def active_filters(cfg) -> list[tuple]:
    """(filter, its settings) for each filter a data config turns on, in the fixed order of FILTERS."""
    out = []
    for name, fn in FILTERS.items():
        section = getattr(cfg, name)
        if (section.file is not None) if name == "blocklist" else section.enabled:
            out.append((fn, section))
    return out


def apply_filters(text: str, filters: list[tuple]) -> tuple[str | None, str]:
    """Run the active filters in order; the first that drops the text wins."""
    for fn, section in filters:
        text, reason = fn(text, section)
        if text is None:
            return None, reason
    return text, ""
