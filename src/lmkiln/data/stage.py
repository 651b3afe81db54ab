"""`kiln data`: read sources, clean, filter, redact personal data, remove exact and near duplicates and
benchmark contamination, write Parquet shards, stats.json, removals.png and a sample of removed
documents per reason.

Two passes. The first cuts the input into work shards of `data.work_docs` documents and processes them
in parallel (`data.executor`: a local process pool or Ray); each finished shard is saved under `.work/`
at once, so a rerun after an interruption redoes only the shards that had not finished. The second
pass walks the saved shards in order and removes duplicates across all of them, so every executor and
worker count gives the same output."""

from __future__ import annotations

import json
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lmkiln.config import Recipe
from lmkiln.data import sources
from lmkiln.data.counterfactual import Augmentation, pairs_fingerprint, read_pairs
from lmkiln.data.dedup import LshIndex
from lmkiln.data.executor import map_shards
from lmkiln.data.shards import SAMPLE_CHARS, process_shard, signature_rows
from lmkiln.data.split import is_heldout
from lmkiln.data.stats import Tally, load_pyplot, plot_removals, print_stats
from lmkiln.errors import UserError
from lmkiln.io import atomic_path, sha256_json, write_json, write_text
from lmkiln.log import console, progress

SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("text", pa.string())])
EXECUTION_KEYS = ("executor", "workers", "ray_address", "work_docs")  # how, not what: the output is the same


def check(recipe: Recipe, will_run: list[str]) -> None:
    """Every source readable and every contamination file there, before any document is read."""
    sources.check(recipe.data.sources, recipe.data.on_error)
    for name in recipe.data.decontam.eval_files:
        if not Path(name).is_file():
            raise UserError(f"data.decontam.eval_files: '{name}' does not exist")
    if recipe.data.counterfactual.enabled:
        read_pairs(recipe.data.counterfactual.pairs)


def config_of(recipe: Recipe) -> dict:
    cfg = recipe.data.model_dump(mode="json", exclude=set(EXECUTION_KEYS))
    return {**cfg, "seed": recipe.seed}


def inputs_of(recipe: Recipe) -> dict:
    from lmkiln.io import sha256_file

    evals = {f: sha256_file(f) for f in recipe.data.decontam.eval_files if Path(f).is_file()}
    pairs = pairs_fingerprint(recipe.data.counterfactual.pairs)
    return {"sources": sources.fingerprint(recipe.data.sources), "eval_files": evals, "counterfactual_pairs": pairs}


class ShardWriter:
    """Writes `<split>-NNNNN.parquet` shards of `shard_docs` documents each, atomically."""

    def __init__(self, out: Path, split: str, shard_docs: int) -> None:
        self.out, self.split, self.shard_docs = out, split, shard_docs
        self.rows: list[dict] = []
        self.shards: list[str] = []

    def add(self, doc_id: str, source: str, text: str) -> None:
        self.rows.append({"id": doc_id, "source": source, "text": text})
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


def _work_shards(cfg, errors: sources.Errors) -> Iterator[tuple[int, list[tuple]]]:
    """(index, documents) of each work shard, in input order, up to `max_docs` documents in all."""
    batch: list[tuple] = []
    index = n = 0
    for doc in sources.read(cfg.sources, cfg.text_field, errors):
        if cfg.max_docs is not None and n >= cfg.max_docs:
            break
        n += 1
        batch.append((doc.id, doc.source, doc.origin, doc.group, doc.text))
        if len(batch) == cfg.work_docs:
            yield index, batch
            index, batch = index + 1, []
    if batch:
        yield index, batch


def _open_work(work: Path, key: str) -> None:
    """The scratch folder of finished work shards, emptied if it belongs to other settings or inputs."""
    stamp = work / "key"
    if work.exists() and (not stamp.is_file() or stamp.read_text() != key):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(key)


def _process(recipe: Recipe, work: Path, errors: sources.Errors) -> tuple[list[Path], int]:
    """Run every unfinished work shard; (all work shard files in order, how many were already done)."""
    cfg = recipe.data
    payload = cfg.model_dump_json(exclude=set(EXECUTION_KEYS))
    files: list[Path] = []
    reused = 0

    def todo() -> Iterator[tuple[int, tuple]]:
        nonlocal reused
        for index, docs in _work_shards(cfg, errors):
            path = work / f"shard-{index:05d}.parquet"
            files.append(path)
            if path.is_file():
                reused += 1
                bar.update(task, advance=len(docs), shards=reused)
                continue
            yield index, (docs, payload, recipe.seed)

    with progress("{task.fields[shards]} shards") as bar:
        task = bar.add_task("data", total=cfg.max_docs, shards=0)
        finished = 0
        for index, table in map_shards(process_shard, todo(), cfg.executor, cfg.workers, cfg.ray_address):
            with atomic_path(work / f"shard-{index:05d}.parquet") as tmp:
                pq.write_table(table, tmp, compression="zstd")
            finished += 1
            bar.update(task, advance=table.num_rows, shards=reused + finished)
    if reused:
        console.print(f"data: {reused} of {len(files)} work shards were already done, reused")
    return files, reused


