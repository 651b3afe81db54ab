"""GGUF for llama.cpp and Ollama, written with the `gguf` package (llama.cpp's own Python writer), and
read back to check it.

Names, layouts and metadata follow llama.cpp's convert_hf_to_gguf.py: Llama and Mistral are the `llama`
architecture, whose rotary embedding pairs neighbouring dimensions, so q and k rows are permuted from
HF's rotate-half order; Qwen2 and Qwen3 keep HF's order. Llama 3.1's rope scaling becomes a
`rope_freqs` tensor of per-frequency divisors. The byte-level BPE tokenizer goes in as `gpt2` tokens
and merges, with the chat template and the special token ids."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmkiln.errors import UserError
from lmkiln.model import quant
from lmkiln.model.families.transformer import ModelArgs, scaled_inv_freq
from lmkiln.model.io.gguf_format import GGUF_ARCH, PRE_TOKENIZERS, GgufFile, gguf_name, gguf_package, permute_qk


@dataclass
class Blocks:
    """A matrix already in GGUF's blocks: (rows, bytes) uint8, and its GGML type."""

    data: torch.Tensor
    qtype: object


def quantized_blocks(layout: str, pieces: dict[str, torch.Tensor], gguf) -> Blocks:
    """lmkiln's int4 as Q4_1 (the same codes; scale and min as the block's fp16 d and m) and int8 as
    Q8_0 (the same int8 values; the row's scale as every block's d): the same bits, but for the scales'
    rounding to fp16."""
    if layout == "int4":
        codes = quant.unpack_nibbles(pieces["weight_int4"])
        rows, groups = codes.shape[0], codes.shape[1] // quant.GROUP
        codes = codes.view(rows, groups, quant.GROUP)
        qs = codes[..., :16] | (codes[..., 16:] << 4)  # Q4_1: element j low, j + 16 high
        d = pieces["weight_scale"].half().view(torch.uint8).view(rows, groups, 2)
        m = pieces["weight_min"].half().view(torch.uint8).view(rows, groups, 2)
        return Blocks(torch.cat([d, m, qs], -1).reshape(rows, -1), gguf.GGMLQuantizationType.Q4_1)
    q = pieces["weight_int8"]
    rows, groups = q.shape[0], q.shape[1] // quant.GROUP
    d = pieces["weight_scale"].half()[:, None].expand(rows, groups).contiguous().view(torch.uint8).view(rows, groups, 2)
    values = q.view(torch.uint8).view(rows, groups, quant.GROUP)
    return Blocks(torch.cat([d, values], -1).reshape(rows, -1), gguf.GGMLQuantizationType.Q8_0)


def gguf_tensors(args: ModelArgs, state: dict[str, torch.Tensor | Blocks]) -> dict[str, torch.Tensor | Blocks]:
    """GGUF name -> tensor, in llama.cpp's layout."""
    out = {}
    for name, w in state.items():
        if args.tie_embeddings and name == "lm_head.weight":
            continue
        if GGUF_ARCH[args.arch] == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = args.num_heads if "q_proj" in name else args.num_kv_heads
            w = Blocks(permute_qk(w.data, heads), w.qtype) if isinstance(w, Blocks) else permute_qk(w, heads)
        out[gguf_name(name)] = w
    if args.rope_scaling and args.rope_scaling.get("rope_type") == "llama3":
        inv = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim))
        out["rope_freqs.weight"] = (inv / scaled_inv_freq(inv, args.rope_scaling)).float()
    return out


def _tokenizer_fields(model_dir: Path) -> dict:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{model_dir}: no tokenizer.json; GGUF needs the tokenizer inside")
    spec = json.loads(path.read_text())
    model = spec.get("model", {})
    pre = spec.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", [pre])
    if model.get("type") != "BPE" or not any(p.get("type") == "ByteLevel" for p in pres):
        raise UserError(
            f"{path}: GGUF export supports byte-level BPE tokenizers (Llama 3, Qwen, lmkiln's own); "
            f"for a SentencePiece one run llama.cpp's convert_hf_to_gguf.py on the HF directory"
        )
    vocab = dict(model["vocab"])
    added = {t["content"]: (t["id"], t.get("special", False)) for t in spec.get("added_tokens", [])}
    for content, (token_id, _) in added.items():
        vocab[content] = token_id
    tokens = [""] * (max(vocab.values()) + 1)
    for token, token_id in vocab.items():
        tokens[token_id] = token
    types = [3 if added.get(t, (0, False))[1] else 4 if t in added else 1 for t in tokens]  # control, user, normal
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    regex = next((p.get("pattern", {}).get("Regex") for p in pres if p.get("type") == "Split"), None)
    pre_name = PRE_TOKENIZERS.get(regex, "gpt-2" if regex is None else "default")
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre_name}


