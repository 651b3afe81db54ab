import pytest
import torch

from lmkiln.model.io.hub import save_model
from lmkiln.model.lora import apply_lora, merge_lora, save_adapter
from tests.model.test_transformer import tiny

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _trained_lora():
    model = tiny()
    wrapped = apply_lora(model, TARGETS, r=4, alpha=8, dropout=0.0)
    assert len(wrapped) == 2 * len(TARGETS)
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    with torch.no_grad():  # stand-in for training: make B non-zero so the adapter matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    return model


def test_merge_keeps_outputs():
    model = _trained_lora()
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        before = model(x)
        merge_lora(model)
        after = model(x)
    assert torch.allclose(before, after, atol=1e-5)
    assert not any("lora_" in n for n, _ in model.named_parameters())


def test_adapter_loads_in_peft_with_equal_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    save_model(tiny(), tmp_path / "base")
    model = _trained_lora()
    (tmp_path / "adapter").mkdir()
    save_adapter(model, tmp_path / "adapter", str(tmp_path / "base"), 4, 8, 0.0, TARGETS)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert torch.allclose(model(x), hf(input_ids=x).logits, atol=1e-4)


def _trained_dora():
    model = tiny()
    apply_lora(model, TARGETS, r=4, alpha=8, dropout=0.0, dora=True)
    with torch.no_grad():  # stand-in for training: move B and the magnitudes off their initial values
        for n, p in model.named_parameters():
            if "lora_B" in n or "magnitude" in n:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
    return model


def test_dora_starts_equal_to_the_base_and_merges_exactly():
    x = torch.randint(0, 97, (2, 16))
    base, dora = tiny(), tiny()
    apply_lora(dora, TARGETS, r=4, alpha=8, dropout=0.0, dora=True)
    with torch.no_grad():
        assert torch.allclose(base(x), dora(x), atol=1e-5)
        model = _trained_dora()
        before = model(x)
        merge_lora(model)
        assert torch.allclose(before, model(x), atol=1e-4)


def test_dora_adapter_loads_in_peft_and_merges_on_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lmkiln.model.convert.export import merged_adapter

    save_model(tiny(), tmp_path / "base")
    model = _trained_dora()
    (tmp_path / "adapter").mkdir()
    save_adapter(model, tmp_path / "adapter", str(tmp_path / "base"), 4, 8, 0.0, TARGETS, dora=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        ours = model(x)
        assert torch.allclose(ours, hf(input_ids=x).logits, atol=1e-4)
        merged, _ = merged_adapter(tmp_path / "adapter", None)
        assert torch.allclose(ours, merged(x), atol=1e-4)