def _check_splits(stats: dict, cfg) -> None:
    """An empty training or validation split stops the stage here, naming why, rather than the stage
    after it."""
    removed = ", ".join(f"{r} {c['docs']:,}" for r, c in stats["removed"].items() if c["docs"])
    why = f"{stats['docs_in']:,} documents in" + (f", removed: {removed}" if removed else "")
    if not stats["train_docs"] and not stats["val_docs"]:
        raise UserError(
            f"data: no documents left ({why}); check data.sources, data.text_field and the filters "
            f"(data.min_chars={cfg.min_chars})"
        )
    if not stats["train_docs"]:
        raise UserError(
            f"data: the training split is empty ({why}; {stats['val_docs']:,} held out by "
            f"data.val_fraction={cfg.val_fraction}); add documents or lower data.val_fraction"
        )
    if not stats["val_docs"] and cfg.val_fraction > 0:
        raise UserError(
            f"data: the validation split is empty ({why}; {stats['train_docs']:,} kept, split by document "
            f"group at data.val_fraction={cfg.val_fraction}); add documents or raise data.val_fraction"
        )


def _merge(recipe: Recipe, files: list[Path], out: Path) -> dict:
    """One ordered pass over the work shards: exact and near dedup across all of them, splits, outputs."""
    cfg = recipe.data
    reasons = (
        ["empty", "too_short", "too_long", "duplicate"]
        + (["near_duplicate"] if cfg.near_dedup.enabled else [])
        + (["contaminated"] if cfg.decontam.eval_files else [])
    )
    tally = Tally(reasons)
    writers = {split: ShardWriter(out, split, cfg.shard_docs) for split in ("train", "val")}
    nd = cfg.near_dedup
    lsh = LshIndex(nd.num_perm, nd.bands, nd.threshold) if nd.enabled else None
    seen: set[bytes] = set()
    pii_total: Counter = Counter()
    samples: list[dict] = []
    sampled: Counter = Counter()
    flagged: list[dict] = []
    cf = cfg.counterfactual
    augmentation = Augmentation(cf.mode, cf.rate, cf.pairs) if cf.enabled else None

    def removed(row: dict, reason: str, text: str | None) -> None:
        tally.add_removed(row["origin"], reason, row["bytes_in"])
        sampled[reason] += 1
        if sampled[reason] <= cfg.removed_samples and text is not None:
            samples.append({"reason": reason, "id": row["id"], "source": row["source"], "text": text[:SAMPLE_CHARS]})

    for path in files:
        table = pq.read_table(path)
        sigs = signature_rows(table, nd.num_perm) if lsh is not None else None
        for i, row in enumerate(table.drop_columns(["signature"]).to_pylist()):
            tally.add_in(row["origin"], row["bytes_in"])
            if row["reason"] is not None:
                removed(row, row["reason"], row["text"])
            elif row["digest"] in seen:
                removed(row, "duplicate", row["text"])
            elif lsh is not None and lsh.add(sigs[i]):
                removed(row, "near_duplicate", row["text"])
            else:
                seen.add(row["digest"])
                pii_total.update(json.loads(row["pii"]) if row["pii"] else {})
                if row["hits"]:  # kept although contaminated: the action is flag
                    flagged.append({"id": row["id"], "source": row["source"], "shared_ngrams": row["hits"]})
                split = "val" if is_heldout(row["group"], cfg.val_fraction) else "train"
                tally.add_kept(row["origin"], split, len(row["text"].encode("utf-8")))
                docs = [row] if augmentation is None or split == "val" else augmentation.rows(row)
                for doc in docs:  # after dedup: a swapped copy is a near duplicate by design
                    writers[split].add(doc["id"], doc["source"], doc["text"])
    _check_splits(tally.result(), cfg)
    for w in writers.values():
        w.flush()
    if cfg.decontam.eval_files and cfg.decontam.action == "flag":
        write_text(out / "contaminated.jsonl", "".join(json.dumps(r) + "\n" for r in flagged))
    write_text(out / "removed_samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in samples))
    return {
        **tally.result(),
        "pii_redacted": dict(pii_total),
        "contaminated_flagged": len(flagged),
        "shards": {s: w.shards for s, w in writers.items()},
        **({"counterfactual": augmentation.stats()} if augmentation is not None else {}),
    }


def build(recipe: Recipe, out: Path) -> dict:
    for old in out.glob("*.parquet"):
        old.unlink()
    work = out / ".work"
    _open_work(
        work,
        sha256_json({"config": config_of(recipe), "inputs": inputs_of(recipe), "work_docs": recipe.data.work_docs}),
    )
    errors = sources.Errors(recipe.data.on_error)
    # matplotlib takes most of a second to import: do it while the workers run, not after them
    warm = threading.Thread(target=load_pyplot, daemon=True)
    warm.start()
    files, reused = _process(recipe, work, errors)
    result = _merge(recipe, files, out)
    result.update(skipped_input=errors.messages, work_shards=len(files), work_shards_reused=reused)
    write_json(out / "stats.json", result)
    warm.join()
    plot_removals(result, out / "removals.png")
    print_stats(result)
    shutil.rmtree(work)
    return result


def read_split(data_dir: Path, split: str):
    """Yield the texts of one split, shard by shard."""
    for shard in sorted(Path(data_dir).glob(f"{split}-*.parquet")):
        for batch in pq.ParquetFile(shard).iter_batches(columns=["text"], batch_size=1024):
            yield from batch.column(0).to_pylist()
