"""Work shards: the same output from every executor, and an interrupted run resumed shard by shard."""

import json
import os
import random

import pyarrow.parquet as pq
import pytest

from lmkiln import data
from lmkiln.config import load_recipe
from lmkiln.data import stage
from lmkiln.report import write_report

SENTENCES = [
    "The kiln was fired at dawn and the potters watched it all day.",
    "Clay from the river bank is washed, dried and kneaded before use.",
    "A glaze of ash and feldspar turns green in a reducing fire.",
    "Contact the studio at studio@kiln.example or +1 415-555-0132 for classes.",
    "Each firing takes two days, and the kiln must cool slowly afterwards.",
]


def _corpus(tmp_path, n=120):
    rng = random.Random(3)
    docs = [" ".join(rng.choice(SENTENCES) for _ in range(rng.randint(4, 12))) for _ in range(n)]
    docs += docs[:10]  # exact duplicates that land in later shards
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:70]))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[70:]))
    return [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]


def _recipe(tmp_path, run, sources, *extra):
    return load_recipe(
        None,
        [
            f"run_dir={tmp_path / run}",
            f"data.sources=[{','.join(sources)}]",
            "data.work_docs=25",
            "data.shard_docs=40",
            "data.min_chars=50",
            "data.pii.enabled=true",
            "data.near_dedup.enabled=true",
            "data.val_fraction=0.1",
            *extra,
        ],
    )


def _outputs(run_dir):
    out = run_dir / "data"
    tables = {f.name: pq.read_table(f).to_pylist() for f in sorted(out.glob("*.parquet"))}
    stats = json.loads((out / "stats.json").read_text())
    for key in ("work_shards_reused",):
        stats.pop(key)
    return tables, stats, (out / "removed_samples.jsonl").read_text()


def test_process_pool_gives_the_inline_output(tmp_path):
    sources = _corpus(tmp_path)
    one = data.run(_recipe(tmp_path, "one", sources, "data.workers=1"))["metrics"]
    data.run(_recipe(tmp_path, "two", sources, "data.workers=2"))
    assert one["work_shards"] == 6 and one["removed"]["duplicate"]["docs"] >= 10
    assert one["pii_redacted"]["email"] > 0 and one["docs_out"] > 0
    assert _outputs(tmp_path / "one") == _outputs(tmp_path / "two")
    assert set(one["per_source"]) == set(sources)
    assert sum(s["docs_in"] for s in one["per_source"].values()) == one["docs_in"] == 130
    assert not (tmp_path / "one" / "data" / ".work").exists()  # scratch removed once the stage is done
    report = write_report(tmp_path / "one").read_text()
    assert "| source | in | kept | removed |" in report and f"| {sources[1]} | 60 |" in report
    assert "removed: duplicate" in report and "(data/removals.png)" in report
    assert (tmp_path / "one" / "data" / "removals.png").stat().st_size > 10_000


@pytest.mark.slow
def test_ray_executor_gives_the_local_output(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    sources = _corpus(tmp_path)
    data.run(_recipe(tmp_path, "local", sources, "data.workers=1"))
    data.run(_recipe(tmp_path, "ray", sources, "data.executor=ray", "data.workers=2"))
    assert _outputs(tmp_path / "local") == _outputs(tmp_path / "ray")


def test_interrupted_run_redoes_only_unfinished_shards(tmp_path, monkeypatch):
    sources = _corpus(tmp_path)
    done = []
    real = stage.process_shard

    def interrupted(docs, cfg_json, seed):
        if len(done) == 3:
            raise KeyboardInterrupt  # as Ctrl-C would, while the fourth shard is being processed
        done.append(docs[0][0])
        return real(docs, cfg_json, seed)

    monkeypatch.setattr(stage, "process_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.run(_recipe(tmp_path, "run", sources, "data.workers=1"))
    work = tmp_path / "run" / "data" / ".work"
    assert sorted(p.name for p in work.glob("shard-*")) == [f"shard-0000{i}.parquet" for i in range(3)]
    assert not (tmp_path / "run" / "data" / "manifest.json").exists()

    redone = []

    def counting(docs, cfg_json, seed):
        redone.append(docs[0][0])
        return real(docs, cfg_json, seed)

    monkeypatch.setattr(stage, "process_shard", counting)
    metrics = data.run(_recipe(tmp_path, "run", sources, "data.workers=1"))["metrics"]
    assert metrics["work_shards_reused"] == 3 and len(redone) == 3 and not set(redone) & set(done)
    data.run(_recipe(tmp_path, "fresh", sources, "data.workers=1"))
    assert _outputs(tmp_path / "run") == _outputs(tmp_path / "fresh")


def test_changed_settings_discard_finished_shards(tmp_path, monkeypatch):
    sources = _corpus(tmp_path)
    work = tmp_path / "run" / "data" / ".work"
    work.mkdir(parents=True)
    (work / "key").write_text("settings of an earlier run")
    (work / "shard-00000.parquet").write_text("stale")
    metrics = data.run(_recipe(tmp_path, "run", sources, "data.workers=1"))["metrics"]
    assert metrics["work_shards_reused"] == 0 and metrics["docs_in"] == 130
    assert os.listdir(tmp_path / "run" / "data").count(".work") == 0
