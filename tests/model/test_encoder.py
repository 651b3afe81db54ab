"""The ModernBERT encoder: transformers loads what lmkiln writes with equal logits, packed documents do
not see each other, and masked-language pretraining runs, resumes bit for bit and splits over ranks."""

import json
import shutil

import numpy as np
import pytest
import torch

from lmkiln import data, tokenizer
from lmkiln.errors import UserError
from lmkiln.model.families.encoder import Encoder, EncoderArgs
from lmkiln.model.io.hub import load_model
from lmkiln.model.loss import IGNORE
from lmkiln.model.masking import mask_tokens
from lmkiln.train import pretrain as pretrain_stage
from lmkiln.train import run_pretrain
from lmkiln.train.metrics import read_metrics
from tests.conftest import TINY
from tests.train.test_distributed import torchrun

ENCODER = ["tokenizer.kind=encoder", "model.arch=modernbert", "model.local_attention=16", "model.num_layers=4"]


@pytest.fixture
def encoder_run(tiny_recipe, tmp_path):
    def make(name="run", *extra):
        recipe = tiny_recipe(*ENCODER, *extra, run_dir=tmp_path / name)
        data.run(recipe)
        tokenizer.run(recipe)
        return recipe

    return make


def _random_encoder(seed=0) -> Encoder:
    args = EncoderArgs(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_layers=4,
        num_heads=4,
        max_seq_len=128,
        local_attention=16,
        pad_token_id=0,
        cls_token_id=1,
        sep_token_id=2,
    )
    model = Encoder(args)
    model.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # norms and bias off their initial values, so a misplaced one shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return model.eval()


def test_packed_documents_equal_each_document_alone():
    model = _random_encoder()
    a, b = torch.randint(3, 300, (1, 30)), torch.randint(3, 300, (1, 25))
    packed = torch.cat([a, b], dim=1)
    segments = torch.tensor([[0] * 30 + [1] * 25])
    with torch.no_grad():
        together = model(packed, segments=segments)
        alone = torch.cat([model(a), model(b)], dim=1)
    assert torch.allclose(together, alone, atol=1e-5)


def test_mask_tokens_follows_80_10_10_and_spares_special_tokens():
    rng = np.random.default_rng(0)
    window = rng.integers(3, 1000, size=200_000)
    window[::50] = 1  # [CLS] and [SEP] now and then: never chosen
    window[1::50] = 2
    x, y = mask_tokens(window, rng, 0.3, mask_id=999, vocab_size=1000, special=np.array([0, 1, 2]))
    chosen = y != IGNORE
    assert not chosen[window < 3].any() and abs(chosen.mean() / (window >= 3).mean() - 0.3) < 0.01
    assert (y[chosen] == window[chosen]).all() and (x[~chosen] == window[~chosen]).all()
    masked, kept = (x[chosen] == 999).mean(), (x[chosen] == window[chosen]).mean()
    assert abs(masked - 0.8) < 0.01 and 0.09 < kept < 0.11  # a random draw may repeat the token: ~0.1


@pytest.mark.slow
def test_mlm_pretraining_writes_a_directory_transformers_loads_with_equal_logits(encoder_run):
    transformers = pytest.importorskip("transformers")
    recipe = encoder_run()
    manifest = run_pretrain(recipe)
    losses = [r["loss"] for r in read_metrics(recipe.run_dir / "pretrain" / "metrics.jsonl") if "loss" in r]
    assert manifest["metrics"]["steps"] == 12 and losses[-1] < losses[0]
    final = recipe.run_dir / "pretrain" / "final"
    assert json.loads((final / "config.json").read_text())["architectures"] == ["ModernBertForMaskedLM"]
    hf = transformers.AutoModelForMaskedLM.from_pretrained(final, dtype=torch.float32).eval()
    ours = load_model(final).eval()
    x = torch.randint(0, ours.args.vocab_size, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours(x), hf(x).logits, atol=1e-4, rtol=0)
    tok = transformers.AutoTokenizer.from_pretrained(final)
    pair = tok.convert_ids_to_tokens(tok("a b", "c")["input_ids"])
    assert pair[0] == "[CLS]" and pair.count("[SEP]") == 2 and pair[-1] == "[SEP]" and tok.mask_token == "[MASK]"


class Killed(Exception):
    """Stands in for SIGKILL: the loop dies without saving."""


