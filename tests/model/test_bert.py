"""Classic BERT and RoBERTa checkpoints as transformers makes them: imported with equal logits, refused
where lmkiln does not implement a value, and fine-tuned into directories transformers loads back."""

import csv
import json
import shutil

import pytest
import torch

from lmkiln.cli import main
from lmkiln.errors import UserError
from lmkiln.model.io.hub import load_model, read_args
from lmkiln.tokenizer.train import save_tokenizer, special_ids, train_bpe

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
INTENTS = {
    "refund": ["money back", "refund please", "return the charge"],
    "ship": ["where is the parcel", "track my delivery", "when does it ship"],
    "login": ["reset my password", "cannot sign in", "locked out"],
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """An encoder vocabulary ([CLS] [SEP] [MASK] [PAD]) trained on the intents' words."""
    texts = [" ".join(p for ps in INTENTS.values() for p in ps)] * 20 + ["In Paris Alice Smith flew to Lima"] * 20
    tok = train_bpe(texts, 300, kind="encoder")
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(tok, out)
    return out, tok


def _perturbed(model):
    """Norms and biases off their initial values (1 and 0), so a misplaced one shows."""
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted(model.named_parameters())):
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    return model.eval()


def _hf_dir(family: str, path, tokenizer_dir=None, cls_name: str | None = None):
    """A random transformers checkpoint of `family` (bert or roberta) saved at `path`, with the test
    vocabulary's tokenizer when one is given."""
    if tokenizer_dir is not None:
        tok_dir, tok = tokenizer_dir
        vocab, pad = tok.get_vocab_size(), special_ids(tok)["pad"]
    else:
        tok_dir, vocab, pad = None, 300, 1
    if family == "bert":
        config = transformers.BertConfig(vocab_size=vocab, max_position_embeddings=64, pad_token_id=pad, **SMALL)
    else:
        config = transformers.RobertaConfig(
            vocab_size=vocab, max_position_embeddings=64 + pad + 1, pad_token_id=pad, type_vocab_size=1, **SMALL
        )
    cls = getattr(transformers, cls_name or f"{family.capitalize()}ForMaskedLM")
    torch.manual_seed(0)
    model = _perturbed(cls(config))
    model.save_pretrained(path)
    if tok_dir is not None:
        for f in tok_dir.iterdir():
            shutil.copy(f, path / f.name)
    return model


