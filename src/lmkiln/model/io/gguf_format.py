"""GGUF as llama.cpp lays it out, shared by export (gguf_export.py) and import (gguf_import.py): tensor
names, the `llama` architecture's q/k row order, the pre-tokenizer names, the quantization types lmkiln
writes, and a reader that dequantizes any tensor the `gguf` package can."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lmkiln.errors import UserError
from lmkiln.model.quant import pack_nibbles

GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# pre-tokenizer regexes llama.cpp knows, by the name it knows them under
PRE_TOKENIZERS = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "llama-bpe",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "qwen2",
}


def gguf_name(name: str) -> str:
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    parts = name.split(".", 3)  # model.layers.N.rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in LAYER_NAMES:
        return f"blk.{parts[2]}.{LAYER_NAMES[parts[3]]}"
    raise UserError(f"weight '{name}' has no GGUF name")


def permute_qk(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotate-half row order -> llama.cpp's interleaved pairs, per head (convert_hf_to_gguf's permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's interleaved rotary pairs -> HF's rotate-half rows, per head (permute_qk undone)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


HF_NAMES = {gguf: hf for hf, gguf in TOP_NAMES.items()}
HF_LAYER_NAMES = {gguf: hf for hf, gguf in LAYER_NAMES.items()}


def hf_name(name: str) -> str | None:
    if name in HF_NAMES:
        return HF_NAMES[name]
    parts = name.split(".", 2)  # blk.N.rest
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in HF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{HF_LAYER_NAMES[parts[2]]}"
    return None


INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")  # kept as lmkiln's int4 as they are; other quantized types become int8
UNQUANTIZED = ("F32", "F16", "BF16", "F64")

# `kiln export --quant`: the types the gguf package can quantize to, with llama.cpp's file type names
QUANTS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


def gguf_package():
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF needs the gguf package: pip install gguf") from None
    return gguf


class GgufFile:
    """A GGUF file's metadata and tensors, read lazily through the gguf package's memory map."""

    def __init__(self, path: Path) -> None:
        gguf = gguf_package()
        self.gguf, self.path = gguf, path
        try:
            self.reader = gguf.GGUFReader(str(path))
        except Exception as exc:  # the reader raises ValueError, struct errors, ...: not a GGUF file
            raise UserError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def need(self, key: str):
        value = self.get(key)
        if value is None:
            raise UserError(f"{self.path}: metadata key '{key}' is missing")
        return value

    def tensor(self, name: str) -> torch.Tensor:
        """A tensor as float32 in HF's (rows, columns) order, dequantized if it is quantized."""
        t = self.tensors[name]
        q = self.gguf.GGMLQuantizationType
        data = np.asarray(t.data)
        if t.tensor_type in (q.F32, q.F16, q.F64):
            out = data.astype(np.float32)
        elif t.tensor_type == q.BF16:
            out = torch.from_numpy(data.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
        else:
            try:
                out = self.gguf.quants.dequantize(data, t.tensor_type)
            except NotImplementedError:
                raise UserError(
                    f"{self.path}: tensor '{name}' is {t.tensor_type.name}, which the gguf package cannot dequantize"
                ) from None
        shape = tuple(int(n) for n in reversed(t.shape))
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32).reshape(shape))

    def quant_type(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def int4_pieces(self, name: str) -> dict[str, torch.Tensor] | None:
        """A Q4_0, Q4_1 or Q4_K tensor's own codes, scales and minimums in lmkiln's int4 layout
        (model/quant.py: w = code * scale + min per group of 32), read from its blocks with no rounding:
        they dequantize to the values the gguf package gives, bit for bit. None for any other type."""
        t = self.tensors[name]
        kind = t.tensor_type.name
        if kind not in INT4_TYPES:
            return None
        rows, cols = int(t.shape[1]), int(t.shape[0])
        block_bytes = {"Q4_0": 18, "Q4_1": 20, "Q4_K": 144}[kind]
        blocks = np.asarray(t.data).reshape(-1, block_bytes)
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # (blocks, 1)
        if kind == "Q4_K":  # 8 groups of 32 per block: scale d * sc, minimum -(dmin * m), 6-bit sc and m
            dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
            sc, m = self.gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16].copy())
            scale, minimum = d * sc.astype(np.float32), -(dmin * m.astype(np.float32))
            qs = blocks[:, 16:].reshape(-1, 4, 1, 32)  # each 32 bytes: one group low, the next high
        else:
            scale = d
            minimum = -8 * d if kind == "Q4_0" else blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
            qs = blocks[:, block_bytes - 16 :].reshape(-1, 1, 1, 16)  # element j low, j + 16 high
        codes = (qs >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & np.uint8(15)
        codes = torch.from_numpy(codes.reshape(rows, cols).copy())
        return {
            "weight_int4": pack_nibbles(codes),
            "weight_scale": torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32).reshape(rows, -1)),
            "weight_min": torch.from_numpy(np.ascontiguousarray(minimum, dtype=np.float32).reshape(rows, -1)),
        }
