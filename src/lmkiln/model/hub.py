"""Read and write Hugging Face model directories (config.json, model.safetensors, tokenizer files).

A directory we write is what `transformers.AutoModelForCausalLM.from_pretrained` expects, so the model
goes to lm-evaluation-harness, vLLM or llama.cpp's converter with no conversion step.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmkiln.errors import UserError
from lmkiln.io import write_json
from lmkiln.model.transformer import ModelArgs, Transformer

HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
              "mistral": "MistralForCausalLM"}
ARCH_OF_CLASS = {cls: arch for arch, cls in HF_CLASSES.items()}


def hf_config(args: ModelArgs, dtype: torch.dtype = torch.float32) -> dict:
    config = {
        "architectures": [HF_CLASSES[args.arch]],
        "model_type": args.arch,
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_heads,
        "num_key_value_heads": args.num_kv_heads,
        "head_dim": args.head_dim,
        "max_position_embeddings": args.max_seq_len,
        "rope_theta": args.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": args.norm_eps,
        "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": args.bos_token_id,
        "eos_token_id": args.eos_token_id,
        "pad_token_id": args.pad_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    if args.arch == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    elif args.arch in ("qwen2", "qwen3"):
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=args.num_layers)
        if args.arch == "qwen3":
            config["attention_bias"] = False
    elif args.arch == "mistral":
        config["sliding_window"] = args.sliding_window
    return config


def args_from_hf(config: dict, where: str) -> ModelArgs:
    cls = (config.get("architectures") or ["?"])[0]
    arch = ARCH_OF_CLASS.get(cls)
    if arch is None:
        raise UserError(f"{where}: architecture '{cls}' is not supported (supported: {', '.join(sorted(ARCH_OF_CLASS))})")
    refused = [("rope_scaling", None), ("mlp_bias", False), ("hidden_act", "silu")]
    if arch in ("llama", "qwen3"):
        refused.append(("attention_bias", False))  # bias on all four projections: not implemented
    if arch in ("qwen2", "qwen3"):
        refused.append(("use_sliding_window", False))
    for key, ok in refused:
        if config.get(key, ok) != ok:
            raise UserError(f"{where}: {key}={config[key]!r} is not supported (expected {ok!r})")
    eos = config.get("eos_token_id")
    heads = config["num_attention_heads"]
    try:
        return ModelArgs(
            vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"], num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            intermediate_size=config["intermediate_size"],
            max_seq_len=config.get("max_position_embeddings", 2048),
            rope_theta=float(config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
            norm_eps=config.get("rms_norm_eps", 1e-6), tie_embeddings=config.get("tie_word_embeddings", False),
            bos_token_id=config.get("bos_token_id"), eos_token_id=eos[0] if isinstance(eos, list) else eos,
            pad_token_id=config.get("pad_token_id"), arch=arch, head_dim=config.get("head_dim"),
            sliding_window=config.get("sliding_window") if arch == "mistral" else None,
        )
    except KeyError as exc:
        raise UserError(f"{where}: missing key {exc}") from None
    except ValueError as exc:
        raise UserError(f"{where}: {exc}") from None


def save_model(model: Transformer, out_dir: Path, tokenizer_dir: Path | None = None,
               extra_eos: list[int] | None = None) -> None:
    """Write weights, config and generation config into out_dir (already a temp dir), plus tokenizer files."""
    save_state(model.args, model.state_dict(), out_dir, tokenizer_dir, extra_eos)


def save_state(args: ModelArgs, state: dict[str, torch.Tensor], out_dir: Path, tokenizer_dir: Path | None = None,
               extra_eos: list[int] | None = None) -> None:
    """save_model from a state dict (e.g. one gathered from FSDP shards)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if args.tie_embeddings:
        state.pop("lm_head.weight", None)  # HF re-ties it from tie_word_embeddings
    dtype = next(iter(state.values())).dtype
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    write_json(out_dir / "config.json", hf_config(args, dtype))
    eos = [args.eos_token_id] + [e for e in (extra_eos or []) if e != args.eos_token_id]
    write_json(out_dir / "generation_config.json", {
        "bos_token_id": args.bos_token_id,
        "eos_token_id": eos if len(eos) > 1 else eos[0],
        "pad_token_id": args.pad_token_id,
    })
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            src = Path(tokenizer_dir) / name
            if src.exists():
                shutil.copyfile(src, out_dir / name)


def _read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    single = model_dir / "model.safetensors"
    if single.exists():
        return load_file(single)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(model_dir / shard))
        return state
    raise UserError(f"{model_dir}: no model.safetensors (or model.safetensors.index.json) found")


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> Transformer:
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"'{model_dir}' is not a model directory (no config.json)")
    args = args_from_hf(json.loads(cfg_path.read_text()), str(cfg_path))
    with torch.device("meta"):
        model = Transformer(args)
    state = _read_weights(model_dir)
    if args.tie_embeddings:
        state.pop("lm_head.weight", None)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if args.tie_embeddings else set())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise UserError(f"{model_dir}: weights do not match config.json "
                        f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False, assign=True)
    if args.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(device)


def generation_eos(model_dir: str | Path) -> list[int]:
    path = Path(model_dir) / "generation_config.json"
    if not path.exists():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    return [eos] if isinstance(eos, int) else list(eos or [])
