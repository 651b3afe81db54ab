"""`kiln data`: read sources, clean, filter (length, Gopher, C4, FineWeb), redact personal data, remove
exact duplicates, write Parquet shards, stats.json and a sample of removed documents per reason."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lmkiln.config import Recipe
from lmkiln.data import sources
from lmkiln.data.clean import clean_text
from lmkiln.data.decontam import Contamination
from lmkiln.data.dedup import NearDuplicates
from lmkiln.data.filters import apply_filters
from lmkiln.data.pii import redact
from lmkiln.data.split import is_heldout
from lmkiln.io import atomic_path, write_json, write_text
from lmkiln.log import console, progress

SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("text", pa.string())])


def config_of(recipe: Recipe) -> dict:
    return recipe.data.model_dump(mode="json")


def inputs_of(recipe: Recipe, run_dir: Path) -> dict:
    from lmkiln.io import sha256_file

    evals = {f: sha256_file(f) for f in recipe.data.decontam.eval_files if Path(f).is_file()}
    return {"sources": sources.fingerprint(recipe.data.sources), "eval_files": evals}


def plot_removals(stats: dict, png: Path) -> None:
    """A bar chart of documents kept and removed per reason."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("kept", stats["docs_out"])] + [(r, v["docs"]) for r, v in stats["removed"].items() if v["docs"]]
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(rows) + 1.2), dpi=110)
    ax.barh([r for r, _ in rows][::-1], [n for _, n in rows][::-1],
            color=["#c44e52"] * (len(rows) - 1) + ["#4c72b0"])
    for i, (_, n) in enumerate(rows[::-1]):
        ax.text(n, i, f" {n:,}", va="center", fontsize=8)
    ax.set_xlabel("documents")
    ax.set_title(f"data: {stats['docs_in']:,} documents in")
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


class ShardWriter:
    """Writes `<split>-NNNNN.parquet` shards of `shard_docs` documents each, atomically."""

    def __init__(self, out: Path, split: str, shard_docs: int) -> None:
        self.out, self.split, self.shard_docs = out, split, shard_docs
        self.rows: list[dict] = []
        self.shards: list[str] = []

    def add(self, doc: sources.Document, text: str) -> None:
        self.rows.append({"id": doc.id, "source": doc.source, "text": text})
        if len(self.rows) >= self.shard_docs:
            self.flush()

    def flush(self) -> None:
        if not self.rows and self.shards:
            return
        name = f"{self.split}-{len(self.shards):05d}.parquet"
        with atomic_path(self.out / name) as tmp:
            pq.write_table(pa.Table.from_pylist(self.rows, schema=SCHEMA), tmp, compression="zstd")
        self.shards.append(name)
        self.rows = []


def _judge(text: str, cfg, seen: set[bytes], near: NearDuplicates | None,
           contamination: Contamination | None) -> tuple[str, str | None, Counter, int]:
    """(final text, reason it is removed or None, PII found, n-grams shared with the evaluation sets)
    for one cleaned document."""
    pii: Counter = Counter()
    if len(text) < cfg.min_chars:
        return text, "empty" if not text else "too_short", pii, 0
    if len(text) > cfg.max_chars:
        return text, "too_long", pii, 0
    filtered, reason = apply_filters(text, cfg)
    if filtered is None:
        return text, reason, pii, 0
    text = filtered
    hits = contamination.hits(text) if contamination is not None else 0
    if hits and cfg.decontam.action == "remove":
        return text, "contaminated", pii, hits
    if cfg.pii.enabled:
        text, pii = redact(text, set(cfg.pii.kinds))
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    if digest in seen:
        return text, "duplicate", pii, hits
    if near is not None and near.add(len(seen), text):
        return text, "near_duplicate", pii, hits
    seen.add(digest)
    return text, None, pii, hits


