"""Read and write Hugging Face model directories (config.json, model.safetensors, tokenizer files).

A directory we write is what `transformers.AutoModelForCausalLM.from_pretrained` expects, so the model
goes to lm-evaluation-harness, vLLM or llama.cpp's converter with no conversion step.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lmkiln.errors import UserError
from lmkiln.io import write_json
from lmkiln.model.families import base_family, family_of, family_of_arch, family_of_config
from lmkiln.model.families.encoder import EncoderClassifier, EncoderTagger
from lmkiln.model.families.family import Family
from lmkiln.model.io.stream_safetensors import iter_tensors


def hf_config(args, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json of a model's args, as transformers writes it for the family's class."""
    return family_of(args).to_hf(args, dtype)


def args_from_hf(config: dict, where: str):
    """The args of the model a base model's config.json describes; a class or value lmkiln does not
    implement is a UserError naming it."""
    family, cls = base_family(config, where)
    return _read_args(family, config, cls, where)


def label_args(config: dict, where: str):
    """The args of the body under a label head (*ForSequence/TokenClassification): the family's, without
    its masked-LM head or decoder."""
    family = family_of_config(config)
    return family.label_body(_read_args(family, config, "", where))


def _read_args(family: Family, config: dict, architecture: str, where: str):
    try:
        return family.from_hf(config, architecture, where)
    except KeyError as exc:
        raise UserError(f"{where}: missing key {exc}") from None
    except ValueError as exc:
        raise UserError(str(exc)) from None


_INITS = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "zeros_", "ones_")


@contextlib.contextmanager
def _no_init():
    """torch.nn.init's functions doing nothing: on the meta device a module's reset_parameters has no
    values to set, and PyTorch runs meta-device normal_ through code that imports torch._dynamo (some 800
    modules, about 70 MB resident: a quarter of what `kiln serve` of SmolLM2-135M holds otherwise)."""
    saved = {name: getattr(nn.init, name) for name in _INITS}
    for name in _INITS:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def build_model(args) -> nn.Module:
    """The model an args object describes, of its family's class (uninitialised on the meta device)."""
    with _no_init() if torch.get_default_device().type == "meta" else contextlib.nullcontext():
        return family_of(args).build(args)


def recipe_model_args(model_cfg, vocab_size: int, ids: dict):
    """The args of the model a recipe's model section describes (a ValueError names a setting that does
    not fit; a UserError an arch no family pretrains)."""
    return family_of_arch(model_cfg.arch).from_recipe(model_cfg, vocab_size, ids)


def tied_head(args) -> str | None:
    """The output weight that is the token embedding (not stored), if the model ties them."""
    return family_of(args).tied_head(args)


def model_weight_name(name: str, args) -> str:
    """A stored weight's name as the model has it (a family may spell some otherwise: BERT's gamma/beta)."""
    return family_of(args).weight_name(name, args)


def init_missing(model: nn.Module, args) -> None:
    """Initialise the optional weights a load left on the meta device: normal(0.02) matrices, zero biases."""
    optional = family_of(args).optional_weight
    for name, p in list(model.named_parameters()):
        if p.is_meta and optional(name):
            value = torch.zeros(p.shape) if name.endswith("bias") else torch.empty(p.shape).normal_(0.0, 0.02)
            assign_weight(model, name, value)


def save_model(
    model: nn.Module, out_dir: Path, tokenizer_dir: Path | None = None, extra_eos: list[int] | None = None
) -> None:
    """Write weights, config and generation config into out_dir (already a temp dir), plus tokenizer files."""
    save_state(model.args, model.state_dict(), out_dir, tokenizer_dir, extra_eos)


def save_state(
    args,
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
    if family_of(args).kind == "decoder":  # an encoder generates nothing; T5's import writes its own
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


def expected_shapes(args) -> dict[str, torch.Size]:
    with torch.device("meta"):
        expected = {k: v.shape for k, v in build_model(args).state_dict().items()}
    expected.pop(tied_head(args), None)
    return expected


def skipped_weight(name: str, args) -> bool:
    """A stored weight the model does not need: a cached rotary or position buffer, a tied head's copy,
    what the family leaves out (BERT's next-sentence head, T5's copies of the shared embedding)."""
    if any(part in name for part in family_of(args).skipped_weights):
        return True
    return name.endswith(IGNORED_WEIGHTS) or name == tied_head(args)


def check_weight(shard: Path, name: str, shape, expected: dict) -> None:
    if name not in expected:
        raise UserError(f"{shard}: weight '{name}' is not part of the model config.json describes")
    if tuple(shape) != tuple(expected[name]):
        raise UserError(f"{shard}: weight '{name}' has shape {list(shape)}; config.json implies {list(expected[name])}")


def check_missing(model_dir: Path, expected: dict, seen: set[str], args) -> None:
    optional = family_of(args).optional_weight
    missing = sorted(n for n in set(expected) - seen if not optional(n))
    if missing:
        raise UserError(f"{model_dir}: {len(missing)} weights missing, e.g. '{missing[0]}'")


def iter_checked_weights(model_dir: Path, args) -> Iterator[tuple[Path, str, torch.Tensor]]:
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


def read_config(model_dir: Path) -> dict:
    """A model directory's config.json; a missing or broken one is a UserError naming it."""
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"'{model_dir}' is not a model directory (no config.json)")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{cfg_path}: not valid JSON ({exc})") from None


def family_of_dir(model_dir: Path) -> Family:
    """The family of a model directory (any head: base, masked LM, label heads)."""
    return family_of_config(read_config(model_dir))


def read_args(model_dir: Path):
    return args_from_hf(read_config(model_dir), str(Path(model_dir) / "config.json"))


def load_model(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> nn.Module:
    """The model of an HF directory, built on the meta device and filled tensor by tensor (converted to
    `dtype` one at a time), so loading takes about the model's size in memory, not twice it."""
    model_dir = Path(model_dir)
    if "quantization_config" in read_config(model_dir):
        raise UserError(
            f"{model_dir}: its weights are quantized, which generation, serving and evaluation run; to train "
            "or convert it, start from a dense copy (`kiln import SOURCE OUT --dtype fp32`)"
        )
    args = read_args(model_dir)
    with torch.device("meta"):
        model = build_model(args)
    for _, name, tensor in iter_checked_weights(model_dir, args):
        assign_weight(model, name, tensor.to(dtype))
    init_missing(model, args)
    model.after_load()  # each family re-ties its head and rebuilds its buffers
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
    family = family_of_config(config)
    args = label_args(config, where)
    with torch.device("meta"):
        body = build_model(args)
        model = EncoderTagger(body, len(names)) if per_token else EncoderClassifier(body, len(names))
        if not per_token:
            model.pooling = config.get("classifier_pooling", "cls")
    names_of_model = {k for k in model.state_dict() if not k.startswith("body.decoder.")}
    optional = {k for k in names_of_model if family.optional_weight(k)}

    def key_of(name: str) -> str | None:
        if name.startswith("classifier."):
            return name
        name = model_weight_name(name, args)
        return None if skipped_weight(name, args) else f"body.{name}"

    load_head_model(model, model_dir, names_of_model - optional, key_of, optional)
    init_missing(model, args)
    body.after_load()
    return model.to(device).eval(), names
