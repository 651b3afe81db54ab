"""`kiln serve --blocklist FILE`: words and phrases kept out of replies. The file has one word or phrase a
line (blank lines and lines starting with # are skipped); matching is case-insensitive and on whole words,
and the spaces inside a phrase match any run of whitespace. A reply is cut before the first blocked
phrase it would contain and ends with finish_reason "content_filter", as OpenAI's API says it.

While streaming, only what could still become a match is held back: the end of the text that begins a
blocked phrase, or a phrase complete so far whose word might still go on ("hell" before "o")."""

from __future__ import annotations

import re
from pathlib import Path

from lmkiln.errors import UserError

WORD, SPACES = re.compile(r"\w"), re.compile(r"\s+")


class Blocklist:
    def __init__(self, phrases: list[str]) -> None:
        self.phrases = sorted({" ".join(p.lower().split()) for p in phrases if p.split()}, key=len, reverse=True)
        alternatives = "|".join(r"\s+".join(map(re.escape, p.split(" "))) for p in self.phrases)
        self.pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)
        self.prefixes = {p[:k] for p in self.phrases for k in range(1, len(p) + 1)}
        self.longest = max(map(len, self.phrases))

    @classmethod
    def read(cls, path: Path) -> Blocklist:
        """The phrases of a blocklist file, checked: UTF-8, at least one phrase."""
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise UserError(f"--blocklist {path}: no such file") from None
        except UnicodeDecodeError as exc:
            raise UserError(f"--blocklist {path}: not UTF-8 (byte {exc.start})") from None
        phrases = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not phrases:
            raise UserError(f"--blocklist {path}: no words or phrases in it (one a line; # starts a comment)")
        return cls(phrases)

    def cut(self, text: str, final: bool) -> int | None:
        """Where `text` must be cut (the start of its first blocked phrase), or None. Before the reply is
        `final`, a match at the very end does not count yet: its word may go on."""
        for match in self.pattern.finditer(text):
            if final or match.end() < len(text):
                return match.start()
        return None

    def held(self, text: str) -> int:
        """How many characters at the end of `text` could still become (or complete) a blocked phrase."""
        tail = text[-2 * self.longest :].lower()  # room for runs of whitespace inside a phrase
        for start in range(len(tail)):
            at = len(text) - len(tail) + start
            if (at == 0 or not WORD.match(text[at - 1])) and SPACES.sub(" ", tail[start:]) in self.prefixes:
                return len(tail) - start
        return 0
