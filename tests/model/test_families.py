"""The family table: every model type and class finds its family, each family's args build its module and
round-trip through config.json, and no module outside a family's own file names a family's types."""

import ast
import inspect
from pathlib import Path

import pytest
import torch

from lmkiln.errors import UserError
from lmkiln.model.families import (
    ARCHS,
    FAMILIES,
    TOKENIZER_KINDS,
    base_family,
    family_of,
    family_of_arch,
    family_of_config,
    presets_table,
)
from lmkiln.model.io.hub import args_from_hf, build_model, hf_config

SRC = Path(__file__).resolve().parents[2] / "src" / "lmkiln"


class _Dims:
    """A recipe's model section with only the dims a preset fills in (what `from_recipe` reads)."""

    preset, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size = "tiny", None, None, None, None, None
    max_seq_len, rope_theta, norm_eps, tie_embeddings, head_dim, sliding_window = 128, 10000.0, 1e-5, True, None, None
    local_attention, global_every = 16, 3

    def __init__(self, arch: str) -> None:
        self.arch = arch


def test_every_model_type_and_class_finds_its_family():
    for family in FAMILIES:
        for model_type in family.model_types:
            assert family_of_config({"model_type": model_type}) is family
        for cls in family.hf_classes:
            assert base_family({"architectures": [cls]}, "config.json") == (family, cls)
        for arch in family.archs:
            assert family_of_arch(arch) is family


@pytest.mark.parametrize("arch", ARCHS)
def test_a_recipes_family_builds_its_module_and_round_trips_through_config_json(arch):
    family = family_of_arch(arch)
    args = family.from_recipe(_Dims(arch), 300, {})
    assert family_of(args) is family
    with torch.device("meta"):
        model = build_model(args)
    assert type(model) is family.build
    config = hf_config(args)
    assert config["model_type"] in family.model_types
    assert args_from_hf(config, "config.json") == args


def test_unknown_names_are_one_line_user_errors_listing_the_known_ones():
    with pytest.raises(UserError, match=r"bad value for 'model.arch': 'gpt2' \(expected one of llama, "):
        family_of_arch("gpt2")
    with pytest.raises(UserError, match=r"config.json: architecture 'GPT2LMHeadModel' is not supported"):
        base_family({"architectures": ["GPT2LMHeadModel"]}, "config.json")
    assert TOKENIZER_KINDS[0] == "decoder" and len(TOKENIZER_KINDS) == len(set(TOKENIZER_KINDS))


def test_no_module_outside_a_family_names_its_model_types():
    """An encoder's or encoder-decoder's model types are asked of its Family, never spelt elsewhere
    (decoder arch names also name GGUF architectures, so those are left out of the scan)."""
    names = {m: f for f in FAMILIES if f.kind != "decoder" for m in f.model_types}
    own = {f: Path(inspect.getfile(f.build)) for f in FAMILIES}  # the file that ends in the Family
    found = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names and own[names[node.value]] != path:
                found.append(f"{path.relative_to(SRC)}:{node.lineno}: {node.value!r}")
    assert not found, found


def test_each_pretrained_family_has_a_preset_table_in_the_generated_docs():
    table = presets_table()
    for family in FAMILIES:
        if family.archs:
            assert family.presets and "tiny" in family.presets
            assert f"| {family.name} ({', '.join(family.archs)}) | `tiny` |" in table
