import json

import pytest

from lmkiln import data
from lmkiln.config import load_recipe
from lmkiln.data.decontam import Contamination
from lmkiln.errors import UserError

QUESTION = "Which gas do plants take in from the air to make their food through photosynthesis in the leaves?"


@pytest.fixture
def eval_file(tmp_path):
    path = tmp_path / "arc.jsonl"
    path.write_text(
        json.dumps({"query": QUESTION, "choices": ["oxygen", "carbon dioxide"], "gold": 1})
        + "\n"
        + json.dumps({"context": "The cat sat on the", "continuation": " mat"})
        + "\n"
    )
    return path


def test_shared_13_gram_is_found(eval_file):
    c = Contamination([str(eval_file)], 13)
    assert c.hits(f"Quiz night! {QUESTION} Answer below.") > 0
    assert c.hits("Plants take in carbon dioxide from the air; their leaves make food by photosynthesis.") == 0


def test_data_stage_removes_or_flags(tmp_path, eval_file):
    src = tmp_path / "docs.jsonl"
    leaked = f"Here is a study guide for the science exam. {QUESTION} The answer is carbon dioxide."
    clean = "Potters fire clay in kilns that reach high temperatures over many hours of careful work."
    src.write_text(json.dumps({"text": leaked}) + "\n" + json.dumps({"text": clean}) + "\n")
    base = [
        f"data.sources=[{src}]",
        "data.val_fraction=0",
        "data.min_chars=10",
        f"data.decontam.eval_files=[{eval_file}]",
    ]
    removed = data.run(load_recipe(None, [f"run_dir={tmp_path / 'a'}", *base]))["metrics"]
    assert removed["removed"]["contaminated"]["docs"] == 1 and removed["docs_out"] == 1
    flagged = data.run(load_recipe(None, [f"run_dir={tmp_path / 'b'}", *base, "data.decontam.action=flag"]))["metrics"]
    assert flagged["docs_out"] == 2 and flagged["contaminated_flagged"] == 1
    rows = (tmp_path / "b" / "data" / "contaminated.jsonl").read_text().splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["id"].endswith(":1")


def test_malformed_eval_file_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "choices": ["a"], "gold": 0}\n{"nothing": 1}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not an ICL task line"):
        Contamination([str(bad)], 13)
