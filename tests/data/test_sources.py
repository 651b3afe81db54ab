"""Source formats (csv, tsv, compressed files) and the bad-input policy."""

import csv
import gzip
import json

import pyarrow as pa
import pytest

from lmkiln import data
from lmkiln.config import load_recipe
from lmkiln.data.sources import Errors, read
from lmkiln.errors import UserError

TEXT = "A document long enough to keep, about kilns and clay and the firing of pots."


def _texts(sources, **kw):
    return [d.text for d in read([str(s) for s in sources], **kw)]


def test_csv_tsv_and_compressed_sources(tmp_path):
    with open(tmp_path / "a.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "body"])
        w.writerow([1, "first, with a comma"])
        w.writerow([2, "second\nwith a newline"])
    (tmp_path / "b.tsv").write_text("body\tlabel\nthird\tx\n")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"body": "fourth"}) + "\n")
    with pa.output_stream(str(tmp_path / "d.txt.zst"), compression="zstd") as out:
        out.write("fifth, a whole file".encode())
    texts = _texts(sorted(tmp_path.iterdir()), text_field="body")
    assert texts == ["first, with a comma", "second\nwith a newline", "third", "fourth", "fifth, a whole file"]


def test_missing_column_names_the_columns(tmp_path):
    (tmp_path / "a.csv").write_text("id,content\n1,x\n")
    with pytest.raises(UserError, match=r"a.csv: no column 'text' \(columns: id, content\)"):
        _texts([tmp_path / "a.csv"])


def test_skip_policy_reports_and_goes_on(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text(json.dumps({"text": TEXT}) + "\n{broken\n" + json.dumps({"text": TEXT + " Two."}) + "\n")
    (src / "b.parquet").write_bytes(b"not parquet at all")
    (src / "c.txt").write_bytes(b"\xff\xfe bad bytes")
    errors = Errors("skip")
    assert len(_texts([src], errors=errors)) == 2
    assert errors.messages[0].endswith("a.jsonl:2: not valid JSON (Expecting property name enclosed in double quotes)")
    assert any("b.parquet: not a readable Parquet file" in m for m in errors.messages)
    assert any("c.txt: not valid UTF-8" in m for m in errors.messages)
    recipe = load_recipe(None, [f"run_dir={tmp_path / 'run'}", f"data.sources=[{src}]", "data.on_error=skip",
                                "data.min_chars=10", "data.val_fraction=0"])
    stats = data.run(recipe)["metrics"]
    assert stats["docs_out"] == 2 and len(stats["skipped_input"]) == 3
    with pytest.raises(UserError, match=r"a.jsonl:2: not valid JSON"):
        data.run(load_recipe(None, [f"run_dir={tmp_path / 'run2'}", f"data.sources=[{src}]"]))
    assert not (tmp_path / "run2" / "data" / "manifest.json").exists()
