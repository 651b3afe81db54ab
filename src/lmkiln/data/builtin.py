"""The embedded corpus and task: text every Python installation carries, so the quickstart needs no network.

`builtin:python-stdlib`: the standard library's module sources and pydoc topics, one document each,
grouped by module for the held-out split. `builtin:python-docstrings`: write a function's docstring
given its code, split by module with the same rule, so no test module was seen in pretraining.
"""

from __future__ import annotations

import ast
import functools
import inspect
import sysconfig
import textwrap
from collections.abc import Iterator
from pathlib import Path

from lmkiln.data.records import Document
from lmkiln.data.split import is_heldout

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "ensurepip"}
DOCSTRING_INSTRUCTION = "Write the docstring for this Python function."


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_modules() -> list[tuple[str, Path]]:
    """(dotted module name, path) for every standard-library source file outside the test suites."""
    root = stdlib_root()
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            out.append((".".join(parts), path))
    return out


def stdlib_fingerprint() -> str:
    """Identifies this machine's corpus for caching without reading 10 MB: names, sizes and mtimes."""
    import hashlib
    import sys

    h = hashlib.sha256(sys.version.encode())
    for name, path in stdlib_modules():
        st = path.stat()
        h.update(f"{name}:{st.st_size}:{int(st.st_mtime)};".encode())
    return h.hexdigest()


def python_stdlib() -> Iterator[Document]:
    for name, path in stdlib_modules():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        yield Document(id=f"stdlib:{name}", source="builtin:python-stdlib", group=name, text=text)
    from pydoc_data.topics import topics

    for topic in sorted(topics):
        yield Document(id=f"pydoc:{topic}", source="builtin:python-stdlib", group=f"pydoc:{topic}", text=topics[topic])


def _function_without_docstring(source: str, node: ast.FunctionDef) -> str | None:
    lines = source.splitlines()
    first = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
    doc = node.body[0]
    if len(node.body) < 2:
        return None  # nothing but the docstring: no code to describe
    kept = lines[first : doc.lineno - 1] + lines[doc.end_lineno : node.end_lineno]
    return textwrap.dedent("\n".join(kept)).strip("\n")


def docstring_examples(
    modules: list[tuple[str, Path]] | None = None, max_code_chars: int = 1200, max_doc_chars: int = 400
) -> Iterator[dict]:
    """{instruction, input, output, group} per documented function; output = the docstring's summary paragraph."""
    for name, path in modules or stdlib_modules():
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (UnicodeDecodeError, SyntaxError, OSError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node, clean=False)
            if not doc:
                continue
            summary = inspect.cleandoc(doc).split("\n\n")[0].strip()
            code = _function_without_docstring(source, node)
            if code is None or not 20 <= len(summary) <= max_doc_chars or len(code) > max_code_chars:
                continue
            yield {
                "instruction": DOCSTRING_INSTRUCTION,
                "input": code,
                "output": summary,
                "group": name,
                "id": f"{name}.{node.name}:{node.lineno}",
            }


@functools.lru_cache(maxsize=4)
def docstring_splits(test_fraction: float, val_fraction: float) -> dict[str, list[dict]]:
    """train/val/test; test modules are exactly those the stdlib corpus holds out at `test_fraction`.
    Cached: parsing the library takes seconds, and finetune and eval both ask. Treat it as read-only."""
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for ex in docstring_examples():
        if is_heldout(ex["group"], test_fraction):
            splits["test"].append(ex)
        elif is_heldout(ex["group"], val_fraction, salt="val:"):
            splits["val"].append(ex)
        else:
            splits["train"].append(ex)
    return splits
