"""Read and write Hugging Face model directories (config.json, model.safetensors, tokenizer files).

A directory we write is what `transformers.AutoModelForCausalLM.from_pretrained` expects, so the model
goes to lm-evaluation-harness, vLLM or llama.cpp's converter with no conversion step.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lmkiln.errors import UserError
from lmkiln.io import write_json
from lmkiln.model.bert import (
    BERT_CLASSES,
    IGNORED_BERT_WEIGHTS,
    BertArgs,
    BertEncoder,
    bert_args_from_config,
    bert_config,
    bert_weight_name,
)
from lmkiln.model.encoder import (
    Encoder,
    EncoderArgs,
    EncoderBase,
    EncoderClassifier,
    EncoderTagger,
    encoder_args_from_config,
    encoder_config,
)
from lmkiln.model.stream_safetensors import iter_tensors
from lmkiln.model.t5 import IGNORED_T5_WEIGHTS, T5, T5_CLASSES, T5Args, t5_args_from_config, t5_config
from lmkiln.model.transformer import ModelArgs, Transformer, hf_shape

ENCODER_CLASSES = {"ModernBertForMaskedLM": "modernbert", **{c: f for c, (f, _) in BERT_CLASSES.items()}}
ENCODER_TYPES = {"modernbert": "ModernBERT", "bert": "BERT", "roberta": "RoBERTa"}  # model_type: its name


def is_encoder_config(config: dict) -> bool:
    """Whether a config.json describes an encoder (of any head: masked LM, sequence or token labels)."""
    return config.get("model_type") in ENCODER_TYPES


HF_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
ARCH_OF_CLASS = {cls: arch for arch, cls in HF_CLASSES.items()}


def hf_config(args: ModelArgs | EncoderArgs | BertArgs, dtype: torch.dtype = torch.float32) -> dict:
    if isinstance(args, EncoderArgs):
        return encoder_config(args, dtype)
    if isinstance(args, BertArgs):
        return bert_config(args, dtype)
    if isinstance(args, T5Args):
        return t5_config(args, dtype)
    config = {
        **hf_shape(args, HF_CLASSES[args.arch], args.arch),
        "num_key_value_heads": args.num_kv_heads,
        "head_dim": args.head_dim,
        "max_position_embeddings": args.max_seq_len,
        "rope_theta": args.rope_theta,
        "rope_scaling": args.rope_scaling,
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


def args_from_hf(config: dict, where: str) -> ModelArgs | EncoderArgs | BertArgs:
    # a config saved without `architectures` still names its family in model_type
    cls = (
        config.get("architectures")
        or [HF_CLASSES.get(config.get("model_type"), f"model_type {config.get('model_type')!r}")]
    )[0]
    family = (
        ENCODER_CLASSES.get(cls)
        or T5_CLASSES.get(cls)
        or (config.get("model_type") if not config.get("architectures") else None)
    )
    if family in ("t5", "mt5"):
        try:
            return t5_args_from_config(config, where)
        except KeyError as exc:
            raise UserError(f"{where}: missing key {exc}") from None
        except ValueError as exc:
            raise UserError(str(exc)) from None
    if family in ENCODER_TYPES:
        try:
            if family == "modernbert":
                return encoder_args_from_config(config, where)
            return bert_args_from_config(config, cls, where)
        except KeyError as exc:
            raise UserError(f"{where}: missing key {exc}") from None
        except ValueError as exc:
            raise UserError(str(exc)) from None
    arch = ARCH_OF_CLASS.get(cls)
    if arch is None:
        supported = ", ".join(sorted([*ARCH_OF_CLASS, *ENCODER_CLASSES, *T5_CLASSES]))
        raise UserError(f"{where}: architecture '{cls}' is not supported (supported: {supported})")
    refused = [
        ("mlp_bias", False),
        ("hidden_act", "silu"),
        ("attn_logit_softcapping", None),
        ("final_logit_softcapping", None),
    ]
    if arch in ("llama", "qwen3"):
        refused.append(("attention_bias", False))  # bias on all four projections: not implemented
    if arch in ("qwen2", "qwen3"):
        refused.append(("use_sliding_window", False))
    for key, ok in refused:
        if config.get(key, ok) != ok:
            raise UserError(f"{where}: {key}={config[key]!r} is not supported (expected {ok!r})")
    eos = config.get("eos_token_id")
    heads = config.get("num_attention_heads", 0)
    rope = _rope_settings(config)
    try:
        return ModelArgs(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            intermediate_size=config["intermediate_size"],
            max_seq_len=config.get("max_position_embeddings", 2048),
            rope_theta=rope["theta"],
            rope_scaling=rope["scaling"],
            norm_eps=config.get("rms_norm_eps", 1e-6),
            tie_embeddings=config.get("tie_word_embeddings", False),
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            pad_token_id=config.get("pad_token_id"),
            arch=arch,
            head_dim=config.get("head_dim"),
            sliding_window=config.get("sliding_window") if arch == "mistral" else None,
        )
    except KeyError as exc:
        raise UserError(f"{where}: missing key {exc}") from None
    except ValueError as exc:
        raise UserError(f"{where}: {exc}") from None


def _rope_settings(config: dict) -> dict:
    """Rotary settings from either config style: transformers 4's `rope_theta` + `rope_scaling`, or
    transformers 5's `rope_parameters` {rope_type, rope_theta, factor, ...}."""
    params = dict(config.get("rope_parameters") or {})
    theta = float(config.get("rope_theta", params.pop("rope_theta", 10000.0)))
    params.pop("rope_theta", None)
    scaling = config.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling is not None:
        scaling = dict(scaling)
        scaling["rope_type"] = scaling.pop("type", None) or scaling.get("rope_type")
    return {"theta": theta, "scaling": scaling}


