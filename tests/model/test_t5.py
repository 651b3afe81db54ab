"""T5 checkpoints as transformers makes them (v1.1/Flan-T5, the original T5, mT5): imported with equal
logits, written back so transformers reads them, refused where lmkiln does not implement a value."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmkiln.cli import main
from lmkiln.model.hub import load_model
from lmkiln.model.t5 import relative_buckets

transformers = pytest.importorskip("transformers")

# 8 buckets out to distance 20: sequences of 30 reach the logarithmic buckets and the clamp
SMALL = dict(
    vocab_size=200,
    d_model=64,
    d_kv=16,
    d_ff=128,
    num_layers=2,
    num_decoder_layers=3,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
)


def _hf_dir(path, config, cls=None, own_head: bool = False):
    """A random transformers T5 saved at `path`, norms off 1 so a misplaced one shows; with `own_head`,
    an untied lm_head in the file and tie_word_embeddings false, as T5 v1.1 and Flan-T5 ship."""
    cls = cls or transformers.T5ForConditionalGeneration
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    if own_head:
        state = load_file(path / "model.safetensors")
        state["lm_head.weight"] = torch.randn(config.vocab_size, config.d_model) * 0.05
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
        written = json.loads((path / "config.json").read_text())
        written.pop("scale_decoder_outputs", None)
        (path / "config.json").write_text(json.dumps({**written, "tie_word_embeddings": False}))
        model = cls.from_pretrained(path).eval()
    return model


def _logits(model, x, y, mask):
    with torch.no_grad():
        return model(input_ids=x, decoder_input_ids=y, attention_mask=mask.long()).logits


@pytest.mark.parametrize(
    "kind,proj,own_head",
    [("t5", "gated-gelu", True), ("t5", "gated-gelu", False), ("t5", "relu", False), ("mt5", "gated-gelu", True)],
    ids=["v1.1", "v1.1-tied", "original", "mt5"],
)
def test_import_of_a_t5_directory_gives_equal_logits(tmp_path, kind, proj, own_head):
    config_cls = transformers.MT5Config if kind == "mt5" else transformers.T5Config
    cls = transformers.MT5ForConditionalGeneration if kind == "mt5" else transformers.T5ForConditionalGeneration
    hf = _hf_dir(tmp_path / "hf", config_cls(**SMALL, feed_forward_proj=proj), cls, own_head)
    assert main(["-q", "import", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    ours = load_model(tmp_path / "ours").eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(2, 200, (2, 30), generator=g), torch.randint(2, 200, (2, 12), generator=g)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 20:] = False  # the second input padded: its padding hidden from encoder and cross-attention
    expected = _logits(hf, x, y, mask)
    assert expected.std() > 0.01
    with torch.no_grad():
        assert torch.allclose(ours(x, y, mask), expected, atol=1e-4, rtol=0)
    again = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "ours").eval()
    assert type(again) is cls and torch.allclose(_logits(again, x, y, mask), expected, atol=1e-5)


@pytest.mark.parametrize("key,value", [("feed_forward_proj", "gated-swish"), ("is_encoder_decoder", False)])
def test_import_refuses_t5_values_it_does_not_implement(tmp_path, capsys, key, value):
    _hf_dir(tmp_path / "hf", transformers.T5Config(**SMALL, feed_forward_proj="gated-gelu"))
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    assert main(["-q", "import", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 2
    assert f"{key}=" in capsys.readouterr().err and not (tmp_path / "ours").exists()


def test_relative_buckets_are_exact_near_and_logarithmic_far():
    offsets = torch.arange(-40, 41)
    both = relative_buckets(offsets, True, 32, 128)
    assert both[40].item() == 0 and both[41].item() == 17 and both[39].item() == 1  # 0, +1, -1
    assert len(set(both[40:48].tolist())) == 8  # offsets 0..7 each their own bucket
    causal = relative_buckets(offsets, False, 32, 128)
    assert (causal[41:] == 0).all() and causal[:40].max().item() <= 31  # the future shares bucket 0
    far = relative_buckets(torch.tensor([-1000, -128, 1000]), True, 32, 128)
    assert far[0].item() == 15 and far[1].item() == 15 and far[2].item() == 31  # past max_distance: the last


T5_RUN = ["tokenizer.kind=t5", "model.arch=t5", "pretrain.seq_len=48"]


@pytest.fixture
def t5_run(tiny_recipe, tmp_path):
    from lmkiln import data, tokenizer

    def make(name="run"):
        recipe = tiny_recipe(*T5_RUN, run_dir=tmp_path / name)
        data.run(recipe)
        tokenizer.run(recipe)
        return recipe

    return make


def test_span_corruption_pretraining_writes_a_directory_transformers_loads(t5_run):
    from lmkiln.train import run_pretrain
    from lmkiln.train.metrics import read_metrics

    recipe = t5_run()
    manifest = run_pretrain(recipe)
    losses = [r["loss"] for r in read_metrics(recipe.run_dir / "pretrain" / "metrics.jsonl") if "loss" in r]
    assert manifest["metrics"]["steps"] == 12 and losses[-1] < losses[0]
    final = recipe.run_dir / "pretrain" / "final"
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(final, dtype=torch.float32).eval()
    assert type(hf).__name__ == "T5ForConditionalGeneration"
    ours = load_model(final).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(3, 400, (2, 40), generator=g), torch.randint(3, 400, (2, 10), generator=g)
    mask = torch.ones(2, 40, dtype=torch.bool)
    assert torch.allclose(ours(x, y, mask), _logits(hf, x, y, mask), atol=1e-4, rtol=0)
    tok = transformers.AutoTokenizer.from_pretrained(final)
    assert tok.convert_ids_to_tokens(tok("a b")["input_ids"])[-1] == "</s>" and tok.pad_token_id == 0
    assert tok.convert_tokens_to_ids("<extra_id_0>") == ours.args.vocab_size - 1


def test_span_corruption_pretraining_resumes_bit_for_bit(t5_run, tmp_path):
    import shutil

    from lmkiln.train import pretrain as pretrain_stage
    from lmkiln.train import run_pretrain
    from lmkiln.train.metrics import read_metrics

    class Killed(Exception):
        pass

    recipe = t5_run()
    reference = recipe.model_copy(update={"run_dir": tmp_path / "ref"})
    shutil.copytree(recipe.run_dir, reference.run_dir)
    run_pretrain(reference)
    out = recipe.run_dir / "pretrain"
    out.mkdir()

    def kill_at_10(step):
        if step == 10:
            raise Killed

    with pytest.raises(Killed):
        pretrain_stage.build(recipe, recipe.run_dir, out, on_step=kill_at_10)
    assert run_pretrain(recipe)["metrics"]["resumed_from"] == 8
    logged = [read_metrics(r.run_dir / "pretrain" / "metrics.jsonl") for r in (recipe, reference)]
    assert [(r["step"], r["loss"]) for r in logged[0] if "loss" in r] == [
        (r["step"], r["loss"]) for r in logged[1] if "loss" in r
    ]
    a, b = (load_model(r.run_dir / "pretrain" / "final").state_dict() for r in (recipe, reference))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_estimate_of_a_t5_recipe_counts_both_stacks(t5_run, capsys):
    from lmkiln.model.t5 import build_t5_args
    from lmkiln.train.estimate import estimate
    from tests.conftest import TINY

    recipe = t5_run()
    est = estimate(recipe)
    vocab = json.loads((recipe.run_dir / "tokenizer" / "train.json").read_text())["vocab_size"]
    args = build_t5_args(recipe.model, vocab, {"pad": 0, "eos": 1})
    # 48 inputs come from windows of 52 tokens, whose targets are 12 long
    assert est["parameters"] == args.num_params() and est["flops_per_token"] == args.flops_per_token(48, 12)
    assert 0 < est["memory_bytes"]["activations"] < est["memory_bytes"]["total"]
    assert main(["estimate", *TINY, f"run_dir={recipe.run_dir}", *T5_RUN]) == 0
    assert "memory: total" in capsys.readouterr().out
