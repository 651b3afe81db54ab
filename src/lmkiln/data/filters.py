"""Quality filters with their published thresholds as defaults: Gopher quality and repetition (Rae et al.
2021, table A1), C4 (Raffel et al. 2020), FineWeb (Penedo et al. 2024).

Each filter is a function `(text, cfg) -> (text or None, reason)`: None with a reason drops the
document; C4 may also return the text with lines removed. Words come from one fast regex, not spaCy.
"""

from __future__ import annotations

import re
from collections import Counter

WORD_RE = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]+")
TERMINAL_PUNCT = (".", "!", "?", '"', "'", "”", "’", "…")
STOP_WORDS = {"the", "be", "to", "of", "and", "that", "have", "with"}
BULLETS = ("•", "●", "○", "▪", "‣", "⁃", "◦", "-", "*", "–", "—")
POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")


def words_of(text: str) -> list[str]:
    return WORD_RE.findall(text)


def _has_alpha(word: str) -> bool:
    return any(ch.isalpha() for ch in word)


def gopher_quality(text: str, cfg) -> tuple[str | None, str]:
    tokens = words_of(text)
    words = [w for w in tokens if any(ch.isalnum() for ch in w)]  # punctuation runs are not words
    n = len(words)
    if n < cfg.min_words:
        return None, "gopher_too_few_words"
    if n > cfg.max_words:
        return None, "gopher_too_many_words"
    mean_len = sum(len(w) for w in words) / n
    if not cfg.min_mean_word_length <= mean_len <= cfg.max_mean_word_length:
        return None, "gopher_mean_word_length"
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols / n > cfg.max_symbol_word_ratio:
        return None, "gopher_symbol_ratio"
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and sum(line.lstrip().startswith(BULLETS) for line in lines) / len(lines) > cfg.max_bullet_lines_ratio:
        return None, "gopher_bullet_lines"
    if lines and sum(line.rstrip().endswith(("...", "…")) for line in lines) / len(lines) > cfg.max_ellipsis_lines_ratio:
        return None, "gopher_ellipsis_lines"
    if sum(_has_alpha(w) for w in words) / n < cfg.min_alpha_words_ratio:
        return None, "gopher_alpha_words"
    if sum(w.lower() in STOP_WORDS for w in words) < cfg.min_stop_words:
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


def _ngram_fractions(words: list[str], n: int) -> tuple[float, float]:
    """(characters of the most frequent n-gram × its count, characters of words covered by any
    n-gram that occurs more than once), both over the characters of all words."""
    total = sum(len(w) for w in words)
    if len(words) < n or total == 0:
        return 0.0, 0.0
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    top, top_count = counts.most_common(1)[0]
    top_chars = sum(len(w) for w in top) * top_count if top_count > 1 else 0
    covered = [False] * len(words)
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i:i + n] = [True] * n
    dup_chars = sum(len(w) for w, c in zip(words, covered) if c)
    return top_chars / total, dup_chars / total


def gopher_repetition(text: str, cfg) -> tuple[str | None, str]:
    paragraphs = [p for p in re.split(r"\n{2,}", text.strip()) if p]
    lines = [line for line in text.splitlines() if line.strip()]
    for unit, items, max_frac, max_char_frac in (
            ("paragraph", paragraphs, cfg.max_dup_para_frac, cfg.max_dup_para_char_frac),
            ("line", lines, cfg.max_dup_line_frac, cfg.max_dup_line_char_frac)):
        if items:
            dup, chars = _duplicates(items)
            if dup / len(items) > max_frac:
                return None, f"gopher_dup_{unit}s"
            if chars / len(text) > max_char_frac:
                return None, f"gopher_dup_{unit}_chars"
    words = [w.lower() for w in words_of(text) if any(ch.isalnum() for ch in w)]
    for n, limit in cfg.top_ngram_char_frac.items():
        if _ngram_fractions(words, n)[0] > limit:
            return None, f"gopher_top_{n}gram"
    for n, limit in cfg.dup_ngram_char_frac.items():
        if _ngram_fractions(words, n)[1] > limit:
            return None, f"gopher_dup_{n}gram"
    return text, ""


def c4(text: str, cfg) -> tuple[str | None, str]:
    """Drops lines (no terminal punctuation, too few words, 'javascript', policy notices, very long
    words), then the document if it has lorem ipsum, a curly bracket, or too few sentences left."""
    low = text.lower()
    if cfg.drop_lorem_ipsum and "lorem ipsum" in low:
        return None, "c4_lorem_ipsum"
    if cfg.drop_curly_bracket and "{" in text:
        return None, "c4_curly_bracket"
    kept = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        words = stripped.split()
        lower = stripped.lower()
        if not stripped.endswith(TERMINAL_PUNCT) or stripped.endswith("..."):
            continue
        if len(words) < cfg.min_words_per_line or max(len(w) for w in words) > cfg.max_word_length:
            continue
        if "javascript" in lower or any(p in lower for p in POLICY):
            continue
        kept.append(stripped)
    if not kept:
        return None, "c4_no_lines_left"
    out = "\n".join(kept) + "\n"
    if len(SENTENCE_END.findall(out)) < cfg.min_sentences:
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


FILTERS = {"gopher_quality": gopher_quality, "gopher_repetition": gopher_repetition, "c4": c4, "fineweb": fineweb}


def apply_filters(text: str, cfg) -> tuple[str | None, str]:
    """Run the filters the recipe turns on, in a fixed order; the first that drops the text wins."""
    for name, fn in FILTERS.items():
        section = getattr(cfg, name)
        if section.enabled:
            text, reason = fn(text, section)
            if text is None:
                return None, reason
    return text, ""
