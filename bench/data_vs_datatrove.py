"""`kiln data` against datatrove on the same documents, in one run.

The documents (about 120,000 distinct ones, so that process start-up is a small share of either run):
tinyshakespeare split into paragraphs, the customer-support responses of the Bitext sample, the
paragraphs of the running interpreter's standard library (every .py file, its test suite included: code,
docstrings and comments, which the quality filters mostly drop), planted near duplicates (a copy of a document with a few words changed) and planted personal
data (e-mail addresses, phone numbers, IP addresses, card numbers), in a fixed shuffle, written as
JSONL files (one per worker). Exact repeats are dropped first, since datatrove's filters do not dedup.

Both tools run their whole pipeline as a user would, with the same number of worker processes:
  datatrove: JsonlReader -> GopherQuality -> GopherRepetition -> C4Quality -> FineWebQuality ->
             PIIFormatter -> JsonlWriter   (LocalPipelineExecutor)
  lmkiln:    `kiln data` with gopher_quality, gopher_repetition, c4, fineweb and pii on, min_chars=0
Prints documents per second for each, the ratio, and how often the two agree on keeping a document.

    pip install datatrove "xxhash<4" spacy orjson     # the peer; spaCy does datatrove's English word splitting
    python bench/data_vs_datatrove.py [--workers 2] [--show 5]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import importlib.util
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

PII = [
    "You can write to {name}@example-mail.com for details.",
    "Call our office on +1 415-555-{n:04d} between nine and five.",
    "The request came from IP address 81.{a}.{b}.17 this morning.",
    "Card 4111 1111 1111 1111 was charged twice for the order.",
]


def stdlib_paragraphs(min_chars: int = 20) -> list[str]:
    """Blank-line separated blocks of every .py file of the standard library, tests included."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        if {"site-packages", "dist-packages", "__pycache__"} & set(path.parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):  # a few test files are Latin-1 on purpose
            continue
        out += [p.strip() for p in text.split("\n\n") if len(p.strip()) >= min_chars]
    return out


def build_corpus(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    paragraphs = [p.strip() for p in (SHARED / "tinyshakespeare" / "input.txt").read_text().split("\n\n") if p.strip()]
    with open(
        SHARED / "bitext-customer-support" / "Bitext_Sample_Customer_Support_Training_Dataset.csv",
        newline="",
        encoding="utf-8",
    ) as fh:
        responses = [row["response"] for row in csv.DictReader(fh)]
    texts = list(dict.fromkeys(paragraphs + responses + stdlib_paragraphs()))
    planted = []
    for text in rng.sample([t for t in texts if len(t.split()) >= 60], 300):
        words = text.split(" ")
        for _ in range(3):
            words[rng.randrange(len(words))] = rng.choice(["very", "indeed", "also", "then"])
        planted.append(" ".join(words))
    for i in rng.sample(range(len(texts)), 400):
        line = rng.choice(PII).format(name=f"user{i}", n=i % 10000, a=i % 250, b=(i * 7) % 250)
        texts[i] = texts[i] + "\n" + line
    texts = list(dict.fromkeys(texts + planted))  # exact repeats out: lmkiln would drop them, datatrove not
    rng.shuffle(texts)
    return [{"id": f"doc{i:06d}", "text": t} for i, t in enumerate(texts)]


def write_inputs(docs: list[dict], folder: Path, files: int) -> list[Path]:
    folder.mkdir(parents=True)
    paths = [folder / f"part-{k:02d}.jsonl" for k in range(files)]
    for k, path in enumerate(paths):
        path.write_text("".join(json.dumps(d) + "\n" for d in docs[k::files]))
    return paths


def run_datatrove(inputs: Path, out: Path, workers: int) -> tuple[float, set[str]]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    pipeline = [
        JsonlReader(str(inputs)),
        GopherQualityFilter(),
        GopherRepetitionFilter(),
        C4QualityFilter(),
        FineWebQualityFilter(),
        PIIFormatter(),
        JsonlWriter(str(out / "kept")),
    ]
    start = time.perf_counter()
    LocalPipelineExecutor(pipeline=pipeline, tasks=workers, workers=workers, logging_dir=str(out / "logs")).run()
    seconds = time.perf_counter() - start
    kept = set()
    for path in (out / "kept").glob("*.jsonl.gz"):
        with gzip.open(path, "rt") as fh:
            kept |= {json.loads(line)["id"] for line in fh}
    return seconds, kept


def run_lmkiln(paths: list[Path], run_dir: Path, workers: int) -> tuple[float, set[str]]:
    import pyarrow.parquet as pq

    from lmkiln import data
    from lmkiln.config import load_recipe

    recipe = load_recipe(
        None,
        [
            f"run_dir={run_dir}",
            f"data.sources=[{','.join(map(str, paths))}]",
            "data.min_chars=0",
            "data.val_fraction=0",
            f"data.workers={workers}",
            "data.gopher_quality.enabled=true",
            "data.gopher_repetition.enabled=true",
            "data.c4.enabled=true",
            "data.fineweb.enabled=true",
            "data.pii.enabled=true",
        ],
    )
    start = time.perf_counter()
    data.run(recipe)
    seconds = time.perf_counter() - start
    ids = {str(p): [json.loads(line)["id"] for line in p.read_text().splitlines()] for p in paths}
    kept = set()
    for shard in (run_dir / "data").glob("train-*.parquet"):
        for doc_id in pq.read_table(shard, columns=["id"]).column(0).to_pylist():
            path, line = doc_id.rsplit(":", 1)
            kept.add(ids[path][int(line) - 1])
    return seconds, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for each tool")
    parser.add_argument("--show", type=int, default=0, help="print this many documents the tools disagree on")
    args = parser.parse_args()
    if importlib.util.find_spec("datatrove") is None:
        sys.exit('datatrove is the peer here: pip install datatrove "xxhash<4" spacy orjson')

    docs = build_corpus()
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        paths = write_inputs(docs, tmp / "in", args.workers)
        dt_s, dt_kept = run_datatrove(tmp / "in", tmp / "datatrove", args.workers)
        lk_s, lk_kept = run_lmkiln(paths, tmp / "lmkiln", args.workers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ids = [d["id"] for d in docs]
    agree = sum((i in dt_kept) == (i in lk_kept) for i in ids) / len(ids)
    n = len(ids)
    print(f"\n{n:,} documents, {args.workers} worker(s) each")
    print(f"{'':12}{'seconds':>9}{'docs/s':>10}{'kept':>8}")
    print(f"{'datatrove':12}{dt_s:>9.1f}{n / dt_s:>10,.0f}{len(dt_kept):>8,}")
    print(f"{'lmkiln':12}{lk_s:>9.1f}{n / lk_s:>10,.0f}{len(lk_kept):>8,}")
    print(f"ratio (lmkiln docs/s / datatrove docs/s): {dt_s / lk_s:.2f}")
    print(
        f"agreement on keep/drop: {agree:.2%}  (kept by both {len(dt_kept & lk_kept):,}, "
        f"only datatrove {len(dt_kept - lk_kept):,}, only lmkiln {len(lk_kept - dt_kept):,})"
    )
    by_id = {d["id"]: d["text"] for d in docs}
    for label, diff in (("kept only by datatrove", dt_kept - lk_kept), ("kept only by lmkiln", lk_kept - dt_kept)):
        for doc_id in sorted(diff)[: args.show]:
            print(f"\n--- {label}: {doc_id}\n{by_id[doc_id][:600]}")


if __name__ == "__main__":
    main()