def write_gguf(
    args: ModelArgs,
    state: dict[str, torch.Tensor],
    model_dir: Path,
    path: Path,
    name: str,
    dtype: torch.dtype,
    quant: str | None = None,
) -> None:
    """Write `state` (HF names) with the tokenizer and chat template of `model_dir` to `path`; matrices in
    `dtype`, or quantized to `quant` (one of QUANTS)."""
    gguf = gguf_package()
    from lmkiln.model.io.chat_format import chat_template
    from lmkiln.model.io.hub import generation_eos

    arch = GGUF_ARCH[args.arch]
    tok = _tokenizer_fields(model_dir)
    w = gguf.GGUFWriter(str(path), arch)
    for setter, value in (
        (w.add_name, name),
        (w.add_context_length, args.max_seq_len),
        (w.add_embedding_length, args.hidden_size),
        (w.add_block_count, args.num_layers),
        (w.add_feed_forward_length, args.intermediate_size),
        (w.add_head_count, args.num_heads),
        (w.add_head_count_kv, args.num_kv_heads),
        (w.add_key_length, args.head_dim),
        (w.add_value_length, args.head_dim),
        (w.add_rope_dimension_count, args.head_dim),
        (w.add_rope_freq_base, args.rope_theta),
        (w.add_layer_norm_rms_eps, args.norm_eps),
        (w.add_vocab_size, args.vocab_size),
    ):
        setter(value)
    if args.rope_scaling and args.rope_scaling["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(args.rope_scaling["factor"]))
    blocks = [t.qtype.name for t in state.values() if isinstance(t, Blocks)]  # a quantized model's own
    kind = quant or (max(set(blocks), key=blocks.count) if blocks else None)
    file_type = (
        gguf.LlamaFileType[f"MOSTLY_{kind.upper()}"]
        if kind
        else {
            torch.float32: gguf.LlamaFileType.ALL_F32,
            torch.float16: gguf.LlamaFileType.MOSTLY_F16,
            torch.bfloat16: gguf.LlamaFileType.MOSTLY_BF16,
        }[dtype]
    )
    w.add_file_type(file_type)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    for setter, value in (
        (w.add_bos_token_id, args.bos_token_id),
        (w.add_eos_token_id, args.eos_token_id),
        (w.add_pad_token_id, args.pad_token_id),
    ):
        if value is not None:
            setter(value)
    eos = generation_eos(model_dir)
    if len(eos) > 1:
        w.add_eot_token_id(eos[-1])
    w.add_add_bos_token(False)  # the chat template writes BOS itself
    template = chat_template(model_dir)
    if template:
        w.add_chat_template(template)
    for gname, tensor in gguf_tensors(args, state).items():
        array, kwargs = _gguf_array(tensor, dtype, gguf, quant)
        w.add_tensor(gname, array, **kwargs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantized(t: torch.Tensor, quant: str | None, gguf) -> bool:
    """Whether a tensor is stored quantized: matrices whose rows are whole quantization blocks."""
    if quant is None or t.ndim < 2:
        return False
    block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[quant.upper()]]
    return t.shape[-1] % block == 0


def _gguf_array(
    t: torch.Tensor | Blocks, dtype: torch.dtype, gguf, quant: str | None = None
) -> tuple[np.ndarray, dict]:
    """Norms, biases and rope factors stay f32 (as llama.cpp's converter keeps 1-D tensors); matrices take
    the export dtype, or the quantization type (a matrix whose rows are not whole blocks keeps the dtype).
    bf16 has no numpy type: its raw 16-bit words go in with the type named."""
    if isinstance(t, Blocks):
        return t.data.numpy(), {"raw_dtype": t.qtype}
    t = t.detach().cpu()
    if quantized(t, quant, gguf):
        qtype = gguf.GGMLQuantizationType[quant.upper()]
        return gguf.quants.quantize(t.float().numpy(), qtype), {"raw_dtype": qtype}
    if t.ndim == 1 or dtype == torch.float32:
        return t.float().numpy(), {}
    if dtype == torch.float16:
        return t.half().numpy(), {}
    return t.bfloat16().view(torch.int16).numpy().view(np.uint16), {"raw_dtype": gguf.GGMLQuantizationType.BF16}


def stored_values(t: torch.Tensor, dtype: torch.dtype, quant: str | None, gguf) -> torch.Tensor:
    """What a tensor written by write_gguf reads back as (float32): rounded to the export dtype, or
    quantized and dequantized, as _gguf_array stores it."""
    if quantized(t, quant, gguf):
        qtype = gguf.GGMLQuantizationType[quant.upper()]
        return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(t.float().numpy(), qtype), qtype))
    return t.to(dtype if t.ndim > 1 else torch.float32).float()


def read_gguf(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, GGUF name -> float32 tensor in HF's shape order, dequantized) from a GGUF file."""
    g = GgufFile(path)
    meta = {k: f.contents() for k, f in g.reader.fields.items() if not k.startswith("GGUF.")}
    return meta, {name: g.tensor(name) for name in g.tensors}


def modelfile(gguf_name: str, stops: list[str]) -> str:
    """An Ollama Modelfile: Ollama reads the chat template from the GGUF; the stops make replies end."""
    lines = [f"FROM ./{gguf_name}", ""]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"
