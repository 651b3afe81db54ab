"""`kiln serve --log-requests DIR`: each generation request and its reply as one JSON line (time, route,
model, input, output, token counts, latency, finish reasons) in rotating `requests-*.jsonl` files, for
re-evaluation and drift checks later.

Personal data is redacted with the data stage's redactor (data/pii.py) before anything reaches disk
(`--no-log-redact` turns it off). Each record is one `write` on a file opened for appending, so a reader
never sees half a line, whichever process reads. A file past `max_bytes` closes and a new one opens;
past `max_files` files, or files older than `max_age_s`, the oldest go (only lmkiln's own
`requests-*.jsonl`; nothing else in the directory is touched). Logging never fails a request: a record
that cannot be written (a full disk, a directory that cannot be made) is dropped and counted."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

PREFIX, SUFFIX = "requests-", ".jsonl"


class RequestLog:
    def __init__(
        self,
        directory: Path,
        redact: bool = True,
        max_bytes: int = 64 << 20,
        max_files: int = 20,
        max_age_s: float = 30 * 86400,
        on_write: Callable[[bool], None] | None = None,
    ) -> None:
        self.dir, self.redact = Path(directory), redact
        self.max_bytes, self.max_files, self.max_age_s = max_bytes, max_files, max_age_s
        self.on_write = on_write or (lambda written: None)
        self.lock = threading.Lock()
        self.fd: int | None = None
        self.size = 0
        self.written = self.dropped = 0

    def _scrub(self, value):
        from lmkiln.data.pii import redact

        if isinstance(value, str):
            return redact(value)[0]
        if isinstance(value, list):
            return [self._scrub(v) for v in value]
        if isinstance(value, dict):
            return {k: self._scrub(v) for k, v in value.items()}
        return value

    def write(self, record: dict) -> None:
        """Append one record (its input and output redacted); never raises."""
        record = {"time": round(time.time(), 3), **record}
        if self.redact:
            record["input"], record["output"] = self._scrub(record.get("input")), self._scrub(record.get("output"))
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        with self.lock:
            try:
                if self.fd is None or self.size + len(line) > self.max_bytes:
                    self._rotate()
                os.write(self.fd, line)
                self.size += len(line)
                self.written += 1
                ok = True
            except OSError:
                self.dropped += 1
                ok = False
        self.on_write(ok)

    def _rotate(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        path = self.dir / f"{PREFIX}{stamp}-{time.time_ns() % 10**9:09d}{SUFFIX}"
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # prompts and replies: the owner only
        self.size = 0
        self._prune(keep=path)

    def _prune(self, keep: Path) -> None:
        files = sorted(p for p in self.dir.glob(f"{PREFIX}*{SUFFIX}") if p != keep)
        now = time.time()
        old = [p for p in files if now - p.stat().st_mtime > self.max_age_s]
        excess = files[: max(0, len(files) + 1 - self.max_files)]
        for path in {*old, *excess}:
            path.unlink(missing_ok=True)

    def files(self) -> list[Path]:
        return sorted(self.dir.glob(f"{PREFIX}*{SUFFIX}")) if self.dir.is_dir() else []

    def close(self) -> None:
        with self.lock:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
