"""Weights kept quantized: the kernels against their dequantized reference, GGUF's 4-bit blocks read as
they are (bit for bit what gguf's own reader gives), `kiln quantize` round trips, and the int8 model's
logits and quality against the fp32 model's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmkiln.cli import main
from lmkiln.model import quant
from lmkiln.model.inference.generate import generate
from lmkiln.model.inference.load import load_for_inference
from lmkiln.model.io.gguf_format import GgufFile

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("layout", quant.LAYOUTS)
# the kernel paths; a dequantized matmul past 32 rows (int8) and 128 (int4)
@pytest.mark.parametrize("rows", [1, 3, 40, 100])
def test_quantized_matmul_equals_its_dequantized_reference(layout, rows):
    torch.manual_seed(0)
    w, x = torch.randn(192, 96) * 0.05, torch.randn(2, rows, 96)
    pieces = quant.quantize_pieces(layout, w)
    reference = F.linear(x, quant.dequantize_pieces(layout, pieces))
    y = quant.quant_linear(layout, pieces)(x)
    assert y.shape == reference.shape and y.dtype == torch.float32
    # the kernels take bf16 inputs and give bf16 outputs: 8 bits of mantissa, twice rounded
    assert _rel(y, reference) < 1e-2


def test_quantization_error_is_at_most_half_a_step():
    torch.manual_seed(1)
    w = torch.randn(64, 128)
    q, scale = quant.quantize_int8(w)
    assert ((quant.dequantize_int8(q, scale) - w).abs() <= scale[:, None] / 2 + 1e-6).all()
    packed, s4, m4 = quant.quantize_int4(w)
    step = s4.repeat_interleave(quant.GROUP, 1)
    assert ((quant.dequantize_int4(packed, s4, m4) - w).abs() <= step / 2 + 1e-6).all()
    assert torch.equal(
        quant.unpack_nibbles(quant.pack_nibbles(quant.unpack_nibbles(packed))), quant.unpack_nibbles(packed)
    )


def test_int4_packed_by_parts_equals_packed_whole(monkeypatch):
    torch.manual_seed(2)
    pieces = quant.quantize_pieces("int4", torch.randn(256, 64))
    x = torch.randn(1, 64)
    whole = quant.quant_linear("int4", pieces)(x)
    monkeypatch.setattr(quant, "PACK_ROWS", 64)
    assert torch.equal(quant.quant_linear("int4", pieces)(x), whole)


def _write_gguf(path, tensors: dict[str, tuple[np.ndarray, object]]) -> None:
    """A GGUF file of `tensors` (name -> (float32 matrix, GGML type)) written by gguf's own writer, the
    K-quants (which gguf-py cannot quantize) as random blocks with finite scales."""
    writer = gguf.GGUFWriter(str(path), "llama")
    rng = np.random.default_rng(0)
    for name, (values, kind) in tensors.items():
        if kind in (Q.Q4_K, Q.Q6_K):
            block, size = gguf.GGML_QUANT_SIZES[kind]
            raw = rng.integers(0, 256, (values.shape[0], values.shape[1] // block, size), dtype=np.uint8)
            first = 0 if kind == Q.Q4_K else size - 2  # fp16 scales: Q4_K's d and dmin first, Q6_K's d last
            count = 2 if kind == Q.Q4_K else 1
            scales = rng.uniform(0.001, 0.01, raw.shape[:-1] + (count,)).astype(np.float16)
            raw[..., first : first + 2 * count] = scales.view(np.uint8)
            data = raw.reshape(values.shape[0], -1)
        else:
            data = gguf.quants.quantize(values, kind)
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K"])
def test_gguf_4bit_blocks_read_as_they_are_dequantize_as_ggufs_reader(tmp_path, kind):
    rng = np.random.default_rng(3)
    values = rng.standard_normal((8, 512)).astype(np.float32) * 0.02
    _write_gguf(tmp_path / "t.gguf", {"w": (values, Q[kind])})
    g = GgufFile(tmp_path / "t.gguf")
    pieces = g.int4_pieces("w")
    assert pieces is not None and pieces["weight_int4"].dtype == torch.uint8
    # exactly the reader's values: the codes, scales and minimums are the file's, with no rounding
    assert torch.equal(quant.dequantize_pieces("int4", pieces), g.tensor("w"))


@pytest.mark.parametrize("kind", ["Q8_0", "Q5_0", "Q5_1", "Q6_K"])
def test_gguf_other_types_are_no_int4_blocks(tmp_path, kind):
    values = np.random.default_rng(4).standard_normal((4, 256)).astype(np.float32)
    _write_gguf(tmp_path / "t.gguf", {"w": (values, Q[kind])})
    g = GgufFile(tmp_path / "t.gguf")
    assert g.int4_pieces("w") is None
    # they become int8 per row, requantized from the reader's values: within half an int8 step
    w = g.tensor("w")
    q, scale = quant.quantize_int8(w)
    assert ((quant.dequantize_int8(q, scale) - w).abs() <= scale[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("gguf_quant", ["q4_1", "q8_0"])
def test_gguf_import_keeps_it_quantized_and_generates_as_its_dequantized_copy(trained_run, tmp_path, gguf_quant):
    """kiln import of a quantized GGUF keeps its bits (q4_1: its own codes; q8_0: int8 per row), and
    its stored weights dequantize to what gguf's reader gives (bit for bit for 4-bit blocks)."""
    from lmkiln.model.convert.export import export_model
    from lmkiln.model.convert.importer import import_model
    from lmkiln.model.io.gguf_format import hf_name, unpermute_qk
    from lmkiln.model.io.stream_safetensors import iter_tensors

    _, run_dir, _ = trained_run
    export_model(run_dir / "finetune" / "final", tmp_path / "g", fmt="gguf", quant=gguf_quant)
    path = tmp_path / "g" / "model.gguf"
    import_model(str(path), tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    layout = "int4" if gguf_quant == "q4_1" else "int8"
    assert config["quantization_config"]["layouts"][layout] > 0
    stored = dict(iter_tensors(tmp_path / "q" / "model.safetensors"))
    g = GgufFile(path)
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    for name, t in g.tensors.items():
        hf = hf_name(name)
        if t.tensor_type.name not in ("Q4_1", "Q8_0"):
            continue
        base = hf.removesuffix(".weight")
        got_layout = "int4" if t.tensor_type.name == "Q4_1" else "int8"
        pieces = {p: stored[f"{base}.{p}"] for p in quant.PIECES[got_layout]}
        expected = g.tensor(name)
        proj = next((h for h in heads if hf.endswith(f"{h}.weight")), None)
        if proj:
            expected = unpermute_qk(expected, heads[proj])
        got = quant.dequantize_pieces(got_layout, pieces)
        if got_layout == "int4":
            assert torch.equal(got, expected), name
        else:
            assert ((got - expected).abs() <= pieces["weight_scale"][:, None] / 2 + 1e-6).all(), name
    dense = tmp_path / "d"
    import_model(str(path), dense, dtype="fp32")
    ids = list(range(5, 25))
    q_lm, d_lm = load_for_inference(tmp_path / "q"), load_for_inference(dense)
    with torch.no_grad():
        q_logits, d_logits = q_lm.model(torch.tensor([ids])), d_lm.model(torch.tensor([ids]))
    # the same weights (int8: within its rounding), activations through bf16 in the kernels
    assert _rel(q_logits, d_logits) < 0.03
    assert generate(q_lm.model, ids, 8)[:2] == generate(d_lm.model, ids, 8)[:2]


def test_quantize_cli_writes_a_model_that_loads_and_decodes(trained_run, tmp_path, capsys):
    _, run_dir, _ = trained_run
    source = run_dir / "finetune" / "final"
    assert main(["quantize", str(source), str(tmp_path / "q8"), "--quant", "int8"]) == 0
    assert "16 int8" in capsys.readouterr().err  # the tied head is a matrix of its own: model/io/compressed.py
    lm, dense = load_for_inference(tmp_path / "q8"), load_for_inference(source)
    assert isinstance(lm.model.lm_head, quant.Int8Linear) and lm.model.model.layers[0].mlp.gate_up_proj is not None
    ids = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        got, ref = lm.model(ids), dense.model(ids)
    # int8 per row: logits within 2% (relative norm) of the fp32 model's, the same greedy choices mostly
    assert _rel(got, ref) < 0.02
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    # quantizing a quantized model, or to a layout that does not exist, is refused before any work
    assert main(["-q", "quantize", str(tmp_path / "q8"), str(tmp_path / "again"), "--quant", "int4"]) == 2
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("layout", quant.LAYOUTS)
def test_quantize_writes_compressed_tensors_that_transformers_reads_as_lmkilns_weights(trained_run, tmp_path, layout):
    """kiln quantize's directory in transformers (with compressed-tensors): the logits of the weights
    lmkiln holds, dequantized, within float rounding; lmkiln's kernels within their bf16 rounding."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    from lmkiln.model.io.hub import read_args
    from lmkiln.model.io.quantized import quantized_weights

    _, run_dir, _ = trained_run
    source, out = run_dir / "finetune" / "final", tmp_path / layout
    assert main(["-q", "quantize", str(source), str(out), "--quant", layout]) == 0
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    dense = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    held = {
        name: quant.dequantize_pieces(kind, p) if kind else p["weight"]
        for name, kind, p in quantized_weights(out, read_args(out))
    }
    assert {kind for _, kind, _ in quantized_weights(out, read_args(out))} >= {layout}
    dense.config.tie_word_embeddings = False
    dense.lm_head.weight = torch.nn.Parameter(held["lm_head.weight"].clone())
    dense.load_state_dict(held, strict=False)
    ids = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        got, ref, ours = hf(ids).logits, dense(ids).logits, load_for_inference(out).model(ids)
    assert (got - ref).abs().max().item() < 1e-4
    assert _rel(ours, ref) < 0.03


@pytest.mark.slow
def test_compiled_int8_decoding_is_the_dequantized_model_in_fp32(trained_run, tmp_path):
    """Compiled, a one-row int8 product is a sum over the input in fp32 (model/quant.py): greedy tokens
    those of an fp32 model holding the dequantized weights."""
    from lmkiln.model.io.hub import read_args
    from lmkiln.model.io.quantized import quantized_weights

    _, run_dir, _ = trained_run
    source, out = run_dir / "finetune" / "final", tmp_path / "q8"
    assert main(["-q", "quantize", str(source), str(out), "--quant", "int8"]) == 0
    quantized, dense = load_for_inference(out).model, load_for_inference(source).model
    with torch.no_grad():
        for name, layout, pieces in quantized_weights(out, read_args(out)):
            if layout is not None and name != "lm_head.weight":  # the head is the embedding's copy
                dense.get_parameter(name).copy_(quant.dequantize_pieces(layout, pieces))
    from lmkiln.model.inference.generate import _decode_step
    from lmkiln.model.inference.kv_cache import KVCache, StaticKVCache

    step, args = _decode_step(quantized), quantized.args
    static, plain = StaticKVCache(args, 1, 64, "cpu", torch.float32), KVCache(args, 1, 64, "cpu", torch.float32)
    with torch.no_grad():
        for token in range(3, 20):  # every product a one-row one, through the compiled step
            got, ref = step(torch.tensor([[token]]), cache=static), dense(torch.tensor([[token]]), cache=plain)
            assert (got - ref).abs().max().item() < 1e-4 * ref.abs().max().item()
    ids = list(range(3, 20))
    assert generate(quantized, ids, 12, compile=True) == generate(dense, ids, 12)


def test_loading_a_model_leaves_torch_dynamo_unimported(trained_run, tmp_path):
    """Building on the meta device skips initialisation, which there imports torch._dynamo (70 MB resident
    in a server that never compiles)."""
    import subprocess
    import sys

    _, run_dir, _ = trained_run
    assert main(["-q", "quantize", str(run_dir / "finetune" / "final"), str(tmp_path / "q"), "--quant", "int4"]) == 0
    code = (
        "import sys; from lmkiln.model.inference.load import load_for_inference; "
        f"from lmkiln.model.inference.generate import generate; lm = load_for_inference({str(tmp_path / 'q')!r}); "
        "generate(lm.model, [3, 4, 5], 4); print('torch._dynamo' in sys.modules)"
    )
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


def test_a_quantized_model_is_served_with_bf16_keys_and_values_attended_in_fp32(trained_run, tmp_path):
    """kiln serve's cache keeps a quantized model's keys and values in bf16 (half an fp32 cache's memory):
    attention still runs in fp32, so the logits stay within bf16's rounding of an fp32 cache's, also
    past a cache that grew and across a second forward that reads the first one's stored keys."""
    from lmkiln.model.inference.kv_cache import SlotCache, stored_dtype
    from lmkiln.serve.batching import Engine

    _, run_dir, _ = trained_run
    source = run_dir / "finetune" / "final"
    assert main(["-q", "quantize", str(source), str(tmp_path / "q"), "--quant", "int4"]) == 0
    model, dense = load_for_inference(tmp_path / "q").model, load_for_inference(source).model
    assert stored_dtype(model) == torch.bfloat16 and stored_dtype(dense) == torch.float32
    ids = torch.tensor([list(range(3, 43))])

    def logits(dtype: torch.dtype) -> torch.Tensor:
        cache = SlotCache(model.args, 3, 64, "cpu", dtype, initial=16)
        cache.rows = [1]
        out = []
        with torch.no_grad():
            for part in (ids[:, :25], ids[:, 25:]):
                cache.reserve(cache.lengths[1] + part.shape[1])  # the second grows it: 16 -> 32 -> 64
                out.append(model(part, cache=cache))
        assert cache.k[0].dtype == dtype and cache.capacity == 64
        return torch.cat(out, 1)

    stored_bf16, stored_fp32 = logits(torch.bfloat16), logits(torch.float32)
    with torch.no_grad():
        whole = model(ids)
    # two forwards through a cache against one without: apart by the kernels' bf16 rounding (~1e-3), and
    # bf16 storage adds about as much again
    assert _rel(stored_fp32, whole) < 3e-3 and _rel(stored_bf16, whole) < 3e-3
    assert stored_bf16.dtype == torch.float32 and 0 < _rel(stored_bf16, stored_fp32) < 3e-3
    engine = Engine(model, max_batch=2, cache_start=16)
    try:
        assert engine.cache.k[0].dtype == torch.bfloat16
        assert engine.token_bytes == SlotCache.bytes_per_token(model.args, torch.float32) // 2
    finally:
        engine.close()


def test_a_compressed_tensors_scheme_lmkiln_does_not_read_is_refused_by_name(trained_run, tmp_path):
    from lmkiln.errors import UserError

    _, run_dir, _ = trained_run
    out = tmp_path / "q"
    assert main(["-q", "quantize", str(run_dir / "finetune" / "final"), str(out), "--quant", "int8"]) == 0
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"config_groups\.group_0 is not a scheme lmkiln reads"):
        load_for_inference(out)


@pytest.mark.parametrize("layout", quant.LAYOUTS)
def test_quantized_blocks_are_the_same_bits_as_ggufs_types(layout):
    from lmkiln.model.io.gguf_export import quantized_blocks

    torch.manual_seed(5)
    pieces = quant.quantize_pieces(layout, torch.randn(16, 128) * 0.1)
    blocks = quantized_blocks(layout, pieces, gguf)
    assert blocks.qtype == (Q.Q4_1 if layout == "int4" else Q.Q8_0)
    read = torch.from_numpy(gguf.quants.dequantize(blocks.data.numpy(), blocks.qtype))
    halved = {k: v.half().float() if k in ("weight_scale", "weight_min") else v for k, v in pieces.items()}
    assert torch.equal(read, quant.dequantize_pieces(layout, halved))


def test_quantized_export_writes_the_imported_blocks_back_unchanged(trained_run, tmp_path):
    """GGUF Q4_1 -> kiln import (kept quantized) -> kiln export --format gguf: every Q4_1 tensor comes
    out byte for byte as it went in."""
    from lmkiln.model.convert.export import export_model
    from lmkiln.model.convert.importer import import_model

    _, run_dir, _ = trained_run
    export_model(run_dir / "finetune" / "final", tmp_path / "g", fmt="gguf", quant="q4_1")
    import_model(str(tmp_path / "g" / "model.gguf"), tmp_path / "q")
    checks = export_model(tmp_path / "q", tmp_path / "back", fmt="gguf")
    assert {c.name: c.status for c in checks}["GGUF read back"] == "ok"
    before = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "g" / "model.gguf")).tensors}
    after = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "back" / "model.gguf")).tensors}
    assert before.keys() == after.keys()
    q4 = [n for n, t in before.items() if t.tensor_type == Q.Q4_1]
    assert q4 and all(
        after[n].tensor_type == Q.Q4_1 and np.array_equal(np.asarray(before[n].data), np.asarray(after[n].data))
        for n in q4
    )
    with pytest.raises(Exception, match="writes its own bits"):
        export_model(tmp_path / "q", tmp_path / "again", fmt="gguf", quant="q8_0")
