"""Property-based tests of the parsers that read user text: whatever the input, a result or a clean
UserError, never another exception. The profile (tests/conftest.py) runs 200 examples of each."""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmkiln.config import load_recipe, parse_overrides, parse_size
from lmkiln.data import sources
from lmkiln.data.examples import load_splits
from lmkiln.errors import UserError
from lmkiln.eval.icl import load_docs

tolerant = settings(suppress_health_check=[HealthCheck.too_slow])

KEYS = st.sampled_from(
    [
        "seed",
        "run_dir",
        "data.min_chars",
        "data.max_chars",
        "data.sources",
        "pretrain.lr",
        "pretrain.max_steps",
        "pretrain.batch_tokens",
        "model.preset",
        "model.hidden_size",
        "tokenizer.vocab_size",
        "finetune.columns",
        "finetune.lora.r",
        "eval.tasks",
        "stages",
        "finetune.epochs",
        "data.pii.kinds",
        "tune.space",
        "nonsense.key",
        "pretrain",
    ]
)
VALUES = st.one_of(
    st.text(max_size=20),
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(
        [
            "20M",
            "1.5B",
            "8K",
            "0.5K",
            "-3M",
            "[a, b]",
            "{x: 1}",
            "[",
            "null",
            "~",
            "true",
            "1e400",
            ".inf",
            "{lrate: [1, 2]}",
            "[data, eval]",
        ]
    ),
)
OVERRIDE = st.one_of(st.builds(lambda k, v: f"{k}={v}", KEYS, VALUES), st.text(max_size=30))


@pytest.mark.slow
@given(st.lists(OVERRIDE, max_size=4))
def test_overrides_give_a_recipe_or_a_user_error(items):
    try:
        parse_overrides(items)
        recipe = load_recipe(None, items)
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert recipe.seed is not None


YAML = st.one_of(
    st.binary(max_size=120),
    st.text(max_size=120).map(str.encode),
    st.dictionaries(
        st.sampled_from(["seed", "run_dir", "data", "pretrain", "model", "stages", "x"]),
        st.one_of(
            st.integers(),
            st.text(max_size=8),
            st.none(),
            st.dictionaries(
                st.sampled_from(["lr", "max_steps", "sources", "preset"]),
                st.one_of(st.integers(), st.text(max_size=8)),
                max_size=2,
            ),
        ),
        max_size=3,
    ).map(lambda d: json.dumps(d).encode()),
)


@tolerant
@given(YAML)
def test_recipe_files_give_a_recipe_or_a_user_error(data):
    path = _write(".yaml", data)
    try:
        load_recipe(path)
    except UserError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)


@given(st.one_of(st.text(max_size=12), st.integers(), st.floats(allow_nan=True)))
def test_sizes_parse_or_say_why(value):
    try:
        size = parse_size(value)
    except ValueError as exc:
        assert "size" in str(exc)
    else:
        assert isinstance(size, (int, float)) or size == value


def _write(suffix: str, data: bytes) -> Path:
    path = Path(tempfile.mkdtemp()) / f"input{suffix}"
    path.write_bytes(data)
    return path


def _jsonl_bytes(rows) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def _csv_bytes(rows) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf)
    for row in rows:
        writer.writerow(row)
    return buf.getvalue().encode()


ROW = st.dictionaries(
    st.sampled_from(
        [
            "text",
            "instruction",
            "input",
            "output",
            "messages",
            "conversations",
            "label",
            "chosen",
            "rejected",
            "prompt",
            "split",
            "q",
            "a",
        ]
    ),
    st.one_of(
        st.text(max_size=12),
        st.integers(),
        st.none(),
        st.lists(st.text(max_size=5), max_size=3),
        st.lists(
            st.dictionaries(st.sampled_from(["role", "content", "from", "value"]), st.text(max_size=6), max_size=2),
            max_size=3,
        ),
    ),
    max_size=5,
)
FILES = st.one_of(
    st.tuples(st.just(".jsonl"), st.one_of(st.binary(max_size=200), st.lists(ROW, max_size=6).map(_jsonl_bytes))),
    st.tuples(
        st.just(".csv"),
        st.one_of(
            st.binary(max_size=200), st.lists(st.lists(st.text(max_size=8), max_size=4), max_size=6).map(_csv_bytes)
        ),
    ),
    st.tuples(st.just(".txt"), st.binary(max_size=300)),
    st.tuples(
        st.just(".json"),
        st.one_of(st.binary(max_size=100), st.lists(ROW, max_size=4).map(lambda r: json.dumps(r).encode())),
    ),
)


@tolerant
@given(FILES, st.sampled_from(["fail", "skip"]), st.sampled_from(["text", "instruction", "q"]))
def test_data_sources_read_or_refuse(file, policy, field):
    suffix, data = file
    path = _write(suffix, data)
    errors = sources.Errors(policy)
    try:
        sources.check([str(path)], policy)
        docs = list(sources.read([str(path)], field, errors))
    except UserError as exc:
        assert policy == "fail" and str(exc)
    else:
        assert all(isinstance(d.text, str) for d in docs)


@tolerant
@given(
    FILES,
    st.dictionaries(
        st.sampled_from(["instruction", "output", "text", "label", "messages"]),
        st.sampled_from(["q", "a", "text", "input", "missing"]),
        max_size=2,
    ),
    st.sampled_from(["auto", "text", "instruction", "chat", "classification", "preference"]),
    st.sampled_from(["fail", "skip"]),
)
def test_finetuning_rows_and_column_mappings_load_or_refuse(file, columns, fmt, policy):
    suffix, data = file
    path = _write(suffix, data)
    try:
        splits = load_splits(str(path), 0.5, 0.05, fmt, columns, policy)
    except UserError as exc:
        assert str(exc)
    else:
        assert all(isinstance(ex, dict) and "id" in ex for part in ("train", "val", "test") for ex in splits[part])


ICL_LINE = st.one_of(
    st.builds(
        lambda d: json.dumps(d),
        st.dictionaries(
            st.sampled_from(["query", "choices", "gold", "context_options", "continuation", "context"]),
            st.one_of(
                st.text(max_size=6),
                st.integers(-2, 5),
                st.lists(st.text(max_size=4), max_size=4),
                st.lists(st.integers(), max_size=2),
                st.none(),
            ),
            max_size=4,
        ),
    ),
    st.text(max_size=30),
)


@tolerant
@given(st.lists(ICL_LINE, max_size=5), st.binary(max_size=8))
def test_icl_task_lines_load_or_refuse(lines, tail):
    path = _write(".jsonl", "\n".join(lines).encode() + tail)
    try:
        docs, kind = load_docs(path)
    except UserError as exc:
        assert str(path) in str(exc)
    else:
        assert docs and kind in ("multiple_choice", "schema", "language_modeling")
