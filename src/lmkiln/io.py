"""Atomic writes, content hashes and stage manifests.

Every artifact is written under a temporary name, fsynced and renamed into place, so a stage that is
killed half-way never leaves a file that a later stage would accept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name, then swap it in whole (replacing any old one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def hash_tree(root: str | Path) -> dict[str, str]:
    """{relative path: sha256} for every file under root (a stage's outputs)."""
    root = Path(root)
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in ("lmkiln", "torch", "tokenizers", "numpy", "pyarrow", "safetensors"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


COMPRESSED = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2"}


def base_suffix(path: str | Path) -> str:
    """`a.jsonl.zst` -> `.jsonl`: the format under any compression suffix."""
    path = Path(path)
    return Path(path.stem).suffix.lower() if path.suffix.lower() in COMPRESSED else path.suffix.lower()


def open_bytes(path: str | Path):
    """A binary stream over a plain, .gz, .zst or .bz2 file (decompressed by pyarrow)."""
    import pyarrow as pa

    compression = COMPRESSED.get(Path(path).suffix.lower())
    return pa.input_stream(str(path), compression=compression) if compression else open(path, "rb")


def open_text(path: str | Path):
    """A UTF-8 text stream over a plain, .gz, .zst or .bz2 file."""
    import io as _io

    return _io.TextIOWrapper(open_bytes(path), encoding="utf-8", newline="")


def iter_jsonl(path: str | Path, on_bad=None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line. A bad line is a UserError naming file and line,
    or, with `on_bad`, is passed to it as a message and skipped."""
    from lmkiln.errors import UserError

    def bad(message: str) -> None:
        if on_bad is None:
            raise UserError(message)
        on_bad(message)

    with open_text(path) as fh:
        lineno = 0
        try:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    bad(f"{path}:{lineno}: not valid JSON ({exc.msg})")
                    continue
                if not isinstance(record, dict):
                    bad(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
                    continue
                yield lineno, record
        except UnicodeDecodeError:
            bad(f"{path}:{lineno + 1}: not valid UTF-8; the rest of the file is skipped")


def read_manifest(stage_dir: str | Path) -> dict | None:
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return None


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 3)
