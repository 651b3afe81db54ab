"""Perplexity and bits per byte on held-out text. Bits per byte compares models with different tokenizers."""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from lmkiln.device import autocast
from lmkiln.model.transformer import Transformer
from lmkiln.tokenizer.train import special_ids, token_byte_lengths


def tokens_of(tok: Tokenizer, texts: Iterable[str], max_tokens: int) -> np.ndarray:
    """Documents as BOS + tokens + EOS, joined, cut at max_tokens + 1."""
    ids = special_ids(tok)
    out: list[int] = []
    for text in texts:
        out += [ids["bos"], *tok.encode(text, add_special_tokens=False).ids, ids["eos"]]
        if len(out) > max_tokens:
            break
    return np.asarray(out[:max_tokens + 1], dtype=np.int64)


@torch.no_grad()
def perplexity(model: Transformer, tok: Tokenizer, tokens: np.ndarray, seq_len: int, batch_size: int = 8) -> dict:
    """Non-overlapping windows of seq_len predicted tokens; returns loss, perplexity and bits per byte."""
    model.eval()
    device = next(model.parameters()).device
    seq_len = min(seq_len, model.args.max_seq_len)
    byte_len = torch.tensor(token_byte_lengths(tok), dtype=torch.float64)
    n = (len(tokens) - 1) // seq_len
    if n == 0:
        raise ValueError("not enough text for one window")
    windows = torch.from_numpy(tokens[: n * seq_len + 1])
    nats, count, nbytes = 0.0, 0, 0.0
    for i in range(0, n, batch_size):
        starts = range(i * seq_len, min(n, i + batch_size) * seq_len, seq_len)
        chunk = torch.stack([windows[s:s + seq_len + 1] for s in starts])
        x, y = chunk[:, :-1].to(device), chunk[:, 1:]
        with autocast(device):
            logits = model(x)
        nats += F.cross_entropy(logits.float().flatten(0, 1).cpu(), y.flatten(), reduction="sum").item()
        count += y.numel()
        nbytes += byte_len[y.flatten()].sum().item()
    loss = nats / count
    return {"loss": round(loss, 5), "perplexity": round(math.exp(loss), 3),
            "bits_per_byte": round(nats / math.log(2) / max(nbytes, 1), 5), "tokens": count}
