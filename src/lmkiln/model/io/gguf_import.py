"""`kiln import FILE.gguf OUT`: a llama.cpp / Ollama GGUF file into an HF model directory.

The architecture's hyperparameters come from the file's metadata and go through the same checks as a
config.json (model/io/hub.py:args_from_hf). A quantized file stays quantized (model/quant.py's layouts:
Q4_0, Q4_1 and Q4_K blocks as int4 with their own codes, scales and minimums; any other quantized type
as int8 per row, from the values the `gguf` package dequantizes); with a `--dtype`, or for a recipe's
import stage, every tensor is dequantized by the `gguf` package (llama.cpp's own Python code: F32, F16,
BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K to Q6_K, ...). Either way tensors are read one at a time and
streamed into model.safetensors, with llama.cpp's q/k row permutation undone for the `llama`
architecture. The byte-level BPE tokenizer ("gpt2" in GGUF) is rebuilt as tokenizer.json from the
file's tokens, merges, token types and pre-tokenizer name; the chat template and special ids come too.
A SentencePiece ("llama") vocabulary is refused by name."""

from __future__ import annotations

from pathlib import Path

import torch

from lmkiln.errors import UserError
from lmkiln.io import write_json, write_text
from lmkiln.model.families.transformer import ModelArgs, Transformer
from lmkiln.model.io.gguf_format import (
    GGUF_ARCH,
    INT4_TYPES,
    PRE_TOKENIZERS,
    UNQUANTIZED,
    GgufFile,
    hf_name,
    unpermute_qk,
)
from lmkiln.model.io.hub import args_from_hf, assign_weight, check_missing, check_weight, expected_shapes, hf_config
from lmkiln.model.io.quantized import quantization_config, stored_specs
from lmkiln.model.io.stream_safetensors import write_streamed
from lmkiln.model.quant import quantize_pieces

IMPORTED_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # GGUF architecture -> lmkiln's
SPLIT_OF_PRE = {name: regex for regex, name in PRE_TOKENIZERS.items()}
# token types in tokenizer.ggml.token_type (llama.cpp's llama_token_type)
CONTROL, USER_DEFINED = 3, 4


def gguf_source(source: str | Path) -> Path | None:
    """The GGUF file a source names: a .gguf file, or a folder (without config.json) holding exactly one."""
    path = Path(source)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise UserError(
                f"'{source}' holds {len(found)} GGUF files ({', '.join(p.name for p in found[:3])}); "
                f"name the one to import"
            )
        return found[0] if found else None
    return None


