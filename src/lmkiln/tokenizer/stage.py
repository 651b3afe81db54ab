"""`kiln tokenizer`: learn byte-level BPE on the train split, then encode both splits to token shards."""

from __future__ import annotations

import json
from pathlib import Path

from lmkiln.config import Recipe
from lmkiln.data.stage import read_split
from lmkiln.errors import UserError
from lmkiln.log import console, progress
from lmkiln.model.families import TOKENIZER_KINDS
from lmkiln.runs import stage_dir, upstream
from lmkiln.tokenizer.encode import encode_to_shard
from lmkiln.tokenizer.train import save_tokenizer, special_ids, train_bpe


def check(recipe: Recipe, will_run: list[str]) -> None:
    """The vocabulary kind; nothing else can be checked before the data stage's output is read."""
    if recipe.tokenizer.kind not in TOKENIZER_KINDS:
        raise UserError(
            f"bad value for 'tokenizer.kind': {recipe.tokenizer.kind!r} (expected one of {', '.join(TOKENIZER_KINDS)})"
        )


def config_of(recipe: Recipe) -> dict:
    # a decoder's vocabulary is what it was before encoders existed: its runs stay current
    return recipe.tokenizer.model_dump(mode="json", exclude={"kind"} if recipe.tokenizer.kind == "decoder" else None)


def inputs_of(recipe: Recipe) -> dict:
    return {"data": upstream(recipe.run_dir, "data")}


def build(recipe: Recipe, out: Path) -> dict:
    cfg = recipe.tokenizer
    data_dir = stage_dir(recipe.run_dir, "data")
    stats = json.loads((data_dir / "stats.json").read_text())
    if not stats["train_docs"]:
        raise UserError(
            f"tokenizer: the data stage kept no training documents ({data_dir / 'stats.json'}); "
            f"rerun `kiln data` with more data"
        )
    console.print(f"training byte-level BPE ({cfg.kind} tokens), vocab {cfg.vocab_size:,} ...")
    tok = train_bpe(read_split(data_dir, "train"), cfg.vocab_size, cfg.min_frequency, cfg.max_train_chars, cfg.kind)
    save_tokenizer(tok, out, model_max_length=recipe.model.max_seq_len)
    ids = special_ids(tok)
    metrics: dict = {"vocab_size": tok.get_vocab_size()}
    with progress() as bar:
        for split in ("train", "val"):
            task = bar.add_task(f"encode {split}", total=stats[f"{split}_docs"])
            header = encode_to_shard(
                tok,
                read_split(data_dir, split),
                out / split,
                ids["bos"],
                ids["eos"],
                on_batch=lambda k, t=task: bar.update(t, advance=k),
            )
            metrics[f"{split}_tokens"] = header["num_tokens"]
            if stats[f"{split}_bytes"]:
                metrics[f"{split}_bytes_per_token"] = round(stats[f"{split}_bytes"] / max(1, header["num_tokens"]), 3)
    if not metrics["train_tokens"]:
        raise UserError(
            f"tokenizer: the training split encodes to no tokens ({stats['train_docs']:,} documents "
            f"of {stats['train_bytes']:,} bytes); check the data stage's output"
        )
    console.print(
        f"tokens: train {metrics['train_tokens']:,}, val {metrics['val_tokens']:,} "
        f"({metrics.get('train_bytes_per_token', 0)} bytes/token)"
    )
    return metrics
