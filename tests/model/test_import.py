"""`kiln import`: tiny random models of each family, saved by transformers (single and sharded, fp32 and
bf16, safetensors and .bin), imported, and compared with transformers on logits and greedy tokens."""

import json

import pytest
import torch

from lmkiln.cli import main
from lmkiln.errors import UserError
from lmkiln.model.convert.importer import import_model
from lmkiln.model.inference.generate import generate
from lmkiln.model.io.hub import load_model

transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=False),
    "llama3-rope-scaling": lambda: transformers.LlamaConfig(**COMMON, rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=32),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=16),
}
SAVES = {  # family -> (dtype, max shard size, safetensors)
    "llama": (torch.float32, None, True),
    "llama3-rope-scaling": (torch.float32, "40KB", True),
    "qwen2": (torch.bfloat16, "40KB", True),
    "qwen3": (torch.bfloat16, None, True),
    "mistral": (torch.float32, "40KB", True),
}


def _save(tmp_path, family, dtype, shard, safetensors=True):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
    with torch.no_grad():  # random norms and biases, so a mix-up of them would show
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    src = tmp_path / "hf"
    kwargs = {"max_shard_size": shard} if shard else {}
    if not safetensors:
        kwargs["safe_serialization"] = False
    model.to(dtype).save_pretrained(src, **kwargs)
    return src


@pytest.mark.parametrize("family", list(FAMILIES))
def test_imported_model_equals_transformers(tmp_path, family):
    dtype, shard, safetensors = SAVES[family]
    src = _save(tmp_path, family, dtype, shard, safetensors)
    if shard:
        assert (src / "model.safetensors.index.json").exists()
    import_model(str(src), tmp_path / "out")
    ours = load_model(tmp_path / "out")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    x = torch.randint(3, 320, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x).logits, atol=1e-4)
    prompt = x[0, :12].tolist()
    expected = theirs.generate(
        torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(prompt) :].tolist()
    assert generate(ours, prompt, 10, temperature=0.0) == expected
    # what import wrote is again a transformers directory, in the source's dtype
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(again(x).logits, theirs(x).logits, atol=1e-4)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == str(dtype)[6:]


def test_pytorch_bin_checkpoint(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES["llama"]()).eval()
    model.config.save_pretrained(src)
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    import_model(str(src), tmp_path / "out", dtype="bf16")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    x = torch.randint(3, 320, (1, 20))
    with torch.no_grad():
        ref = model.to(torch.bfloat16).float()(x).logits
        assert torch.allclose(load_model(tmp_path / "out")(x), ref, atol=1e-4)


def test_unsupported_architecture_and_values_exit_2(tmp_path, capsys):
    src = _save(tmp_path, "llama", torch.float32, None)
    capsys.readouterr()  # transformers' own progress output
    config = json.loads((src / "config.json").read_text())
    cases = [
        ({"architectures": ["GPT2LMHeadModel"]}, "architecture 'GPT2LMHeadModel' is not supported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn' is not implemented"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ({"num_hidden_layers": 3}, "9 weights missing, e.g. 'model.layers.2."),
    ]
    for change, message in cases:
        bad = {**config, **change}
        bad.pop("rope_parameters", None) if "rope_scaling" in change else None
        (src / "config.json").write_text(json.dumps(bad))
        assert main(["import", str(src), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()  # nothing half-written
    with pytest.raises(UserError, match="neither a model directory, a GGUF file nor a Hugging Face hub id"):
        import_model(str(tmp_path / "nowhere"), tmp_path / "out")


def test_import_checks_and_fixes_the_end_of_turn_stop(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    src = _save(tmp_path, "qwen2", torch.float32, None)
    vocab = {f"t{i}": i for i in range(300)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(src / "tokenizer.json"))
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "<|im_end|>"}))
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    checks = {c.name: c for c in import_model(str(src), tmp_path / "out")}
    assert checks["chat template"].status == "ok"
    assert checks["end-of-turn token"].status == "fixed" and "<|im_end|> (id 301)" in checks["end-of-turn token"].detail
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == [2, 301]
    broken = {"chat_template": "{% for m in messages %}{{ m.content | nosuchfilter }}{% endfor %}"}
    (src / "tokenizer_config.json").write_text(json.dumps(broken))
    checks = {c.name: c for c in import_model(str(src), tmp_path / "out2")}
    assert checks["chat template"].status == "failed" and "nosuchfilter" in checks["chat template"].detail


def test_streamed_safetensors_match_the_library(tmp_path):
    from safetensors.torch import load_file, save_file

    from lmkiln.model.io.stream_safetensors import iter_tensors, write_streamed

    state = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d": torch.randn(2, 2).half(),
    }
    save_file(state, tmp_path / "lib.safetensors")
    assert {k: v for k, v in iter_tensors(tmp_path / "lib.safetensors")}.keys() == state.keys()
    for name, tensor in iter_tensors(tmp_path / "lib.safetensors"):
        assert torch.equal(tensor, state[name])
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in state.items()]
    write_streamed(tmp_path / "ours.safetensors", specs, iter(state.values()))
    back = load_file(tmp_path / "ours.safetensors")
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_hub_id_goes_through_huggingface_hub(tmp_path, monkeypatch):
    """No network here: the download is stood in for at huggingface_hub's boundary."""
    hub = pytest.importorskip("huggingface_hub")
    src = _save(tmp_path, "qwen3", torch.float32, None)
    calls = []

    def snapshot_download(repo_id, allow_patterns):
        calls.append(repo_id)
        if repo_id == "someone/missing":
            raise hub.errors.LocalEntryNotFoundError("offline and not in the cache")
        return str(src)

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    import_model("Qwen/Qwen3-0.6B", tmp_path / "out")
    assert calls == ["Qwen/Qwen3-0.6B"] and (tmp_path / "out" / "model.safetensors").exists()
    with pytest.raises(UserError, match="'someone/missing': cannot download it from the Hugging Face hub"):
        import_model("someone/missing", tmp_path / "out2")