def assert_pretraining_resumes_bit_for_bit(recipe, tmp_path) -> None:
    """Killed at step 10, resumed from the step-8 checkpoint: the same logged losses and final weights as an
    uninterrupted run of the same prepared recipe (any objective: decoder, masked-LM, span corruption)."""
    reference = recipe.model_copy(update={"run_dir": tmp_path / "ref"})
    shutil.copytree(recipe.run_dir, reference.run_dir)
    run_pretrain(reference)
    out = recipe.run_dir / "pretrain"
    out.mkdir()

    def kill_at_10(step):
        if step == 10:
            raise Killed

    with pytest.raises(Killed):
        pretrain_stage.build(recipe, out, on_step=kill_at_10)
    assert run_pretrain(recipe)["metrics"]["resumed_from"] == 8
    logged = [read_metrics(r.run_dir / "pretrain" / "metrics.jsonl") for r in (recipe, reference)]
    assert [(r["step"], r["loss"]) for r in logged[0] if "loss" in r] == [
        (r["step"], r["loss"]) for r in logged[1] if "loss" in r
    ]
    a, b = (load_model(r.run_dir / "pretrain" / "final").state_dict() for r in (recipe, reference))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_mlm_pretraining_resumes_bit_for_bit(encoder_run, tmp_path):
    assert_pretraining_resumes_bit_for_bit(encoder_run(), tmp_path)


@pytest.mark.slow
def test_mlm_ddp_two_ranks_equal_one_rank_with_double_accumulation(encoder_run, tmp_path):
    steps = ["pretrain.max_steps=4", "pretrain.checkpoint_every=100", "pretrain.eval_every=2"]
    single = encoder_run("single", "pretrain.batch_tokens=512", *steps)
    run_pretrain(single)
    ddp_dir = tmp_path / "ddp"
    shutil.copytree(single.run_dir, ddp_dir)
    shutil.rmtree(ddp_dir / "pretrain")
    res = torchrun(ddp_dir, *ENCODER, "pretrain.batch_tokens=512", *steps, "pretrain.strategy=ddp")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "1 accum × 2 ranks" in res.stderr
    a, b = (load_model(d / "pretrain" / "final").state_dict() for d in (ddp_dir, single.run_dir))
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), (key, (a[key] - b[key]).abs().max())


@pytest.mark.slow
def test_an_encoder_needs_an_encoder_vocabulary(tiny_recipe):
    recipe = tiny_recipe("model.arch=modernbert")
    data.run(recipe)
    tokenizer.run(recipe)
    with pytest.raises(UserError, match="model.arch=modernbert needs an encoder vocabulary"):
        run_pretrain(recipe)


def test_masked_loss_equals_transformers_loss_and_gradient(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmkiln.model.io.hub import save_model
    from lmkiln.model.loss import next_token_losses

    model = _random_encoder()
    save_model(model, tmp_path)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, dtype=torch.float32)
    rng = np.random.default_rng(1)
    window = rng.integers(3, 300, size=(2, 48))
    x, y = (torch.from_numpy(t.astype(np.int64)) for t in mask_tokens(window, rng, 0.3, 299, 300, np.array([0, 1, 2])))
    model.train()
    losses, _ = next_token_losses(model, x, y, model.decoder.weight, bias=model.decoder.bias)
    losses.mean().backward()
    theirs = hf(x, labels=y).loss
    theirs.backward()
    assert torch.allclose(losses.mean(), theirs, atol=1e-5)
    ours_grad = {n: p.grad for n, p in model.named_parameters()}
    for name, p in hf.named_parameters():
        assert torch.allclose(ours_grad[name], p.grad, atol=1e-5), name