def build(recipe: Recipe, run_dir: Path, out: Path) -> dict:
    cfg = recipe.data
    for old in out.glob("*.parquet"):
        old.unlink()
    writers = {split: ShardWriter(out, split, cfg.shard_docs) for split in ("train", "val")}
    removed: dict[str, Counter] = {r: Counter() for r in ("empty", "too_short", "too_long", "duplicate",
                                                         *(["near_duplicate"] if cfg.near_dedup.enabled else []),
                                                         *(["contaminated"] if cfg.decontam.eval_files else []))}
    samples: list[dict] = []
    stats, pii_total, seen = Counter(), Counter(), set()
    nd = cfg.near_dedup
    near = NearDuplicates(nd.num_perm, nd.bands, nd.ngram, nd.threshold, recipe.seed) if nd.enabled else None
    contamination = Contamination(cfg.decontam.eval_files, cfg.decontam.ngram) if cfg.decontam.eval_files else None
    flagged: list[dict] = []
    errors = sources.Errors(cfg.on_error)
    with progress("{task.fields[kept]} kept") as bar:
        task = bar.add_task("data", total=cfg.max_docs, kept=0)
        for doc in sources.read(cfg.sources, cfg.text_field, errors):
            if cfg.max_docs is not None and stats["docs_in"] >= cfg.max_docs:
                break
            size = len(doc.text.encode("utf-8"))
            stats["docs_in"] += 1
            stats["bytes_in"] += size
            text, reason, pii, hits = _judge(clean_text(doc.text, cfg.unicode_form), cfg, seen, near, contamination)
            if reason:
                removed.setdefault(reason, Counter()).update(docs=1, bytes=size)
                if removed[reason]["docs"] <= cfg.removed_samples:
                    samples.append({"reason": reason, "id": doc.id, "source": doc.source, "text": doc.text[:2000]})
            else:
                pii_total.update(pii)
                if hits:  # kept although contaminated: action is flag
                    flagged.append({"id": doc.id, "source": doc.source, "shared_ngrams": hits})
                split = "val" if is_heldout(doc.group, cfg.val_fraction) else "train"
                writers[split].add(doc, text)
                stats[f"{split}_docs"] += 1
                stats[f"{split}_bytes"] += len(text.encode("utf-8"))
            bar.update(task, advance=1, kept=stats["train_docs"] + stats["val_docs"])
    for w in writers.values():
        w.flush()
    if contamination is not None and cfg.decontam.action == "flag":
        write_text(out / "contaminated.jsonl", "".join(json.dumps(r) + "\n" for r in flagged))
    write_text(out / "removed_samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in samples))
    stats["docs_out"] = stats["train_docs"] + stats["val_docs"]
    stats["bytes_out"] = stats["train_bytes"] + stats["val_bytes"]
    result = {**{k: stats[k] for k in ("docs_in", "bytes_in", "docs_out", "bytes_out", "train_docs",
                                         "val_docs", "train_bytes", "val_bytes")},
              "removed": {r: {"docs": c["docs"], "bytes": c["bytes"]} for r, c in removed.items()},
              "pii_redacted": dict(pii_total), "contaminated_flagged": len(flagged),
              "skipped_input": errors.messages, "shards": {s: w.shards for s, w in writers.items()}}
    write_json(out / "stats.json", result)
    plot_removals(result, out / "removals.png")
    print_stats(result)
    return result


def print_stats(stats: dict) -> None:
    from rich.table import Table

    table = Table(title="data", show_edge=False)
    for col in ("", "documents", "bytes"):
        table.add_column(col, justify="right" if col else "left")
    table.add_row("in", f"{stats['docs_in']:,}", f"{stats['bytes_in']:,}")
    for reason, r in stats["removed"].items():
        table.add_row(f"removed: {reason}", f"{r['docs']:,}", f"{r['bytes']:,}")
    table.add_row("out (train)", f"{stats['train_docs']:,}", f"{stats['train_bytes']:,}")
    table.add_row("out (val)", f"{stats['val_docs']:,}", f"{stats['val_bytes']:,}")
    for kind, n in stats.get("pii_redacted", {}).items():
        table.add_row(f"redacted: {kind}", f"{n:,}", "")
    console.print(table)


def read_split(data_dir: Path, split: str):
    """Yield the texts of one split, shard by shard."""
    for shard in sorted(Path(data_dir).glob(f"{split}-*.parquet")):
        for batch in pq.ParquetFile(shard).iter_batches(columns=["text"], batch_size=1024):
            yield from batch.column(0).to_pylist()
