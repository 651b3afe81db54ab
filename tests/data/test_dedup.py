"""Near-duplicate removal on generated documents with planted near duplicates."""

import json
import random

import pytest

from lmkiln import data
from lmkiln.config import load_recipe
from lmkiln.data.dedup import LshIndex, signatures
from lmkiln.errors import UserError

VOCAB = [f"w{i}" for i in range(5000)]


def _corpus(n: int = 500, seed: int = 0):
    rng = random.Random(seed)
    originals = [" ".join(rng.choice(VOCAB) for _ in range(rng.randint(150, 300))) for _ in range(n)]
    planted = []
    for doc in originals:
        words = doc.split()
        for _ in range(max(1, len(words) // 200)):  # ~0.5% of words replaced, one inserted, one deleted
            words[rng.randrange(len(words))] = rng.choice(VOCAB)
        words.insert(rng.randrange(len(words)), rng.choice(VOCAB))
        del words[rng.randrange(len(words))]
        planted.append(" ".join(words))
    return originals, planted


def test_planted_near_duplicates_recall_and_precision():
    originals, planted = _corpus()
    index = LshIndex(num_perm=128, bands=16, threshold=0.8)
    kept_originals = [not index.add(sig) for sig in signatures(originals, 5, 128, seed=1)]
    caught = [index.add(sig) for sig in signatures(planted, 5, 128, seed=1)]
    recall = sum(caught) / len(caught)
    false_drops = kept_originals.count(False)  # distinct documents wrongly taken as duplicates
    assert recall >= 0.95, recall
    assert 1 - false_drops / len(originals) >= 0.99


def test_data_stage_keeps_first_of_each_cluster(tmp_path):
    originals, planted = _corpus(40, seed=1)
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for pair in zip(originals, planted) for t in pair))
    recipe = load_recipe(
        None,
        [f"run_dir={tmp_path / 'run'}", f"data.sources=[{src}]", "data.val_fraction=0", "data.near_dedup.enabled=true"],
    )
    stats = data.run(recipe)["metrics"]
    assert stats["removed"]["near_duplicate"]["docs"] >= 38 and stats["docs_out"] <= 42
    import pyarrow.parquet as pq

    kept = pq.read_table(sorted((tmp_path / "run" / "data").glob("train-*.parquet"))[0]).column("text").to_pylist()
    assert kept[0] == originals[0].strip() + "\n" or kept[0].startswith(originals[0][:50])


def test_bands_must_divide_permutations():
    with pytest.raises(UserError, match="num_perm .* multiple of bands"):
        load_recipe(None, ["data.near_dedup.num_perm=100", "data.near_dedup.bands=16"])