def read_config(g: GgufFile) -> dict:
    """An HF config.json for the file's architecture, from its metadata."""
    arch = g.need("general.architecture")
    if arch not in IMPORTED_ARCH:
        raise UserError(f"{g.path}: architecture '{arch}' is not supported (supported: {', '.join(IMPORTED_ARCH)})")
    if "rope_freqs.weight" in g.tensors:
        raise UserError(
            f"{g.path}: a rope_freqs tensor (Llama 3.1-style rope scaling) cannot be read back into "
            f"rope_scaling settings; import the model's HF directory instead"
        )
    heads = int(g.need(f"{arch}.attention.head_count"))
    hidden = int(g.need(f"{arch}.embedding_length"))
    tokens = g.need("tokenizer.ggml.tokens")
    config = {
        "architectures": [
            {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]
        ],
        "model_type": IMPORTED_ARCH[arch],
        "vocab_size": int(g.get(f"{arch}.vocab_size") or len(tokens)),
        "hidden_size": hidden,
        "intermediate_size": int(g.need(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(g.need(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g.get(f"{arch}.attention.head_count_kv") or heads),
        "head_dim": int(g.get(f"{arch}.attention.key_length") or hidden // heads),
        "max_position_embeddings": int(g.get(f"{arch}.context_length") or 2048),
        "rope_theta": float(g.get(f"{arch}.rope.freq_base") or 10000.0),
        "rms_norm_eps": float(g.need(f"{arch}.attention.layer_norm_rms_epsilon")),
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "hidden_act": "silu",
        "bos_token_id": g.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": g.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": g.get("tokenizer.ggml.padding_token_id"),
    }
    scaling = g.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise UserError(f"{g.path}: rope scaling '{scaling}' is not supported (supported: linear)")
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(g.need(f"{arch}.rope.scaling.factor"))}
    if arch == "llama" and any(n.endswith(".attn_q.bias") for n in g.tensors):
        config["attention_bias"] = True  # refused by name below, as for a config.json
    return config


def build_tokenizer(g: GgufFile) -> tuple[str, dict]:
    """(tokenizer.json text, tokenizer_config.json) from the file's byte-level BPE vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = g.need("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserError(
            f"{g.path}: tokenizer '{kind}' is not supported (supported: gpt2, i.e. byte-level BPE); "
            f"a SentencePiece ('llama') vocabulary: import the model's HF directory instead"
        )
    tokens = list(g.need("tokenizer.ggml.tokens"))
    types = list(g.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in g.need("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    split = SPLIT_OF_PRE.get(g.get("tokenizer.ggml.pre"))
    # a vocabulary learned under a named split keeps it; others split as GPT-2 did
    tok.pre_tokenizer = (
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if split is None
        else pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL]
    )
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])

    def named(key: str) -> str | None:
        i = g.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": named("bos_token_id"),
        "eos_token": named("eos_token_id"),
        "pad_token": named("padding_token_id"),
        "unk_token": named("unknown_token_id"),
        "add_bos_token": bool(g.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(g.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(g.get(f"{g.need('general.architecture')}.context_length") or 2048),
    }
    template = g.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return tok.to_str(), config


def _layout(g: GgufFile, name: str, shape: tuple, keep: bool) -> str | None:
    """How a tensor is written: None (dense), or the quantized layout its GGUF type maps to."""
    kind = g.quant_type(name)
    if not keep or len(shape) != 2 or kind in UNQUANTIZED:
        return None
    return "int4" if kind in INT4_TYPES else "int8"


def _weights(g: GgufFile, args: ModelArgs, dtype: torch.dtype, keep: bool = False):
    """(specs, tensors): every weight the model needs, named and checked as config.json implies, read one
    at a time as the writer asks for it (llama's q/k rows unpermuted). Dense, each is dequantized to
    `dtype`; with `keep`, a quantized matrix is written in lmkiln's int4 layout (Q4_0, Q4_1, Q4_K: their
    own codes) or int8 layout (any other quantized type, requantized per row from its values)."""
    expected = expected_shapes(args)
    names = []
    for name in g.tensors:
        hf = hf_name(name)
        if hf is None:
            raise UserError(f"{g.path}: tensor '{name}' has no place in a {args.arch} model")
        if args.tie_embeddings and hf == "lm_head.weight":
            continue
        shape = tuple(int(n) for n in reversed(g.tensors[name].shape))
        check_weight(g.path, hf, shape, expected)
        names.append((name, hf, shape, _layout(g, name, shape, keep)))
    check_missing(g.path, expected, {hf for _, hf, _, _ in names}, args)
    llama = GGUF_ARCH[args.arch] == "llama"

    def unpermuted(hf: str, w: torch.Tensor) -> torch.Tensor:
        if llama and hf.endswith(("q_proj.weight", "k_proj.weight")):
            return unpermute_qk(w, args.num_heads if "q_proj" in hf else args.num_kv_heads)
        return w

    def tensors():
        for name, hf, _, layout in names:
            if layout is None:
                w = unpermuted(hf, g.tensor(name))
                yield w.to(dtype if w.ndim > 1 else torch.float32).contiguous()
                continue
            pieces = g.int4_pieces(name) if layout == "int4" else quantize_pieces(layout, g.tensor(name))
            for piece in pieces.values():
                yield unpermuted(hf, piece).contiguous()

    specs = [
        spec
        for _, hf, shape, layout in names
        for spec in stored_specs(hf, layout, shape, dtype if len(shape) > 1 else torch.float32)
    ]
    layouts: dict[str, int] = {}
    for *_, layout in names:
        if layout is not None:
            layouts[layout] = layouts.get(layout, 0) + 1
    return specs, tensors(), layouts


def gguf_model(path: Path) -> Transformer:
    """The model a GGUF file holds, in memory (float32), for checks; nothing is written."""
    g = GgufFile(path)
    args = args_from_hf(read_config(g), str(path))
    specs, tensors, _ = _weights(g, args, torch.float32)
    with torch.device("meta"):
        model = Transformer(args)
    for (name, _, _), tensor in zip(specs, tensors):
        assign_weight(model, name, tensor)
    if args.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def quantized_file(g: GgufFile) -> bool:
    """Whether any matrix of the file is quantized (then `kiln import` keeps it so by default)."""
    return any(len(t.shape) > 1 and t.tensor_type.name not in UNQUANTIZED for t in g.reader.tensors)


def file_dtype(g: GgufFile) -> torch.dtype:
    """The float type of the file's matrices when all are stored unquantized in one; else float32 (what
    dequantized values are exact in)."""
    q = g.gguf.GGMLQuantizationType
    kinds = {t.tensor_type for t in g.reader.tensors if len(t.shape) > 1}
    return (
        {q.F16: torch.float16, q.BF16: torch.bfloat16}.get(next(iter(kinds)), torch.float32)
        if len(kinds) == 1
        else torch.float32
    )


def write_gguf_import(path: Path, out: Path, dtype: torch.dtype | None, keep_quantized: bool = True) -> dict:
    """Write the HF directory of a GGUF file into `out` (a fresh temporary directory); its summary. A
    quantized file stays quantized unless `dtype` names a float type or `keep_quantized` is off."""
    g = GgufFile(path)
    config = read_config(g)
    args = args_from_hf(config, str(path))
    tokenizer_json, tok_config = build_tokenizer(g)
    keep = keep_quantized and dtype is None and quantized_file(g)
    target = dtype or (torch.float32 if keep else file_dtype(g))
    specs, tensors, layouts = _weights(g, args, target, keep)
    write_streamed(out / "model.safetensors", specs, tensors)
    config = hf_config(args, torch.float32 if keep else target)  # a kept-quantized model's activations are fp32
    if keep:
        config["quantization_config"] = quantization_config(layouts)
    write_json(out / "config.json", config)
    write_text(out / "tokenizer.json", tokenizer_json)
    write_json(out / "tokenizer_config.json", tok_config)
    eos = [e for e in (args.eos_token_id, g.get("tokenizer.ggml.eot_token_id")) if e is not None]
    write_json(
        out / "generation_config.json",
        {
            "bos_token_id": args.bos_token_id,
            "pad_token_id": args.pad_token_id,
            "eos_token_id": list(dict.fromkeys(eos)) if len(set(eos)) > 1 else (eos[0] if eos else None),
        },
    )
    kinds: dict[str, int] = {}
    for t in g.reader.tensors:
        kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
    return {
        "gguf": str(path),
        "architecture": g.get("general.architecture"),
        "name": g.get("general.name"),
        "tensor_types": kinds,
        "written_dtype": ", ".join(f"{n} {k}" for k, n in layouts.items())
        if keep
        else str(target).removeprefix("torch."),
        "tokenizer_pre": g.get("tokenizer.ggml.pre"),
        "kept_quantized": keep,
    }


def describe_source(summary: dict) -> str:
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(summary["tensor_types"].items(), key=lambda kv: -kv[1]))
    kept = "kept quantized as" if summary.get("kept_quantized") else "dequantized to"
    return f"GGUF {summary['architecture']} '{summary['name']}': tensors {kinds}; {kept} {summary['written_dtype']}"