@pytest.mark.parametrize("family,cls_name", [("bert", None), ("roberta", None), ("bert", "BertModel")])
def test_import_of_bert_roberta_and_bert_model_gives_equal_outputs(tmp_path, family, cls_name):
    hf = _hf_dir(family, tmp_path / "hf", cls_name=cls_name)
    assert main(["-q", "import", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    ours = load_model(tmp_path / "ours").eval()
    x = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(1))  # no padding id
    mask = (torch.arange(40) < torch.tensor([[40], [25]])).long()
    with torch.no_grad():
        if cls_name == "BertModel":  # no masked-LM head: the final hidden states
            assert torch.allclose(ours.hidden_states(x), hf(x).last_hidden_state, atol=1e-4, rtol=0)
        else:
            assert torch.allclose(ours(x), hf(x).logits, atol=1e-4, rtol=0)
        theirs = hf(x, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        hidden, _ = ours.padded_states(x, torch.tensor([40, 25]))
        assert torch.allclose(hidden[1, :25], theirs[1, :25], atol=1e-4, rtol=0)  # a padded row as transformers
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["architectures"] == [cls_name or f"{family.capitalize()}ForMaskedLM"]
    again = getattr(transformers, cls_name or "AutoModelForMaskedLM").from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        out = again(x)
        assert torch.allclose(out[0], hf(x)[0], atol=1e-5)  # what lmkiln wrote, transformers reads


def test_an_original_bert_checkpoint_layout_imports(tmp_path):
    """The layout of the first BERT releases (bert-base-uncased): BertForPreTraining's weights in a .bin,
    LayerNorm gamma/beta, the pooler and next-sentence head, a position_ids buffer."""
    hf = _hf_dir("bert", tmp_path / "mlm")
    pre = transformers.BertForPreTraining(hf.config)
    pre.load_state_dict(hf.state_dict(), strict=False)
    state = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in pre.state_dict().items()
    }
    state["bert.embeddings.position_ids"] = torch.arange(64)[None]
    (tmp_path / "old").mkdir()
    torch.save(state, tmp_path / "old" / "pytorch_model.bin")
    config = json.loads((tmp_path / "mlm" / "config.json").read_text())
    (tmp_path / "old" / "config.json").write_text(json.dumps({**config, "architectures": ["BertForPreTraining"]}))
    assert main(["-q", "import", str(tmp_path / "old"), str(tmp_path / "ours")]) == 0
    ours = load_model(tmp_path / "ours").eval()
    x = torch.randint(3, 300, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(ours(x), hf(x).logits, atol=1e-4, rtol=0)
    assert torch.equal(ours.bert.pooler["dense"].weight, pre.bert.pooler.dense.weight)  # kept for a classifier


@pytest.mark.parametrize(
    "family,key,value",
    [
        ("bert", "hidden_act", "relu"),
        ("bert", "position_embedding_type", "relative_key"),
        ("roberta", "is_decoder", True),
    ],
)
def test_import_refuses_bert_values_it_does_not_implement(tmp_path, capsys, family, key, value):
    _hf_dir(family, tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    with pytest.raises(UserError, match=f"{key}="):
        read_args(tmp_path / "hf")
    assert main(["-q", "import", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 2
    assert key in capsys.readouterr().err and not (tmp_path / "ours").exists()


def _intents_csv(path):
    rows = [{"query": f"{p} {i}", "intent": k} for i in range(40) for k, ps in INTENTS.items() for p in ps[i % 3 :][:1]]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, ["query", "intent"])
        w.writeheader()
        w.writerows(rows)
    return path


CLASSIFY = [
    "finetune.columns={text: query, label: intent}",
    "finetune.epochs=10",
    "finetune.lr=1e-3",
    "finetune.warmup_steps=5",
    "finetune.batch_size=8",
    "finetune.val_fraction=0.25",
    "finetune.max_seq_len=32",
]


def _tuned_classifier(tmp_path, tokenizer_dir, family: str):
    """An imported random checkpoint of `family` and the classifier fine-tuned from it: (run dir, data)."""
    _hf_dir(family, tmp_path / "hf", tokenizer_dir)
    assert main(["-q", "import", str(tmp_path / "hf"), str(tmp_path / "base")]) == 0
    run, data = tmp_path / "run", _intents_csv(tmp_path / "intents.csv")
    args = ["-q", "finetune", "--task", "classify", f"run_dir={run}", f"finetune.data={data}"]
    assert main([*args, f"finetune.base={tmp_path / 'base'}", *CLASSIFY]) == 0
    return run, data


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_imported_encoder_fine_tunes_into_a_classifier_transformers_loads(tmp_path, tokenizer_dir, family):
    run, _ = _tuned_classifier(tmp_path, tokenizer_dir, family)
    m = json.loads((run / "finetune" / "manifest.json").read_text())["metrics"]
    assert m["val_accuracy"] > m["majority_accuracy"] + 0.2, m
    from lmkiln.train.classify import load_classifier

    final = run / "finetune" / "final"
    ours, names = load_classifier(final)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(final, dtype=torch.float32).eval()
    assert type(hf).__name__ == f"{family.capitalize()}ForSequenceClassification"
    assert hf.config.id2label[0] == names[0]
    pad = special_ids(tokenizer_dir[1])["pad"]
    ids = torch.tensor([[5, 40, 41, 42, 43, 6], [5, 50, 51, 6, pad, pad]])
    with torch.no_grad():
        theirs = hf(ids, attention_mask=(torch.arange(6) < torch.tensor([[6], [4]])).long()).logits
        assert torch.allclose(ours(ids, torch.tensor([6, 4])), theirs, atol=1e-4)


def test_imported_bert_fine_tunes_a_tagger_transformers_loads(tmp_path, tokenizer_dir):
    from lmkiln.model.io.hub import load_encoder_classifier
    from tests.model.test_encoder import _tagging_rows

    _hf_dir("bert", tmp_path / "hf", tokenizer_dir)
    assert main(["-q", "import", str(tmp_path / "hf"), str(tmp_path / "base")]) == 0
    path = tmp_path / "entities.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _tagging_rows(120)))
    run = tmp_path / "run"
    code = main(
        [
            "-q",
            "finetune",
            "--task",
            "tag",
            f"run_dir={run}",
            f"finetune.data={path}",
            f"finetune.base={tmp_path / 'base'}",
            "finetune.epochs=12",
            "finetune.lr=2e-3",
            "finetune.warmup_steps=5",
            "finetune.batch_size=8",
            "finetune.val_fraction=0.2",
        ]
    )
    assert code == 0
    m = json.loads((run / "finetune" / "manifest.json").read_text())["metrics"]
    assert m["val_entity_f1"] > 0.9, m
    final = run / "finetune" / "final"
    ours, _ = load_encoder_classifier(final)
    hf = transformers.AutoModelForTokenClassification.from_pretrained(final, dtype=torch.float32).eval()
    assert type(hf).__name__ == "BertForTokenClassification"
    ids = torch.tensor([[5, 40, 41, 42, 6]])
    with torch.no_grad():
        assert torch.allclose(ours(ids, torch.tensor([5])), hf(ids).logits, atol=1e-4)
    out = tmp_path / "eval"
    ev = ["-q", "eval", f"run_dir={run}", "finetune.val_fraction=0.2", "--models", str(final), "--tasks"]
    assert main([*ev, f"gen:{path}@val", "--out", str(out)]) == 0
    scores = json.loads((out / "eval.json").read_text())["finetune/final"]["entities@val"]
    assert scores["entity_f1"] == pytest.approx(m["val_entity_f1"], abs=1e-4)


def test_mean_pooling_is_refused_on_bert(tmp_path, tokenizer_dir, capsys):
    _hf_dir("bert", tmp_path / "hf", tokenizer_dir)
    code = main(
        [
            "-q",
            "finetune",
            "--task",
            "classify",
            f"run_dir={tmp_path / 'run'}",
            f"finetune.data={_intents_csv(tmp_path / 'intents.csv')}",
            f"finetune.base={tmp_path / 'hf'}",
            "finetune.columns={text: query, label: intent}",
            "finetune.pooling=mean",
        ]
    )
    assert code == 2 and "finetune.pooling=mean" in capsys.readouterr().err


def test_eval_puts_a_base_encoder_beside_its_classifier(tmp_path, tokenizer_dir, capsys):
    """The base's masked-LM loss on held-out text, the tuned classifier's accuracy on the rows fine-tuning
    held out: the same accuracy the fine-tuning reported, each model "–" where its head gives nothing."""
    run, data = _tuned_classifier(tmp_path, tokenizer_dir, "bert")
    text = tmp_path / "text.txt"
    text.write_text("where is the parcel, I want my money back and cannot sign in. " * 40)
    out = tmp_path / "eval"
    code = main(
        [
            "-q",
            "eval",
            f"run_dir={run}",
            f"eval.text={text}",
            "eval.seq_len=32",
            "pretrain.mask_rate=0.15",
            *CLASSIFY,
            "--models",
            str(tmp_path / "base"),
            str(run / "finetune" / "final"),
            "--tasks",
            "perplexity",
            f"gen:{data}@val",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    base, tuned = json.loads((out / "eval.json").read_text()).values()
    assert 0 < base["mlm"]["loss"] < 20 and base["mlm"]["mask_rate"] == 0.15 and "intents@val" not in base
    assert "mlm" not in tuned
    m = json.loads((run / "finetune" / "manifest.json").read_text())["metrics"]
    assert tuned["intents@val"]["accuracy"] == pytest.approx(m["val_accuracy"], abs=1e-4)
    assert tuned["intents@val"]["majority_accuracy"] == pytest.approx(m["majority_accuracy"], abs=1e-4)
    table = (out / "eval.md").read_text()
    assert "held-out MLM loss" in table and "intents@val accuracy" in table and "–" in table


def test_serve_answers_classify_on_a_tuned_roberta_and_embeddings_on_its_base(tmp_path, tokenizer_dir):
    import httpx

    from lmkiln.model.families.encoder import mean_embeddings
    from lmkiln.serve.app import create_app
    from lmkiln.train.classify import load_classifier
    from tests.serve.conftest import serving

    run, _ = _tuned_classifier(tmp_path, tokenizer_dir, "roberta")
    final, tok = run / "finetune" / "final", tokenizer_dir[1]
    ours, names = load_classifier(final)
    row = tok.encode("where is the parcel").ids
    with serving(create_app(final, device="cpu", name="intents")) as url:
        item = httpx.post(url + "/v1/classify", json={"input": ["where is the parcel"]}).json()["data"][0]
    with torch.no_grad():
        probs = ours(torch.tensor([row]), torch.tensor([len(row)])).softmax(-1)[0]
    assert item["label"] == names[int(probs.argmax())] and abs(item["scores"][names[0]] - float(probs[0])) < 1e-5
    with serving(create_app(tmp_path / "base", device="cpu", name="base")) as url:
        r = httpx.post(url + "/v1/embeddings", json={"input": "where is the parcel"})
    expected = mean_embeddings(load_model(tmp_path / "base").eval(), [row])[0]
    assert torch.allclose(torch.tensor(r.json()["data"][0]["embedding"]), expected, atol=1e-5)
