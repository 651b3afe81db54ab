"""Entity-level precision, recall and F1 for BIO tags, counted as seqeval counts them by default: an
entity starts at B-X, or at an I-X that does not continue an entity of type X, and runs over the I-X
after it; a predicted entity counts only when its type, start and end all match a gold one."""

from __future__ import annotations


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, first word, last word) of each entity in a BIO sequence."""
    found, kind, start = set(), None, 0
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, label = tag.partition("-")
        continues = prefix == "I" and label == kind
        if kind is not None and not continues:
            found.add((kind, start, i - 1))
            kind = None
        if prefix in ("B", "I") and not continues:
            kind, start = label, i
    return found


def entity_scores(predicted: list[list[str]], gold: list[list[str]]) -> dict:
    """Micro-averaged entity precision, recall and F1 over sentences."""
    hit = n_pred = n_gold = 0
    for p, g in zip(predicted, gold):
        pe, ge = entities(p), entities(g)
        hit, n_pred, n_gold = hit + len(pe & ge), n_pred + len(pe), n_gold + len(ge)
    precision = hit / n_pred if n_pred else 0.0
    recall = hit / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"entity_precision": precision, "entity_recall": recall, "entity_f1": f1}
