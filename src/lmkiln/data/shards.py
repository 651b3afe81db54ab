"""One work shard: clean, filter, check for contamination, redact, hash and sign a list of documents.

`process_shard` runs in a worker (this process, a local pool or Ray) and returns an Arrow table with a
row per input document: its final text, or the reason it was removed. Hashes and MinHash signatures
travel with the rows, so the driver can remove exact and near duplicates across all shards later,
in one ordered pass, without reading any text twice."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from functools import lru_cache

import numpy as np
import pyarrow as pa

from lmkiln.data.clean import clean_text
from lmkiln.data.decontam import Contamination
from lmkiln.data.dedup import signatures
from lmkiln.data.filters import active_filters, apply_filters
from lmkiln.data.pii import redact

SAMPLE_CHARS = 2000  # of a removed document, kept for auditing

WORK_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("origin", pa.string()),
        ("group", pa.string()),
        ("text", pa.string()),  # final text; for removed documents only in the audit sample
        ("bytes_in", pa.int64()),
        ("reason", pa.string()),  # why it was removed, or null
        ("digest", pa.binary(16)),  # content hash of the final text, for exact dedup
        ("signature", pa.list_(pa.uint32())),  # MinHash, for near dedup (empty when that is off)
        ("hits", pa.int32()),  # n-grams shared with the evaluation sets
        ("pii", pa.string()),  # JSON {kind: count} of what was redacted
    ]
)


@lru_cache(maxsize=2)
def _setup(cfg_json: str):
    from lmkiln.config import DataConfig

    cfg = DataConfig.model_validate_json(cfg_json)
    contamination = Contamination(cfg.decontam.eval_files, cfg.decontam.ngram) if cfg.decontam.eval_files else None
    return cfg, active_filters(cfg), contamination


def judge(
    text: str, cfg, filters: list[tuple], contamination: Contamination | None, pii_kinds: set[str]
) -> tuple[str, str | None, Counter, int]:
    """(final text, reason it is removed or None, personal data redacted, n-grams shared with the
    evaluation sets) for one cleaned document."""
    pii: Counter = Counter()
    if len(text) < cfg.min_chars:
        return text, "empty" if not text else "too_short", pii, 0
    if len(text) > cfg.max_chars:
        return text, "too_long", pii, 0
    filtered, reason = apply_filters(text, filters)
    if filtered is None:
        return text, reason, pii, 0
    text = filtered
    hits = contamination.hits(text) if contamination is not None else 0
    if hits and cfg.decontam.action == "remove":
        return text, "contaminated", pii, hits
    if cfg.pii.enabled:
        text, pii = redact(text, pii_kinds)
    return text, None, pii, hits


def process_shard(docs: list[tuple[str, str, str, str, str]], cfg_json: str, seed: int) -> pa.Table:
    """docs: (id, source, origin, group, raw text) tuples -> a WORK_SCHEMA table, one row each."""
    cfg, filters, contamination = _setup(cfg_json)
    kinds = set(cfg.pii.kinds)
    cols: dict[str, list] = {name: [] for name in WORK_SCHEMA.names}
    sampled: Counter = Counter()
    for doc_id, source, origin, group, raw in docs:
        text, reason, pii, hits = judge(
            clean_text(raw, cfg.unicode_form, cfg.fix_mojibake, cfg.boilerplate_lines),
            cfg,
            filters,
            contamination,
            kinds,
        )
        if reason is not None:
            sampled[reason] += 1
            text = raw[:SAMPLE_CHARS] if sampled[reason] <= cfg.removed_samples else None
        for name, value in zip(
            WORK_SCHEMA.names,
            (
                doc_id,
                source,
                origin,
                group,
                text,
                len(raw.encode("utf-8")),
                reason,
                None,
                [],
                hits,
                json.dumps(dict(pii)) if pii else None,
            ),
        ):
            cols[name].append(value)
    kept = [i for i, r in enumerate(cols["reason"]) if r is None]
    for i in kept:
        cols["digest"][i] = hashlib.blake2b(cols["text"][i].encode("utf-8"), digest_size=16).digest()
    nd = cfg.near_dedup
    if nd.enabled:
        sigs = signatures([cols["text"][i] for i in kept], nd.ngram, nd.num_perm, seed)
        for i, sig in zip(kept, sigs):
            cols["signature"][i] = sig
    return pa.table(cols, schema=WORK_SCHEMA)


def signature_rows(table: pa.Table, num_perm: int) -> list[np.ndarray | None]:
    """The signature column as arrays (None where a row has none)."""
    column = table.column("signature").combine_chunks()
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False)
    return [values[a:b] if b - a == num_perm else None for a, b in zip(offsets[:-1], offsets[1:])]
