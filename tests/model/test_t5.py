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
