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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lmkiln.errors import EncodingError, UserError

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


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _fsync_tree(root: Path) -> None:
    for f in root.rglob("*"):
        if f.is_file():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())


def _swap_in(tmp: Path, path: Path) -> None:
    """Rename `tmp` onto `path`, replacing the directory there whole."""
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name, then swap it in whole (replacing any old one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_dir(path.with_name(f".{path.name}.tmp-{os.getpid()}"))
    try:
        yield tmp
        _fsync_tree(tmp)
        _swap_in(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


OUTPUT_MARK = ".lmkiln-output.json"  # in each directory a verb writes outside a run's stage folders


def _written_by_us(out: Path) -> set[str] | None:
    """The files lmkiln wrote in `out` (its marker's list), or None when lmkiln did not write it."""
    try:
        return set(json.loads((out / OUTPUT_MARK).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_output_dir(out: str | Path, inputs: list[str | Path], force: bool, name: str) -> None:
    """Refuse, before any work, an output directory that is an input, lies inside one or holds one, and a
    non-empty directory lmkiln did not write unless `force` (which then replaces only what lmkiln writes)."""
    out = Path(out)
    target = out.resolve()
    for source in inputs:
        src = Path(source).resolve()
        if target == src or src in target.parents or target in src.parents:
            raise UserError(
                f"{name} '{out}' is the input '{source}', or inside it, or holds it: "
                f"writing it would destroy the input; choose another directory"
            )
    if out.exists() and not out.is_dir():
        raise UserError(f"{name} '{out}' is a file; expected a directory to write")
    if out.is_dir() and not force:
        ours = _written_by_us(out) or set()
        foreign = sorted(p.name for p in out.iterdir() if p.name not in ours and p.name != OUTPUT_MARK)
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise UserError(
                f"{name} '{out}' holds files lmkiln did not write ({shown}); choose a new or empty "
                f"directory, or add --force to replace only the files lmkiln writes there"
            )


@contextlib.contextmanager
def output_dir(out: str | Path, written_by: str) -> Iterator[Path]:
    """Build a verb's output in a temporary directory beside `out`, then put it in place: a new or empty
    `out`, or one only lmkiln wrote, is swapped whole; otherwise (--force) only the files lmkiln writes
    are replaced, with what an earlier run of lmkiln wrote there, and nothing else is touched. A marker
    lists the files, so a later run knows them as lmkiln's. Nothing is written to `out` on failure."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_dir(out.with_name(f".{out.name}.tmp-{os.getpid()}"))
    try:
        yield tmp
        names = sorted(p.name for p in tmp.iterdir())
        write_json(
            tmp / OUTPUT_MARK, {"written_by": written_by, "files": names, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        )
        _fsync_tree(tmp)
        previous = _written_by_us(out) if out.is_dir() else None
        if out.is_dir() and any(p.name not in (previous or set()) | {OUTPUT_MARK} for p in out.iterdir()):
            for name in sorted((previous or set()) - set(names)):  # what an earlier run of ours left
                _remove(out / name)
            for name in names:  # the marker last: it describes what is there once all is in
                _remove(out / name)
                os.replace(tmp / name, out / name)
            os.replace(tmp / OUTPUT_MARK, out / OUTPUT_MARK)
        else:
            _swap_in(tmp, out)
        _fsync_dir(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


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
    return {
        str(p.relative_to(root)): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    }


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


BOM = b"\xef\xbb\xbf"


def _raw_lines(stream, block: int = 1 << 20) -> Iterator[bytes]:
    """The lines of a binary stream, each with its b"\n" (the last one may have none)."""
    rest = b""
    while chunk := stream.read(block):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield line + b"\n"
    if rest:
        yield rest


def _bad_utf8(path: str | Path, lineno: int, at: int, bad: bytes) -> str:
    return f"{path}:{lineno}: not valid UTF-8 at byte {at} ({bad[:4]!r}); expected UTF-8 text"


def text_lines(path: str | Path, on_bad: Callable[[str], None] | None = None) -> Iterator[tuple[int, str]]:
    """(line number, line with its ending) of a UTF-8 text file, plain or .gz/.zst/.bz2; a leading BOM is
    dropped. A line that is not valid UTF-8 is an EncodingError naming the file, line and byte offset
    (of the decompressed text), or, with `on_bad`, is passed to it as that message and skipped."""
    offset = 0
    with open_bytes(path) as fh:
        for lineno, raw in enumerate(_raw_lines(fh), 1):
            if lineno == 1 and raw.startswith(BOM):
                raw, offset = raw[len(BOM) :], len(BOM)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                message = _bad_utf8(path, lineno, offset + exc.start, exc.object[exc.start :])
                if on_bad is None:
                    raise EncodingError(message) from None
                on_bad(message)
            else:
                yield lineno, line
            offset += len(raw)


def read_text(path: str | Path) -> str:
    """A whole UTF-8 text file, plain or compressed (a leading BOM dropped); EncodingError naming the file,
    line and byte offset where it is not valid UTF-8."""
    with open_bytes(path) as fh:
        raw = fh.read()
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        lineno = raw.count(b"\n", 0, exc.start) + 1
        raise EncodingError(_bad_utf8(path, lineno, exc.start, raw[exc.start :])) from None


def check_utf8(path: str | Path, block: int = 1 << 22) -> None:
    """EncodingError, naming the file, line and byte offset, if `path` (plain or compressed) is not valid
    UTF-8; one streaming pass in constant memory, for checking inputs before any work."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open_bytes(path) as fh:
            while chunk := fh.read(block):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        for _ in text_lines(path):  # the slow path, only for a bad file: find the line and offset
            pass


def iter_jsonl(path: str | Path, on_bad=None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line. A bad line is a UserError naming file and line,
    or, with `on_bad`, is passed to it as a message and skipped."""

    def bad(message: str) -> None:
        if on_bad is None:
            raise UserError(message)
        on_bad(message)

    for lineno, line in text_lines(path, on_bad):
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


def read_json(path: str | Path) -> dict:
    """A JSON object file, or {} when there is none; a UserError naming the file when it is not JSON."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None


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
