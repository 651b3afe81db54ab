"""Perplexity and bits per byte on held-out text. Bits per byte compares models with different tokenizers."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from tokenizers import Tokenizer

from lmkiln.device import autocast
from lmkiln.model.families.transformer import Transformer
from lmkiln.model.io.chat_format import ChatFormat
from lmkiln.model.loss import IGNORE, lm_head, next_token_losses
from lmkiln.tokenizer.train import token_byte_lengths


def tokens_of(tok: Tokenizer, chat: ChatFormat, texts: Iterable[str], max_tokens: int) -> np.ndarray:
    """Documents as the model's BOS + tokens + EOS (each where the model has one), joined, cut at
    max_tokens + 1."""
    head = [chat.bos] if chat.bos is not None else []
    tail = [chat.eos] if chat.eos is not None else []
    out: list[int] = []
    for text in texts:
        out += [*head, *tok.encode(text, add_special_tokens=False).ids, *tail]
        if len(out) > max_tokens:
            break
    return np.asarray(out[: max_tokens + 1], dtype=np.int64)


@torch.no_grad()
def perplexity(
    model: Transformer, tok: Tokenizer, tokens: np.ndarray, seq_len: int, batch_size: int = 8, stride: int | None = None
) -> dict:
    """Loss, perplexity and bits per byte over windows of seq_len tokens. With `stride` < seq_len the
    windows overlap (a sliding window): each scores only the targets the previous one did not, so every
    token is predicted once, with at least seq_len - stride tokens of context."""
    model.eval()
    device = next(model.parameters()).device
    seq_len = min(seq_len, model.args.max_seq_len)
    stride = min(stride or seq_len, seq_len)
    byte_len = torch.tensor(token_byte_lengths(tok), dtype=torch.float64)
    starts = list(range(0, len(tokens) - seq_len, stride))
    if not starts:
        raise ValueError("not enough text for one window")
    all_tokens = torch.from_numpy(tokens)
    head = lm_head(model)
    nats, count, nbytes = 0.0, 0, 0.0
    for i in range(0, len(starts), batch_size):
        chunk = torch.stack([all_tokens[s : s + seq_len + 1] for s in starts[i : i + batch_size]])
        x, y = chunk[:, :-1].to(device), chunk[:, 1:].clone()
        for row, s in enumerate(starts[i : i + batch_size]):
            if s > 0:  # the targets before the last `stride` were scored by the previous window
                y[row, : seq_len - stride] = IGNORE
        with autocast(device):
            losses, _ = next_token_losses(model, x, y.to(device), head)
        nats += losses.sum().item()
        scored = y[y != IGNORE]
        count += scored.numel()
        nbytes += byte_len[scored].sum().item()
    loss = nats / count
    return {
        "loss": round(loss, 5),
        "perplexity": round(math.exp(loss), 3),
        "bits_per_byte": round(nats / math.log(2) / max(nbytes, 1), 5),
        "tokens": count,
    }
