"""`kiln export`: LoRA merged into its base, dtype changes, GGUF read back with llama.cpp's own reader."""

import json

import numpy as np
import pytest
import torch

from lmkiln.cli import main
from lmkiln.model.convert.export import merged_adapter
from lmkiln.model.convert.importer import import_model
from lmkiln.model.io.hub import load_model

transformers = pytest.importorskip("transformers")


def test_import_lora_finetune_export_merge(trained_run, tiny_recipe, tmp_path):
    from lmkiln import train

    _, run_dir, _ = trained_run
    import_model(str(run_dir / "pretrain" / "final"), tmp_path / "base")
    recipe = tiny_recipe(
        "finetune.method=lora", f"finetune.base={tmp_path / 'base'}", "finetune.epochs=1", run_dir=tmp_path / "ft"
    )
    train.run_finetune(recipe)
    adapter = tmp_path / "ft" / "finetune" / "adapter"
    assert main(["-q", "export", str(adapter), str(tmp_path / "merged"), "--merge"]) == 0
    ours, _ = merged_adapter(adapter, None)
    x = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(0))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ours.eval()(x)
        assert torch.allclose(hf(x).logits, expected, atol=1e-4)
        # the adapter alone, on its base, in PEFT
        peft = pytest.importorskip("peft")
        base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
        with_adapter = peft.PeftModel.from_pretrained(base, adapter).eval()
        assert torch.allclose(with_adapter(x).logits, expected, atol=1e-4)
        assert not torch.allclose(load_model(tmp_path / "base")(x), expected, atol=1e-3)  # the adapter did something


def test_export_refuses_what_it_cannot_do(trained_run, tmp_path, capsys):
    _, run_dir, _ = trained_run
    model = run_dir / "pretrain" / "final"
    assert main(["-q", "export", str(model), str(tmp_path / "x"), "--merge"]) == 2
    assert "--merge needs a LoRA adapter directory" in capsys.readouterr().err
    assert main(["-q", "export", str(model), str(tmp_path / "x"), "--dtype", "int4"]) == 2
    assert "--dtype 'int4' is not one of fp32, bf16, fp16" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_bf16_export_loads_and_generates_the_same(trained_run, tmp_path):
    _, run_dir, _ = trained_run
    from lmkiln.model.convert.export import export_model

    checks = {c.name: c for c in export_model(run_dir / "finetune" / "final", tmp_path / "bf16", dtype="bf16")}
    assert checks["exported model generates"].status == "ok", checks
    assert checks["end-of-turn token"].status == "ok" and checks["chat template"].status == "ok"
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert hf.dtype == torch.bfloat16


def test_gguf_export_reads_back(trained_run, tmp_path):
    gguf = pytest.importorskip("gguf")
    _, run_dir, _ = trained_run
    model_dir = run_dir / "finetune" / "final"
    assert main(["-q", "export", str(model_dir), str(tmp_path / "g"), "--format", "gguf"]) == 0
    reader = gguf.GGUFReader(str(tmp_path / "g" / "model.gguf"))
    meta = {k: f.contents() for k, f in reader.fields.items()}
    ours = load_model(model_dir)
    args = ours.args
    assert meta["general.architecture"] == "llama"
    assert (
        meta["llama.block_count"],
        meta["llama.attention.head_count"],
        meta["llama.attention.head_count_kv"],
        meta["llama.embedding_length"],
        meta["llama.context_length"],
    ) == (2, 4, 2, 64, 128)
    assert len(meta["tokenizer.ggml.tokens"]) == args.vocab_size and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.eos_token_id"] == args.eos_token_id
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert meta["tokenizer.chat_template"] == config["chat_template"]
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert [int(d) for d in reader.tensors[0].shape] == [64, 512]  # GGUF lists dimensions innermost first
    state = ours.state_dict()
    assert len(tensors) == 2 + 9 * args.num_layers  # embeddings and final norm (output tied), 9 per block
    assert np.array_equal(tensors["token_embd.weight"], state["model.embed_tokens.weight"].numpy())
    # k rows were permuted to llama.cpp's interleaved rotary order; undoing it gives HF's rows back
    k = torch.from_numpy(tensors["blk.1.attn_k.weight"].copy())
    heads, hd = args.num_kv_heads, args.head_dim
    unpermuted = k.reshape(heads, hd // 2, 2, -1).swapaxes(1, 2).reshape(k.shape)
    assert torch.equal(unpermuted, state["model.layers.1.self_attn.k_proj.weight"])
    modelfile = (tmp_path / "g" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf") and 'PARAMETER stop "<|end|>"' in modelfile
