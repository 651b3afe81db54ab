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
        out.write(b"fifth, a whole file")
    texts = _texts(sorted(tmp_path.iterdir()), text_field="body")
    assert texts == ["first, with a comma", "second\nwith a newline", "third", "fourth", "fifth, a whole file"]


def test_missing_column_names_the_columns(tmp_path):
    (tmp_path / "a.csv").write_text("id,content\n1,x\n")
    with pytest.raises(UserError, match=r"a.csv: no column 'text' \(columns: id, content\)"):
        _texts([tmp_path / "a.csv"])


def test_skip_policy_reports_and_goes_on(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text(
        json.dumps({"text": TEXT}) + "\n{broken\n" + json.dumps({"text": TEXT + " Two."}) + "\n"
    )
    (src / "b.parquet").write_bytes(b"not parquet at all")
    (src / "c.txt").write_bytes(b"\xff\xfe bad bytes")
    errors = Errors("skip")
    assert len(_texts([src], errors=errors)) == 2
    assert errors.messages[0].endswith("a.jsonl:2: not valid JSON (Expecting property name enclosed in double quotes)")
    assert any("b.parquet: not a readable Parquet file" in m for m in errors.messages)
    assert any("c.txt:1: not valid UTF-8 at byte 0" in m for m in errors.messages)
    recipe = load_recipe(
        None,
        [
            f"run_dir={tmp_path / 'run'}",
            f"data.sources=[{src}]",
            "data.on_error=skip",
            "data.min_chars=10",
            "data.val_fraction=0",
        ],
    )
    stats = data.run(recipe)["metrics"]
    assert stats["docs_out"] == 2 and len(stats["skipped_input"]) == 3
    with pytest.raises(UserError, match=r"c.txt:1: not valid UTF-8 at byte 0"):  # checked before any work
        data.run(load_recipe(None, [f"run_dir={tmp_path / 'run2'}", f"data.sources=[{src}]"]))
    (src / "c.txt").unlink()
    with pytest.raises(UserError, match=r"a.jsonl:2: not valid JSON"):
        data.run(load_recipe(None, [f"run_dir={tmp_path / 'run2'}", f"data.sources=[{src}]"]))
    assert not (tmp_path / "run2").exists()  # nothing left of a refused run


PAGE = (
    "<html><head><title>Kilns</title><script>var tracking = 1;</script></head><body>"
    "<nav><a href='/'>Home</a> <a href='/shop'>Shop</a></nav>"
    "<article><h1>Firing clay</h1><p>A kiln turns clay into ceramic at about a thousand degrees.</p>"
    "<p>Café owners buy the mugs.</p></article>"
    "<footer>© 2026 Kiln Co. All rights reserved.</footer></body></html>"
)


def _warc_record(uri: str, html: str, record_id: str) -> bytes:
    body = html.encode("utf-8")
    http = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    head = (
        f"WARC/1.0\r\nWARC-Type: response\r\nWARC-Record-ID: <urn:uuid:{record_id}>\r\n"
        f"WARC-Target-URI: {uri}\r\nWARC-Date: 2026-01-01T00:00:00Z\r\n"
        f"Content-Type: application/http; msgtype=response\r\nContent-Length: {len(http)}\r\n\r\n"
    ).encode()
    return head + http + b"\r\n\r\n"


def _warcinfo() -> bytes:
    payload = b"software: lmkiln tests\r\n"
    return (
        b"WARC/1.0\r\nWARC-Type: warcinfo\r\nWARC-Record-ID: <urn:uuid:00000000-0000-0000-0000-000000000000>\r\n"
        b"WARC-Date: 2026-01-01T00:00:00Z\r\nContent-Type: application/warc-fields\r\nContent-Length: "
        + str(len(payload)).encode()
        + b"\r\n\r\n"
        + payload
        + b"\r\n\r\n"
    )


def test_html_page_gives_its_main_text(tmp_path):
    (tmp_path / "page.html").write_text(PAGE, encoding="utf-8")
    (text,) = _texts([tmp_path / "page.html"])
    assert "A kiln turns clay into ceramic" in text and "Café owners" in text
    assert "tracking" not in text and "Shop" not in text and "rights reserved" not in text


def test_warc_gives_each_html_response(tmp_path):
    pytest.importorskip("fastwarc")
    other = PAGE.replace("Firing clay", "Glazes").replace("A kiln turns clay", "A glaze is glass fused")
    with gzip.open(tmp_path / "crawl.warc.gz", "wb") as fh:
        fh.write(
            _warcinfo()
            + _warc_record("https://kiln.example/a", PAGE, "11111111-1111-1111-1111-111111111111")
            + _warc_record("https://kiln.example/b", other, "22222222-2222-2222-2222-222222222222")
        )
    docs = list(read([str(tmp_path / "crawl.warc.gz")]))
    assert [d.group for d in docs] == ["https://kiln.example/a", "https://kiln.example/b"]
    assert docs[0].id == "<urn:uuid:11111111-1111-1111-1111-111111111111>"
    assert "A kiln turns clay" in docs[0].text and "A glaze is glass fused" in docs[1].text
    assert "Home" not in docs[1].text


def test_json_array_source(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "one"}, {"text": "two"}]))
    assert _texts([tmp_path / "a.json"]) == ["one", "two"]
    (tmp_path / "b.json").write_text(json.dumps({"text": "not an array"}))
    with pytest.raises(UserError, match=r"b.json: expected a JSON array of objects, got dict"):
        _texts([tmp_path / "b.json"])


def test_hf_source_streams_through_datasets(monkeypatch):
    """No network here: a stand-in `datasets` module records the call the real one would get."""
    import sys
    import types

    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": "first row"}, {"text": None}, {"text": "third row"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    errors = Errors("skip")
    docs = list(read(["hf:HuggingFaceFW/fineweb-edu:sample-10BT@train"], errors=errors))
    assert calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)]
    assert [d.text for d in docs] == ["first row", "third row"] and docs[0].origin.startswith("hf:")
    assert errors.messages == ["hf:HuggingFaceFW/fineweb-edu:sample-10BT@train: row 1: expected a string field 'text'"]


def test_hf_source_offline_is_a_user_error(monkeypatch):
    import sys
    import types

    def load_dataset(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(UserError, match=r"'hf:someone/corpus': cannot stream it from the Hugging Face hub"):
        list(read(["hf:someone/corpus"]))
    with pytest.raises(UserError, match=r"expected hf:OWNER/NAME"):
        list(read(["hf:a/b/c"]))