def build_model(args: ModelArgs | EncoderArgs | BertArgs | T5Args) -> Transformer | EncoderBase | T5:
    """The model an args object describes: a decoder, a ModernBERT encoder, a BERT/RoBERTa one, or a T5
    encoder-decoder."""
    if isinstance(args, EncoderArgs):
        return Encoder(args)
    if isinstance(args, T5Args):
        return T5(args)
    return BertEncoder(args) if isinstance(args, BertArgs) else Transformer(args)


def recipe_model_args(model_cfg, vocab_size: int, ids: dict) -> ModelArgs | EncoderArgs:
    """The args of the model a recipe's model section describes: a ModernBERT encoder or a decoder
    (a ValueError names a setting that does not fit)."""
    from lmkiln.model.encoder import build_encoder_args
    from lmkiln.model.t5 import build_t5_args
    from lmkiln.model.transformer import build_args

    if model_cfg.arch == "modernbert":
        return build_encoder_args(model_cfg, vocab_size, ids)
    if model_cfg.arch == "t5":
        return build_t5_args(model_cfg, vocab_size, ids)
    return build_args(model_cfg, vocab_size, ids)


def is_encoder_args(args) -> bool:
    return isinstance(args, (EncoderArgs, BertArgs))


def tied_head(args: ModelArgs | EncoderArgs | BertArgs) -> str | None:
    """The output weight that is the token embedding (not stored), if the model ties them."""
    if isinstance(args, BertArgs):
        if not args.masked_lm:
            return None
        return "cls.predictions.decoder.weight" if args.arch == "bert" else "lm_head.decoder.weight"
    if not args.tie_embeddings:
        return None
    return "decoder.weight" if isinstance(args, EncoderArgs) else "lm_head.weight"


def model_weight_name(name: str, args) -> str:
    """A stored weight's name as the model has it (BERT checkpoints have a few other spellings)."""
    return bert_weight_name(name, args) if isinstance(args, BertArgs) else name


def optional_weight(name: str, args) -> bool:
    """A weight a checkpoint may lack, newly initialised when it does (as transformers does): BERT's
    pooler, which masked-LM checkpoints leave out and a sequence classifier reads."""
    return isinstance(args, BertArgs) and ".pooler." in name


def init_missing(model: nn.Module, args) -> None:
    """Initialise the optional weights a load left on the meta device: normal(0.02) matrices, zero biases."""
    for name, p in list(model.named_parameters()):
        if p.is_meta and optional_weight(name, args):
            value = torch.zeros(p.shape) if name.endswith("bias") else torch.empty(p.shape).normal_(0.0, 0.02)
            assign_weight(model, name, value)


def save_model(
    model: Transformer | Encoder, out_dir: Path, tokenizer_dir: Path | None = None, extra_eos: list[int] | None = None
) -> None:
    """Write weights, config and generation config into out_dir (already a temp dir), plus tokenizer files."""
    save_state(model.args, model.state_dict(), out_dir, tokenizer_dir, extra_eos)


