import json

import pyarrow.parquet as pq
import pytest

from lmkiln import data
from lmkiln.config import load_recipe
from lmkiln.data.builtin import docstring_splits, stdlib_modules
from lmkiln.data.clean import clean_text
from lmkiln.data.split import is_heldout
from lmkiln.errors import UserError


def _texts(out, split):
    return [t for f in sorted(out.glob(f"{split}-*.parquet")) for t in pq.read_table(f).column("text").to_pylist()]


def test_clean_text_normalises():
    raw = "Cafe\u0301 \r\nline two   \r\n\n\n\n\n\nend\x00\ufeff"
    assert clean_text(raw) == "Café\nline two\n\n\nend\n"
    assert clean_text("   \n\n") == ""


def test_data_stage_dedups_filters_and_reports(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    body = "A paragraph about kilns and the firing of clay, long enough to keep. " * 3
    (src / "a.txt").write_text(body)
    (src / "b.md").write_text(body + "\n\n")  # same text after cleaning: an exact duplicate
    (src / "c.txt").write_text("too short")
    (src / "d.jsonl").write_text(
        json.dumps({"text": "Another document " * 10}) + "\n" + json.dumps({"text": "x"}) + "\n"
    )
    recipe = load_recipe(
        None, [f"run_dir={tmp_path / 'run'}", f"data.sources=[{src}]", "data.min_chars=50", "data.val_fraction=0.0"]
    )
    manifest = data.run(recipe)
    stats = manifest["metrics"]
    assert stats["docs_in"] == 5
    assert stats["removed"]["duplicate"]["docs"] == 1
    assert stats["removed"]["too_short"]["docs"] == 2
    assert stats["docs_out"] == 2
    texts = _texts(tmp_path / "run" / "data", "train")
    assert sorted(texts) == sorted([clean_text(body), clean_text("Another document " * 10)])
    assert json.loads((tmp_path / "run" / "data" / "stats.json").read_text())["docs_out"] == 2
    assert (tmp_path / "run" / "data" / "removals.png").stat().st_size > 1000


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine line of text"}\n{"text": broken}\n')
    recipe = load_recipe(None, [f"run_dir={tmp_path / 'run'}", f"data.sources=[{bad}]"])
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        data.run(recipe)
    assert data.run.__doc__ and not (tmp_path / "run" / "data" / "manifest.json").exists()


def test_missing_source_is_a_user_error(tmp_path):
    recipe = load_recipe(None, [f"run_dir={tmp_path / 'run'}", f"data.sources=[{tmp_path}/*.txt]"])
    with pytest.raises(UserError, match="matches no readable file"):
        data.run(recipe)


def test_stdlib_split_is_by_module(tmp_path):
    recipe = load_recipe(None, [f"run_dir={tmp_path / 'run'}", "data.max_docs=60", "data.val_fraction=0.3"])
    stats = data.run(recipe)["metrics"]
    assert stats["train_docs"] > 0 and stats["val_docs"] > 0
    ids = {
        s: pq.read_table(sorted((tmp_path / "run" / "data").glob(f"{s}-*.parquet"))[0]).column("id").to_pylist()
        for s in ("train", "val")
    }
    for split, names in ids.items():
        for doc_id in names:
            module = doc_id.split(":", 1)[1]
            assert is_heldout(module, 0.3) == (split == "val")


@pytest.mark.slow
def test_docstring_task_holds_out_the_corpus_test_modules():
    splits = docstring_splits(0.05, 0.1)
    groups = {k: {ex["group"] for ex in v} for k, v in splits.items()}
    assert splits["train"] and splits["val"] and splits["test"]
    assert not groups["train"] & groups["test"] and not groups["val"] & groups["test"]
    assert all(is_heldout(g, 0.05) for g in groups["test"])
    ex = splits["train"][0]
    assert ex["output"] not in ex["input"]  # the docstring was removed from the code
    assert ex["input"].lstrip().startswith(("def ", "async def ", "@"))
    assert len(stdlib_modules()) > 100
