"""Decontamination: documents that share a word n-gram (13 by default, as GPT-3's paper did) with an
evaluation set are removed or flagged, so benchmark scores stay honest. Evaluation files are in the ICL
JSONL format: multiple choice {query, choices, gold}, schema {context_options, continuation},
language modelling {context, continuation}."""

from __future__ import annotations

from pathlib import Path

from lmkiln.data.filters import words_of
from lmkiln.errors import UserError
from lmkiln.io import iter_jsonl


def _eval_texts(record: dict) -> list[str]:
    texts = []
    for key in ("query", "context", "continuation"):
        if isinstance(record.get(key), str):
            texts.append(record[key])
    for key in ("choices", "context_options"):
        if isinstance(record.get(key), list):
            texts += [t for t in record[key] if isinstance(t, str)]
    return texts


def _ngrams(text: str, n: int) -> set[int]:
    words = [w.lower() for w in words_of(text) if any(ch.isalnum() for ch in w)]
    return {hash(tuple(words[i : i + n])) for i in range(len(words) - n + 1)}


class Contamination:
    """The n-grams of a set of evaluation files; `hits(text)` counts those a document shares."""

    def __init__(self, files: list[str], n: int) -> None:
        self.n = n
        self.grams: set[int] = set()
        for name in files:
            path = Path(name)
            if not path.is_file():
                raise UserError(f"data.decontam.eval_files: '{name}' does not exist")
            for lineno, record in iter_jsonl(path):
                texts = _eval_texts(record)
                if not texts:
                    raise UserError(
                        f"{path}:{lineno}: not an ICL task line (expected query/choices, "
                        f"context_options/continuation, or context/continuation)"
                    )
                # the question with each answer: a leak of either shows up
                joined = " ".join(texts)
                self.grams |= _ngrams(joined, n)

    def hits(self, text: str) -> int:
        return len(_ngrams(text, self.n) & self.grams)
