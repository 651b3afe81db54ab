"""Counterfactual data augmentation (Lu et al., 2018; Webster et al., 2020): each gendered word and first
name of a row swapped for its counterpart (he/she, his/her, man/woman, John/Mary, ...), so the model sees
both versions of what it learns from. The pairs are plain TSV files (`builtin:gender`, `builtin:names`, or
your own), read both ways.

A swap keeps the word's case (he -> she, He -> She, HE -> SHE) and its possessive ('s); a name (a pair
listed capitalised) is swapped only where it is written capitalised. "her" has two
counterparts: "his" before a word it could own ("her book"), "him" otherwise ("told her", "her."). Mode
`add` keeps every row and adds a swapped copy of the rows a swap changed; `replace` swaps rows in place.
Either takes `rate`, the share of rows considered (chosen by a hash of the row's id, so the same rows
whichever run). The stats count each swap (he -> she: 12) and the rows changed."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from lmkiln.data.split import unit_hash
from lmkiln.errors import UserError

BUILTIN_PAIRS = {name: Path(__file__).parent / "counterfactual" / f"{name}.tsv" for name in ("gender", "names")}
# words after which "her" is the object ("gave her a book" aside): him, not his
_NOT_OWNED = set(
    "a an the to and or but so if as at by for from in into of off on onto out over than that then this these "
    "those up with about after before is was be been are were will would can could should may might must do does "
    "did has have had not too very again also just now here there".split()
)
# the fields of a row that hold text a model learns from (ids, labels, tags and roles are not swapped)
_KEPT = {"id", "split", "label", "tags", "role", "group"}


def read_pairs(refs: list[str]) -> list[tuple[str, str]]:
    """The word pairs of builtin:NAME lists and TSV files, each checked."""
    pairs = []
    for ref in refs:
        path = BUILTIN_PAIRS.get(ref.removeprefix("builtin:")) if ref.startswith("builtin:") else Path(ref)
        if path is None:
            raise UserError(
                f"counterfactual.pairs: '{ref}': the built-in lists are {', '.join(map('builtin:{}'.format, BUILTIN_PAIRS))}"
            )
        if not path.is_file():
            raise UserError(f"counterfactual.pairs: '{ref}' does not exist")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = [p.strip() for p in line.split("\t")]
            if len(parts) != 2 or not all(re.fullmatch(r"[\w'-]+", p) for p in parts):
                raise UserError(f"{path}:{n}: expected two words separated by a tab, got {line!r}")
            pairs.append((parts[0], parts[1]))
    return pairs


def pairs_fingerprint(refs: list[str]) -> dict[str, str]:
    """Content hashes of the users' pair files, so that an edited list redoes the stage that read it (the
    built-in lists change only with lmkiln)."""
    from lmkiln.io import sha256_file

    return {ref: sha256_file(ref) for ref in refs if Path(ref).is_file()}


class Swapper:
    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.counterparts: dict[str, list[str]] = {}
        # a pair listed capitalised is a name: swapped only where written capitalised ("Heather", not "heather")
        self.names = {w.lower() for pair in pairs for w in pair if w[0].isupper()}
        for a, b in pairs:
            for x, y in ((a, b), (b, a)):
                found = self.counterparts.setdefault(x.lower(), [])
                if y.lower() not in found:
                    found.append(y.lower())
        words = sorted(self.counterparts, key=len, reverse=True)
        self.pattern = re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")(['’]s)?\b", re.IGNORECASE)

    def _counterpart(self, word: str, after: str) -> str:
        options = self.counterparts[word]
        if len(options) == 1:
            return options[0]
        following = re.match(r"\s*([A-Za-z]+)", after)  # her -> his before a word it could own, else him
        owned = following is not None and following.group(1).lower() not in _NOT_OWNED
        prefer = "his" if owned else "him"
        return prefer if prefer in options else options[0]

    def swap(self, text: str) -> tuple[str, Counter]:
        """`text` with each listed word swapped, and the count of each swap ("he -> she")."""
        counts: Counter = Counter()

        def one(m: re.Match) -> str:
            word = m.group(1)
            if word.lower() in self.names and not word[0].isupper():
                return m.group(0)
            target = self._counterpart(word.lower(), text[m.end() :])
            counts[f"{word.lower()} -> {target}"] += 1
            return _cased(target, word) + (m.group(2) or "")

        return self.pattern.sub(one, text), counts


def _cased(word: str, like: str) -> str:
    if len(like) > 1 and like.isupper():
        return word.upper()
    if like[0].isupper():
        return word[0].upper() + word[1:]
    return word


def swap_row(row: dict, swapper: Swapper) -> tuple[dict, Counter]:
    """A row with every text field swapped (chat turns, preference replies, tagging words alike)."""
    counts: Counter = Counter()
    # an instruction row also carries its conversation (built from the same fields), and every row its raw
    # fields (`row`, GRPO's): swapped, counted once
    counted_elsewhere = ("messages", "row") if "instruction" in row else ("row",)

    def walk(value, key=None, count=True):
        if key in _KEPT:
            return value
        if isinstance(value, str):
            swapped, c = swapper.swap(value)
            if count:
                counts.update(c)
            return swapped
        if isinstance(value, list):
            return [walk(v, count=count) for v in value]
        if isinstance(value, dict):
            return {k: walk(v, k, count and k not in counted_elsewhere) for k, v in value.items()}
        return value

    return walk(row), counts


class Augmentation:
    """Counterfactual augmentation row by row, counting as it goes (`stats`)."""

    def __init__(self, mode: str, rate: float, pairs: list[str], salt: str = "counterfactual") -> None:
        self.swapper, self.mode, self.rate, self.salt = Swapper(read_pairs(pairs)), mode, rate, salt
        self.swaps: Counter = Counter()
        self.rows_in = self.considered = self.changed = self.rows_out = 0

    def rows(self, row: dict) -> list[dict]:
        """What `row` becomes: itself, itself and its swapped copy (add), or the copy alone (replace)."""
        self.rows_in += 1
        out = [row]
        if unit_hash(str(row.get("id")), self.salt) < self.rate:
            self.considered += 1
            swapped, counts = swap_row(row, self.swapper)
            if counts:
                self.changed += 1
                self.swaps.update(counts)
                copy = {**swapped, "id": f"{row.get('id')}#counterfactual"}
                out = [row, copy] if self.mode == "add" else [copy]
        self.rows_out += len(out)
        return out

    def stats(self) -> dict:
        return {
            "mode": self.mode,
            "rate": self.rate,
            "rows_in": self.rows_in,
            "rows_considered": self.considered,
            "rows_changed": self.changed,
            "rows_out": self.rows_out,
            "swaps": dict(self.swaps.most_common()),
        }


def augment(rows: list[dict], mode: str, rate: float, pairs: list[str]) -> tuple[list[dict], dict]:
    """The rows after augmentation (`add` or `replace`), and what changed: rows considered, changed and
    added, and each swap's count."""
    aug = Augmentation(mode, rate, pairs)
    return [r for row in rows for r in aug.rows(row)], aug.stats()