@pytest.mark.slow
@pytest.mark.parametrize("method,pooling", [("full", "cls"), ("lora", "cls"), ("full", "mean")])
def test_encoder_classifier_learns_and_loads_in_transformers(encoder_run, tmp_path, method, pooling):
    import csv

    transformers = pytest.importorskip("transformers")
    from lmkiln.cli import main
    from lmkiln.train.classify import load_classifier

    recipe = encoder_run()
    run_pretrain(recipe)
    words = {
        "refund": ["money back", "refund please", "return the charge"],
        "ship": ["where is the parcel", "track my delivery", "when does it ship"],
        "login": ["reset my password", "cannot sign in", "locked out"],
    }
    rows = [
        {"query": f"{p} {i}", "intent": k} for i in range(16) for k, ps in words.items() for p in ps[i % 3 : i % 3 + 1]
    ]
    path = tmp_path / "intents.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, ["query", "intent"])
        w.writeheader()
        w.writerows(rows)
    run = tmp_path / f"tuned-{method}-{pooling}"
    code = main(
        [
            "-q",
            "finetune",
            "--task",
            "classify",
            *TINY,
            *ENCODER,
            f"finetune.data={path}",
            f"run_dir={run}",
            f"finetune.base={recipe.run_dir / 'pretrain' / 'final'}",
            "finetune.columns={text: query, label: intent}",
            "finetune.epochs=12",
            "finetune.lr=3e-3",
            "finetune.batch_size=8",
            "finetune.val_fraction=0.25",
            f"finetune.method={method}",
            "finetune.lora.r=8",
            f"finetune.pooling={pooling}",
        ]
    )
    assert code == 0
    m = json.loads((run / "finetune" / "manifest.json").read_text())["metrics"]
    final = run / "finetune" / "final"
    ours, names = load_classifier(final)
    if method == "full":
        assert m["val_accuracy"] > m["majority_accuracy"] + 0.2, {
            k: m[k] for k in ("val_accuracy", "majority_accuracy")
        }
    else:  # adapters on Wqkv, Wo, Wi and the head train; merged into the weights transformers reads below
        assert m["trainable_parameters"] < 0.25 * sum(p.numel() for p in ours.parameters())
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(final, dtype=torch.float32).eval()
    assert type(hf).__name__ == "ModernBertForSequenceClassification" and hf.config.id2label[0] == names[0]
    assert hf.config.classifier_pooling == pooling == ours.pooling
    ids = torch.tensor([[1, 40, 41, 42, 43, 2], [1, 50, 51, 2, 0, 0]])  # the second row padded
    with torch.no_grad():
        theirs = hf(ids, attention_mask=(torch.arange(6) < torch.tensor([[6], [4]])).long()).logits
        assert torch.allclose(ours(ids, torch.tensor([6, 4])), theirs, atol=1e-4)


def _modernbert_config(transformers, **values):
    """A small ModernBERT config as transformers makes one, with special ids inside its vocabulary."""
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    return transformers.ModernBertConfig(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_attention_heads=4, **ids, **values
    )


