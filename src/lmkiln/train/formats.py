"""Fine-tuning data: instruction records (instruction, input, output) from JSONL or the builtin task,
rendered with the chat template and tokenised with labels only on the assistant's reply."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from lmkiln.data.split import is_heldout, unit_hash
from lmkiln.errors import UserError
from lmkiln.io import iter_jsonl
from lmkiln.tokenizer.chat import instruction_messages, render

BUILTIN_TASKS = ("builtin:python-docstrings",)
IGNORE = -100


def check_source(source: str) -> None:
    if source.startswith("builtin:"):
        if source not in BUILTIN_TASKS:
            raise UserError(f"finetune.data: '{source}' is not a builtin task (known: {', '.join(BUILTIN_TASKS)})")
    elif not Path(source).is_file():
        raise UserError(f"finetune.data: '{source}' does not exist (expected a JSONL file or {BUILTIN_TASKS[0]})")


def read_instruction_jsonl(path: Path) -> list[dict]:
    rows = []
    for lineno, row in iter_jsonl(path):
        for key in ("instruction", "output"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise UserError(f"{path}:{lineno}: field '{key}' must be a non-empty string")
        if not isinstance(row.get("input", ""), str):
            raise UserError(f"{path}:{lineno}: field 'input' must be a string")
        rows.append({"instruction": row["instruction"], "input": row.get("input", ""),
                     "output": row["output"], "id": f"{path.name}:{lineno}", "split": row.get("split")})
    if not rows:
        raise UserError(f"{path}: no examples")
    return rows


def load_splits(source: str, val_fraction: float, heldout_fraction: float) -> dict[str, list[dict]]:
    """train/val/test examples. The builtin task's test modules are those the corpus held out at
    `heldout_fraction`; a JSONL file uses its `split` field, or carves `val_fraction` out by row."""
    check_source(source)
    if source == "builtin:python-docstrings":
        from lmkiln.data.builtin import docstring_splits

        return docstring_splits(heldout_fraction, val_fraction)
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for row in read_instruction_jsonl(Path(source)):
        split = row.pop("split") or ("val" if is_heldout(row["id"], val_fraction) else "train")
        if split not in splits:
            raise UserError(f"{source}: row {row['id']}: split '{split}' is not train, val or test")
        splits[split].append(row)
    if not splits["val"]:
        splits["val"] = splits["test"]
    return splits


def sample(examples: list[dict], n: int, salt: str = "sample") -> list[dict]:
    """A deterministic, module-spread subset: the n examples with the smallest hash of their id."""
    return sorted(examples, key=lambda ex: unit_hash(ex["id"], salt))[:n]


def encode_example(tok: Tokenizer, ex: dict) -> tuple[list[int], list[int]]:
    """(input ids, labels) with labels = -100 everywhere but the assistant reply and its end token.

    Prompt and reply are encoded as separate pieces, so the prompt's tokens are exactly those a
    generation request sends (BPE could otherwise merge the newline before a reply into its first word).
    """
    text, spans = render(instruction_messages(ex["instruction"], ex.get("input", ""), ex["output"]))
    ids: list[int] = []
    trained: list[bool] = []
    pos = 0
    for start, end in spans + [(len(text), len(text))]:
        for piece, train in ((text[pos:start], False), (text[start:end], True)):
            if piece:
                piece_ids = tok.encode(piece, add_special_tokens=False).ids
                ids += piece_ids
                trained += [train] * len(piece_ids)
        pos = end
    # The label at position i is the token at i + 1 (next-token prediction).
    labels = [ids[i + 1] if trained[i + 1] else IGNORE for i in range(len(ids) - 1)] + [IGNORE]
    return ids, labels


def prompt_ids(tok: Tokenizer, ex: dict) -> list[int]:
    text, _ = render(instruction_messages(ex["instruction"], ex.get("input", "")), add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False).ids


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    x = torch.full((len(batch), width), pad_id, dtype=torch.long)
    y = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for i, (ids, labels) in enumerate(batch):
        x[i, :len(ids)] = torch.tensor(ids)
        y[i, :len(labels)] = torch.tensor(labels)
    return x, y


def encode_all(tok: Tokenizer, examples: list[dict], max_len: int) -> tuple[list, int]:
    """Encoded examples that fit in max_len tokens, and how many were too long."""
    out, too_long = [], 0
    for ex in examples:
        ids, labels = encode_example(tok, ex)
        if len(ids) > max_len:
            too_long += 1
        else:
            out.append((ids, labels))
    return out, too_long
