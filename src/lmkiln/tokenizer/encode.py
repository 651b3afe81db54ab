"""Token shards: a flat little-endian uint16/uint32 array (`NAME.bin`), document starts (`NAME.idx`,
uint64) and a JSON header (`NAME.json`: dtype, vocab size, counts), read back by `numpy.memmap`.

Each document is stored as BOS + tokens + EOS. Encoding runs in parallel in the tokenizers library's
thread pool, a batch of documents at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from lmkiln.errors import UserError
from lmkiln.io import atomic_path, write_json


def shard_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def encode_to_shard(
    tok: Tokenizer,
    texts: Iterable[str],
    path_stem: Path,
    bos: int | None,
    eos: int,
    batch_docs: int = 256,
    on_batch=None,
) -> dict:
    """Each text's ids framed by bos (when the vocabulary has one: T5's has not) and eos, into one shard."""
    dtype = shard_dtype(tok.get_vocab_size())
    starts: list[int] = []
    n = 0
    bin_path = path_stem.with_suffix(".bin")
    with atomic_path(bin_path) as tmp, open(tmp, "wb") as fh:
        batch: list[str] = []

        def flush() -> None:
            nonlocal n
            first = 0 if bos is None else 1
            for enc in tok.encode_batch(batch, add_special_tokens=False):
                ids = np.empty(len(enc.ids) + first + 1, dtype=dtype)
                ids[-1] = eos
                if bos is not None:
                    ids[0] = bos
                ids[first:-1] = enc.ids
                starts.append(n)
                n += len(ids)
                fh.write(ids.tobytes())
            if on_batch:
                on_batch(len(batch))
            batch.clear()

        for text in texts:
            batch.append(text)
            if len(batch) >= batch_docs:
                flush()
        if batch:
            flush()
    with atomic_path(path_stem.with_suffix(".idx")) as tmp:
        np.asarray(starts, dtype="<u8").tofile(tmp)
    header = {
        "dtype": dtype.name,
        "byteorder": "little",
        "vocab_size": tok.get_vocab_size(),
        "num_tokens": n,
        "num_documents": len(starts),
        "bos_token_id": bos,
        "eos_token_id": eos,
        "tokens_file": bin_path.name,
        "doc_starts_file": path_stem.with_suffix(".idx").name,
    }
    write_json(path_stem.with_suffix(".json"), header)
    return header


def open_shard(path_stem: str | Path) -> tuple[np.memmap, dict]:
    path_stem = Path(path_stem)
    header = json.loads(path_stem.with_suffix(".json").read_text())
    if not header["num_tokens"]:  # numpy cannot map an empty file
        raise UserError(
            f"{path_stem.with_suffix('.bin')}: the token shard is empty (0 tokens); rerun `kiln data` "
            f"and `kiln tokenizer` with more data"
        )
    tokens = np.memmap(
        path_stem.with_suffix(".bin"),
        dtype=np.dtype(header["dtype"]).newbyteorder("<"),
        mode="r",
        shape=(header["num_tokens"],),
    )
    return tokens, header