def test_import_of_a_modernbert_directory_transformers_made(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmkiln.cli import main

    config = _modernbert_config(transformers, num_hidden_layers=3, max_position_embeddings=128, local_attention=16)
    torch.manual_seed(0)
    hf = transformers.ModernBertForMaskedLM(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert main(["-q", "import", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    ours = load_model(tmp_path / "ours").eval()
    x = torch.randint(0, 320, (2, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(ours(x), hf(x).logits, atol=1e-4, rtol=0)


def test_import_refuses_modernbert_values_it_does_not_implement(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmkiln.cli import main

    config = _modernbert_config(transformers, num_hidden_layers=2, hidden_activation="silu")
    transformers.ModernBertForMaskedLM(config).save_pretrained(tmp_path / "hf")
    with pytest.raises(UserError, match="hidden_activation=.silu."):
        from lmkiln.model.io.hub import read_args

        read_args(tmp_path / "hf")
    assert (
        main(["-q", "import", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 2 and not (tmp_path / "ours").exists()
    )


def _tagging_rows(n: int) -> list[dict]:
    first, last = ["Alice", "Bruno", "Chen", "Dana", "Emil", "Fatima"], ["Smith", "Rossi", "Wang", "Levi", "Berg"]
    cities = ["Paris", "Lagos", "Osaka", "Lima", "Oslo", "Quito", "Hanoi"]
    verbs = ["lives in", "flew to", "works near", "moved to"]
    rows = []
    for i in range(n):
        name = [first[i % 6], last[(i // 6) % 5]]
        verb = verbs[i % 4].split()
        words = name + verb + [cities[(i * 3) % 7]]
        tags = ["B-PER", "I-PER"] + ["O"] * len(verb) + ["B-LOC"]
        if i % 3 == 0:  # some sentences open with a place, so position alone does not tell
            words, tags = ["In", cities[i % 7], ","] + words, ["O", "B-LOC", "O"] + tags
        rows.append({"tokens": words, "tags": tags})
    return rows


@pytest.mark.slow
def test_tagging_learns_entities_and_loads_in_transformers(encoder_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmkiln.cli import main
    from lmkiln.model.io.hub import load_encoder_classifier

    recipe = encoder_run()
    run_pretrain(recipe)
    path = tmp_path / "entities.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _tagging_rows(120)))
    run = tmp_path / "tagged"
    code = main(
        [
            "-q",
            "finetune",
            "--task",
            "tag",
            *TINY,
            *ENCODER,
            f"finetune.data={path}",
            f"run_dir={run}",
            f"finetune.base={recipe.run_dir / 'pretrain' / 'final'}",
            "finetune.epochs=10",
            "finetune.lr=3e-3",
            "finetune.batch_size=8",
            "finetune.val_fraction=0.2",
        ]
    )
    assert code == 0
    m = json.loads((run / "finetune" / "manifest.json").read_text())["metrics"]
    assert m["labels"] == ["B-LOC", "B-PER", "I-PER", "O"]
    assert m["val_entity_f1"] > 0.9 and m["val_entity_f1"] > m["base_val_entity_f1"] + 0.5, m
    final = run / "finetune" / "final"
    ours, names = load_encoder_classifier(final)
    hf = transformers.AutoModelForTokenClassification.from_pretrained(final, dtype=torch.float32).eval()
    assert type(hf).__name__ == "ModernBertForTokenClassification" and hf.config.id2label[1] == names[1]
    ids = torch.tensor([[1, 40, 41, 42, 2], [1, 50, 2, 0, 0]])
    with torch.no_grad():
        theirs = hf(ids, attention_mask=(torch.arange(5) < torch.tensor([[5], [3]])).long()).logits
        ours_logits = ours(ids, torch.tensor([5, 3]))
    assert torch.allclose(ours_logits[0], theirs[0], atol=1e-4)
    assert torch.allclose(ours_logits[1, :3], theirs[1, :3], atol=1e-4)  # padding's own outputs are nobody's


@pytest.mark.slow
def test_a_broken_conll_row_is_named_by_file_and_line(encoder_run, tmp_path, capsys):
    from lmkiln.cli import main

    recipe = encoder_run()
    run_pretrain(recipe)
    path = tmp_path / "ner.conll"
    path.write_text("Alice B-PER\nlives O\n\nBruno B-PER\nParis\n")
    code = main(
        [
            "finetune",
            "--task",
            "tag",
            *TINY,
            *ENCODER,
            f"finetune.data={path}",
            f"run_dir={recipe.run_dir}",
            f"finetune.base={recipe.run_dir / 'pretrain' / 'final'}",
        ]
    )
    assert code == 2 and f"{path}:5: expected a word and its tag" in capsys.readouterr().err
    bad = tmp_path / "tags.jsonl"
    bad.write_text(json.dumps({"tokens": ["a", "b"], "tags": ["O", "X-PER"]}) + "\n")
    code = main(
        [
            "finetune",
            "--task",
            "tag",
            *TINY,
            *ENCODER,
            f"finetune.data={bad}",
            f"run_dir={recipe.run_dir}",
            f"finetune.base={recipe.run_dir / 'pretrain' / 'final'}",
        ]
    )
    assert code == 2 and f"{bad}:1: tag 2 ('X-PER') is not BIO" in capsys.readouterr().err


def test_entity_scores_count_as_seqeval_does():
    from lmkiln.eval.tagging import entities, entity_scores

    assert entities(["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC"]) == {("PER", 0, 1), ("LOC", 3, 4), ("LOC", 5, 5)}
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    scores = entity_scores([["B-PER", "O", "O", "B-LOC"]], gold)  # the person cut short: wrong
    assert scores == {"entity_precision": 0.5, "entity_recall": 0.5, "entity_f1": 0.5}


def test_mean_pooling_is_refused_on_a_decoder(trained_run):
    from types import SimpleNamespace

    from lmkiln.train.classify import _new_classifier

    _, run_dir, _ = trained_run
    cfg = SimpleNamespace(method="full", pooling="mean", gradient_checkpointing=False)
    with pytest.raises(UserError, match="finetune.pooling=mean applies to an encoder"):
        _new_classifier(run_dir / "pretrain" / "final", 3, cfg, "cpu")


def test_whole_word_masking_masks_every_sub_token_of_a_chosen_word():
    rng = np.random.default_rng(0)
    word_start = np.zeros(1000, dtype=bool)
    word_start[500:] = True  # ids 500+ begin words, ids below continue them
    window = np.where(rng.random(100_000) < 0.4, rng.integers(500, 1000, 100_000), rng.integers(3, 500, 100_000))
    x, y = mask_tokens(window, rng, 0.3, 999, 1000, np.array([0, 1, 2]), word_start)
    chosen = y != IGNORE
    word = np.cumsum(word_start[window])
    per_word = {}
    for w, c in zip(word.tolist(), chosen.tolist()):
        per_word.setdefault(w, set()).add(c)
    assert all(len(v) == 1 for v in per_word.values())  # a word is masked whole or not at all
    assert abs(np.mean([next(iter(v)) for v in per_word.values()]) - 0.3) < 0.02


@pytest.mark.slow
def test_whole_word_masked_pretraining_runs(encoder_run):
    recipe = encoder_run("run", "pretrain.whole_word_mask=true", "pretrain.max_steps=6")
    manifest = run_pretrain(recipe)
    assert manifest["metrics"]["steps"] == 6 and manifest["metrics"]["val_loss"] > 0