def save_state(
    args: ModelArgs,
    state: dict[str, torch.Tensor],
    out_dir: Path,
    tokenizer_dir: Path | None = None,
    extra_eos: list[int] | None = None,
) -> None:
    """save_model from a state dict (e.g. one gathered from FSDP shards)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    state.pop(tied_head(args), None)  # HF re-ties it from tie_word_embeddings
    dtype = next(iter(state.values())).dtype
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    write_json(out_dir / "config.json", hf_config(args, dtype))
    # the source's generation settings stay (sampling defaults, its stop ids), with ours added
    source_gen = Path(tokenizer_dir or "") / "generation_config.json"
    gen = json.loads(source_gen.read_text()) if tokenizer_dir is not None and source_gen.is_file() else {}
    old = gen.get("eos_token_id")
    if isinstance(args, ModelArgs):  # an encoder generates nothing
        eos = [
            e
            for e in dict.fromkeys(
                [args.eos_token_id, *(extra_eos or []), *([old] if isinstance(old, int) else old or [])]
            )
            if e is not None
        ]
        gen.update(
            bos_token_id=args.bos_token_id,
            pad_token_id=args.pad_token_id,
            eos_token_id=eos if len(eos) > 1 else (eos[0] if eos else None),
        )
        write_json(out_dir / "generation_config.json", gen)
    if tokenizer_dir is not None:
        copy_tokenizer_files(Path(tokenizer_dir), out_dir)


# what a model directory carries besides weights and config: the tokenizer and the chat template in
# every layout transformers writes (chat_template.jinja in transformers 5)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)


def copy_tokenizer_files(source: Path, out: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)


WEIGHT_LAYOUTS = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)
IGNORED_WEIGHTS = (".rotary_emb.inv_freq",)  # a buffer old Llama checkpoints saved; we compute it


def weight_shards(model_dir: Path) -> list[Path]:
    """The weight files of a model directory: safetensors (single or sharded) first, else PyTorch .bin."""
    for single, index in WEIGHT_LAYOUTS:
        if (model_dir / single).is_file():
            return [model_dir / single]
        if (model_dir / index).is_file():
            try:
                names = json.loads((model_dir / index).read_text())["weight_map"].values()
            except (json.JSONDecodeError, KeyError, AttributeError):
                raise UserError(f"{model_dir / index}: not a weight index (expected a 'weight_map' object)") from None
            return [model_dir / name for name in sorted(set(names))]
    raise UserError(f"{model_dir}: no weights (model.safetensors, pytorch_model.bin, or their .index.json)")


def read_shard(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) one at a time, so at most one tensor of the file is in memory besides what the
    caller keeps. .bin files are read with weights_only=True (no code runs) and memory-mapped."""
    if not path.is_file():
        raise UserError(f"{path}: weight file named in the index is missing")
    if path.suffix == ".safetensors":
        yield from iter_tensors(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # pickle and zip errors have no common base
            raise UserError(f"{path}: not a readable PyTorch weights file ({type(exc).__name__}: {exc})") from None
        yield from state.items()


def assign_weight(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    path, leaf = name.rsplit(".", 1)
    module = model.get_submodule(path)
    setattr(module, leaf, nn.Parameter(tensor, requires_grad=getattr(module, leaf).requires_grad))


def expected_shapes(args: ModelArgs | EncoderArgs | BertArgs) -> dict[str, torch.Size]:
    with torch.device("meta"):
        expected = {k: v.shape for k, v in build_model(args).state_dict().items()}
    expected.pop(tied_head(args), None)
    return expected


def skipped_weight(name: str, args: ModelArgs | EncoderArgs | BertArgs) -> bool:
    """A stored weight the model does not need: a cached rotary or position buffer, a tied head's copy,
    BERT's next-sentence head."""
    if isinstance(args, BertArgs) and any(part in name for part in IGNORED_BERT_WEIGHTS):
        return True
    if isinstance(args, T5Args) and name in IGNORED_T5_WEIGHTS:
        return True
    return name.endswith(IGNORED_WEIGHTS) or name == tied_head(args)


def check_weight(shard: Path, name: str, shape, expected: dict) -> None:
    if name not in expected:
        raise UserError(f"{shard}: weight '{name}' is not part of the model config.json describes")
    if tuple(shape) != tuple(expected[name]):
        raise UserError(f"{shard}: weight '{name}' has shape {list(shape)}; config.json implies {list(expected[name])}")


def check_missing(model_dir: Path, expected: dict, seen: set[str], args=None) -> None:
    missing = sorted(n for n in set(expected) - seen if not optional_weight(n, args))
    if missing:
        raise UserError(f"{model_dir}: {len(missing)} weights missing, e.g. '{missing[0]}'")


def iter_checked_weights(model_dir: Path, args: ModelArgs) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """(file, name, tensor) for every weight the model needs, checked against config.json by name and
    shape; a missing, unexpected or misshapen weight is a UserError naming it."""
    expected = expected_shapes(args)
    seen = set()
    for shard in weight_shards(model_dir):
        for stored, tensor in read_shard(shard):
            name = model_weight_name(stored, args)
            if skipped_weight(name, args):
                continue
            check_weight(shard, name, tensor.shape, expected)
            seen.add(name)
            yield shard, name, tensor
    check_missing(model_dir, expected, seen, args)


def read_args(model_dir: Path) -> ModelArgs:
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"'{model_dir}' is not a model directory (no config.json)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{cfg_path}: not valid JSON ({exc})") from None
    return args_from_hf(config, str(cfg_path))


def load_model(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Transformer | EncoderBase:
    """The model of an HF directory, built on the meta device and filled tensor by tensor (converted to
    `dtype` one at a time), so loading takes about the model's size in memory, not twice it."""
    model_dir = Path(model_dir)
    args = read_args(model_dir)
    with torch.device("meta"):
        model = build_model(args)
    for _, name, tensor in iter_checked_weights(model_dir, args):
        assign_weight(model, name, tensor.to(dtype))
    init_missing(model, args)
    if hasattr(model, "after_load"):  # encoders and T5 re-tie their heads and rebuild buffers themselves
        model.after_load()
    elif args.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(device)


def generation_eos(model_dir: str | Path) -> list[int]:
    path = Path(model_dir) / "generation_config.json"
    if not path.exists():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    return [eos] if isinstance(eos, int) else list(eos or [])


def load_head_model(
    model: nn.Module, model_dir: Path, expected: set[str], key_of, optional: set[str] = frozenset()
) -> None:
    """Fill a model with a label head (built on the meta device) from a *ForSequence/TokenClassification
    directory: `key_of` maps a stored name to the model's (None: a buffer to skip); an unknown weight, or
    a missing one that is not `optional`, is a UserError."""
    seen = set()
    for shard in weight_shards(model_dir):
        for name, tensor in read_shard(shard):
            key = key_of(name)
            if key is None:
                continue
            if key not in expected | optional:
                raise UserError(f"{shard}: weight '{name}' is not part of the classifier config.json describes")
            assign_weight(model, key, tensor.float())
            seen.add(key)
    if expected - seen:
        raise UserError(f"{model_dir}: weights missing, e.g. '{sorted(expected - seen)[0]}'")


def load_encoder_classifier(model_dir, device="cpu") -> tuple[EncoderClassifier | EncoderTagger, list[str]]:
    """A *ForSequenceClassification or *ForTokenClassification directory of ModernBERT, BERT or RoBERTa
    (lmkiln's or transformers'), and its label names."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    where = str(model_dir / "config.json")
    names = [config["id2label"][str(i)] for i in range(config["num_labels"])]
    architecture = (config.get("architectures") or [""])[0]
    per_token = architecture.endswith("ForTokenClassification")
    try:
        if config.get("model_type") == "modernbert":
            args = encoder_args_from_config(config, where)
            args.decoder_bias = False  # a classifier keeps no decoder
        else:
            args = bert_args_from_config(config, "", where)
            args.masked_lm = False  # a label head replaces the masked-LM one
    except (KeyError, ValueError) as exc:
        raise UserError(f"{where}: {exc}") from None
    with torch.device("meta"):
        body = build_model(args)
        model = EncoderTagger(body, len(names)) if per_token else EncoderClassifier(body, len(names))
        if not per_token:
            model.pooling = config.get("classifier_pooling", "cls")
    names_of_model = {k for k in model.state_dict() if not k.startswith("body.decoder.")}
    optional = {k for k in names_of_model if optional_weight(k, args)}

    def key_of(name: str) -> str | None:
        if name.startswith("classifier."):
            return name
        name = model_weight_name(name, args)
        return None if skipped_weight(name, args) else f"body.{name}"

    load_head_model(model, model_dir, names_of_model - optional, key_of, optional)
    init_missing(model, args)
    body.after_load()
    return model.to(device).eval(), names
