"""`finetune.task: generate` on a decoder: supervised fine-tuning on text, instruction or chat rows, the
loss on the replies' tokens only (or as `finetune.loss_on` says), optionally packed into full rows."""

from __future__ import annotations

import torch
from torch import nn

from lmkiln.data.examples import encode_all, sample
from lmkiln.errors import UserError
from lmkiln.eval.generative import batch_loss, reply_loss
from lmkiln.log import console
from lmkiln.model.loss import IGNORE
from lmkiln.train.epochs import load_trainable
from lmkiln.train.estimate import print_memory
from lmkiln.train.finetune_run import FinetuneRun, Training, save_best
from lmkiln.train.packing import fill, pack


def _encoded(run: FinetuneRun) -> tuple[list, list, int]:
    """The training and validation examples as (ids, labels), and how many were too long to keep."""
    cfg, tok, chat = run.cfg, run.tok, run.chat
    train, too_long = encode_all(tok, run.splits["train"], cfg.max_seq_len, chat, cfg.loss_on)
    val, _ = encode_all(tok, sample(run.splits["val"], cfg.max_val_examples), cfg.max_seq_len, chat, cfg.loss_on)
    for name, kept, rows in (("training", train, run.splits["train"]), ("validation", val, run.splits["val"])):
        if not kept:
            raise UserError(
                f"finetune.data: none of the {len(rows):,} {name} examples fits in "
                f"finetune.max_seq_len={cfg.max_seq_len} tokens; raise it"
            )
    console.print(
        f"examples: train {len(train):,} ({too_long} longer than {cfg.max_seq_len} tokens dropped), "
        f"val {len(val):,}, test {len(run.splits['test']):,} (held out for eval)"
    )
    return train, val, too_long


def prepare_sft(run: FinetuneRun) -> Training:
    cfg, device, pad = run.cfg, run.device, run.chat.pad  # padded positions are never attended to nor trained
    train, val, too_long = _encoded(run)
    n_examples = len(train)
    if cfg.packing:
        train = pack(train, cfg.max_seq_len)
        console.print(
            f"packing: {n_examples:,} examples in {len(train):,} rows of up to {cfg.max_seq_len} tokens "
            f"({fill(train, cfg.max_seq_len):.0%} full)"
        )
    model, trainable = load_trainable(run.base_dir, cfg, device)
    print_memory(model, cfg, max(len(t[0]) for t in train))

    def evaluate() -> dict:
        total, count = reply_loss(model, val, cfg.batch_size, pad, device)
        return {"loss": total / count}

    def micro_loss(net: nn.Module, batch: list) -> tuple[torch.Tensor, int]:
        loss, _, tokens = batch_loss(net, batch, pad, device)
        return loss, tokens

    return Training(
        model,
        train,
        [len(t[0]) for t in train],
        micro_loss,
        lambda batch: sum(sum(label != IGNORE for label in t[1]) for t in batch),
        evaluate,
        save_best(run, model),
        trainable,
        facts={
            "dora": cfg.method == "lora" and cfg.lora.dora,
            "examples": n_examples,
            "packed_rows": len(train) if cfg.packing else None,
            "dropped_too_long": too_long,
            "total_parameters": model.args.num_params(),
        },
        monitored=True,
    )
