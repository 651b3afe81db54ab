"""Fine-tuning data: every format and the column mapping, bad rows, and the exact tokens the loss trains."""

import csv
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmkiln.cli import main
from lmkiln.data.examples import encode_example, load_splits
from lmkiln.errors import UserError
from lmkiln.model.io.chat_format import ChatFormat
from lmkiln.model.loss import IGNORE
from lmkiln.tokenizer.train import load_tokenizer
from lmkiln.train import run_finetune

CHAT = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Colour of the sky?"},
    {"role": "assistant", "content": "Blue"},
    {"role": "user", "content": "And grass?"},
    {"role": "assistant", "content": "Green"},
]


def _all(splits):
    return splits["train"] + splits["val"] + splits["test"]


def test_each_format_and_the_column_mapping(tmp_path):
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": CHAT}) + "\n")
    sharegpt = [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello"},
    ]
    (tmp_path / "share.json").write_text(json.dumps([{"conversations": sharegpt}]))
    with open(tmp_path / "faq.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["question", "answer", "intent"])
        w.writerow(["Where is my order?", "It ships tomorrow.", "track_order"])
    pq.write_table(pa.table({"body": ["Clay is fired in a kiln."]}), tmp_path / "corpus.parquet")

    (chat,) = _all(load_splits(str(tmp_path / "chat.jsonl"), 0.5, 0.05))
    assert chat["messages"] == CHAT and chat["id"].endswith("chat.jsonl:1")
    (share,) = _all(load_splits(str(tmp_path / "share.json"), 0.5, 0.05))
    assert [m["role"] for m in share["messages"]] == ["system", "user", "assistant"] and share["id"].endswith(":item 1")
    (faq,) = _all(
        load_splits(str(tmp_path / "faq.csv"), 0.5, 0.05, columns={"instruction": "question", "output": "answer"})
    )
    assert faq["messages"] == [
        {"role": "user", "content": "Where is my order?"},
        {"role": "assistant", "content": "It ships tomorrow."},
    ]
    # the mapping names the format where the source's own column names would say another
    with open(tmp_path / "intents.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["instruction", "intent"], ["Where is my order?", "track_order"]])
    (row,) = _all(
        load_splits(str(tmp_path / "intents.csv"), 0.5, 0.05, columns={"text": "instruction", "label": "intent"})
    )
    assert (row["text"], row["label"]) == ("Where is my order?", "track_order")
    (doc,) = _all(load_splits(str(tmp_path / "corpus.parquet"), 0.5, 0.05, fmt="text", columns={"text": "body"}))
    assert doc["text"] == "Clay is fired in a kiln." and doc["id"].endswith(":row 1")
    with pytest.raises(
        UserError, match=r"faq.csv:2: no column 'query' \(mapped to 'instruction'; columns: answer, intent, question\)"
    ):
        load_splits(str(tmp_path / "faq.csv"), 0.5, 0.05, columns={"instruction": "query"})


def _trained_text(tok, ids, labels):
    return tok.decode([label for label in labels if label != IGNORE], skip_special_tokens=False)


def test_multi_turn_masking_trains_exactly_the_replies(trained_run):
    _, run_dir, _ = trained_run
    model_dir = run_dir / "pretrain" / "final"
    tok = load_tokenizer(model_dir)
    chat = ChatFormat(model_dir)
    ids, labels = encode_example(tok, {"messages": CHAT}, chat)
    assert _trained_text(tok, ids, labels) == "Blue<|end|>Green<|end|>"
    trained = [i for i, label in enumerate(labels) if label != IGNORE]
    assert all(ids[i + 1] == labels[i] for i in trained)  # label i is the token at i + 1
    # exactly the positions of the replies: the tokens right after each assistant header
    text = chat.render(CHAT)
    head = tok.encode(text[: text.index("Blue")], add_special_tokens=False).ids
    assert trained[0] == len(head) - 1
    everything = encode_example(tok, {"messages": CHAT}, chat, loss_on="all")[1]
    assert sum(label != IGNORE for label in everything) == len(ids) - 1


def test_the_model_own_template_decides_the_reply_tokens(trained_run, tmp_path):
    _, run_dir, _ = trained_run
    model_dir = tmp_path / "model"
    shutil.copytree(run_dir / "pretrain" / "final", model_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | upper }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(model_dir)
    ids, labels = encode_example(tok, {"messages": CHAT}, ChatFormat(model_dir))
    assert _trained_text(tok, ids, labels) == "BLUE<|end|>GREEN<|end|>"


def test_bad_rows_fail_with_file_row_and_reason_or_are_skipped_and_counted(trained_run, tiny_recipe, tmp_path):
    _, run_dir, _ = trained_run
    rows = [{"instruction": f"What sound does animal {i} make?", "output": f"Sound {i}."} for i in range(30)]
    rows[6] = {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match=r"sft.jsonl:7: messages\[1\]: expected \{role: system\|user\|assistant"):
        load_splits(str(path), 0.2, 0.05)
    recipe = tiny_recipe(
        f"finetune.data={path}",
        f"finetune.base={run_dir / 'pretrain' / 'final'}",
        "finetune.on_bad_rows=skip",
        "finetune.epochs=1",
        run_dir=tmp_path / "run",
    )
    metrics = run_finetune(recipe)["metrics"]
    assert metrics["skipped_rows"] == 1 and metrics["examples"] + 1 < 30
    manifest = json.loads((tmp_path / "run" / "finetune" / "manifest.json").read_text())
    assert manifest["metrics"]["skipped_rows"] == 1


def test_preview_prints_rendered_examples(trained_run, tmp_path, capsys):
    recipe_file, run_dir, _ = trained_run
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n")
    code = main(
        [
            "finetune",
            f"finetune.data={path}",
            f"finetune.base={run_dir / 'pretrain' / 'final'}",
            f"run_dir={tmp_path / 'run'}",
            "--preview",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "Colour of the sky?" in out and "Green<|end|>" in out and "1 of 1 training examples" in out
    assert not (tmp_path / "run" / "finetune").exists()


def test_classification_head_learns_and_loads_in_transformers(trained_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    from lmkiln.train.classify import load_classifier

    _, run_dir, _ = trained_run
    words = {
        "refund": ["money back", "refund please", "return the charge"],
        "ship": ["where is the parcel", "track my delivery", "when does it ship"],
        "login": ["reset my password", "cannot sign in", "locked out"],
    }
    rows = [
        {"query": f"{phrase} {i}", "intent": intent}
        for i in range(16)
        for intent, phrases in words.items()
        for phrase in phrases[i % 3 : i % 3 + 1]
    ]
    path = tmp_path / "intents.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, ["query", "intent"])
        w.writeheader()
        w.writerows(rows)
    code = main(
        [
            "-q",
            "finetune",
            "--task",
            "classify",
            f"finetune.data={path}",
            f"run_dir={tmp_path / 'run'}",
            f"finetune.base={run_dir / 'pretrain' / 'final'}",
            "finetune.columns={text: query, label: intent}",
            "finetune.epochs=6",
            "finetune.lr=3e-3",
            "finetune.batch_size=8",
            "finetune.val_fraction=0.25",
        ]
    )
    assert code == 0
    m = json.loads((tmp_path / "run" / "finetune" / "manifest.json").read_text())["metrics"]
    assert m["labels"] == ["login", "refund", "ship"] and m["val_accuracy"] > m["majority_accuracy"] + 0.3, {
        k: m[k] for k in ("examples", "val_accuracy", "majority_accuracy", "base_val_accuracy")
    }
    final = tmp_path / "run" / "finetune" / "final"
    ours, names = load_classifier(final)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(final, dtype=torch.float32).eval()
    assert hf.config.id2label[0] == names[0]
    ids = torch.tensor([[1, 40, 41, 42, 43], [1, 50, 51, 52, 53]])
    with torch.no_grad():
        assert torch.allclose(ours(ids, torch.tensor([5, 5])), hf(ids).logits, atol=1e-4)


def test_templates_make_fields_from_each_rows_columns(tmp_path):
    """A system prompt and a reply made from the row (a label as JSON), the row's own fields kept for
    rewards; a template naming a column the row lacks names the row, the field and the columns; a
    malformed template is refused when the recipe loads; a built-in source takes no templates."""
    from lmkiln.config import load_recipe

    with open(tmp_path / "intents.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["instruction", "intent"])
        w.writerow(["Where is my order?", "track_order"])
    templates = {"system": "Name the intent.", "output": '{{"intent": "{intent}"}}'}
    (ex,) = _all(load_splits(str(tmp_path / "intents.csv"), 0.5, 0.05, templates=templates))
    assert ex["output"] == '{"intent": "track_order"}' and ex["row"]["intent"] == "track_order"
    assert [m["role"] for m in ex["messages"]] == ["system", "user", "assistant"]
    assert ex["messages"][0]["content"] == "Name the intent."
    with pytest.raises(UserError, match=r"intents\.csv:2: the template of 'output' cannot be filled: KeyError 'label'"):
        load_splits(str(tmp_path / "intents.csv"), 0.5, 0.05, templates={"output": "{label}"})
    with pytest.raises(UserError, match=r"finetune\.templates.*output: Single '\}'"):
        load_recipe(None, ['finetune.templates={output: "a}"}'])
    with pytest.raises(UserError, match="built in"):
        load_splits("builtin:python-docstrings", 0.5, 0.05, templates=templates)
