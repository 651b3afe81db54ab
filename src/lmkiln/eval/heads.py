"""Scores of a label-head model: a sequence classifier (accuracy, macro-F1) and a token tagger (entity
precision, recall and F1, eval/tagging.py), with the loss of each. Fine-tuning validates with them
and `kiln eval` reports them, so both count the same way."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmkiln.data.examples import collate
from lmkiln.eval.generative import macro_f1
from lmkiln.eval.tagging import entity_scores
from lmkiln.model.families.encoder import pad_rows
from lmkiln.model.loss import IGNORE


def label_batch(encoded: list[list[int]], labels: list[int], idx: list[int], pad: int, device):
    """Token ids, lengths and label indices of the texts `idx`, padded to the longest."""
    x, lengths = pad_rows([encoded[i] for i in idx], pad)
    return x.to(device), lengths.to(device), torch.tensor([labels[i] for i in idx], device=device)


@torch.no_grad()
def score_classifier(
    model,
    encoded: list[list[int]],
    labels: list[int],
    pad: int,
    device,
    batch_size: int,
    keep_predictions: bool = False,
) -> dict:
    """Loss, accuracy and macro-F1 of `model(ids, lengths)`'s label logits on encoded texts and their
    label indices (and each text's predicted index, when kept); batches of similar length."""
    model.eval()
    pred, loss = [], 0.0
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    by_index = {}
    for k in range(0, len(order), batch_size):
        idx = order[k : k + batch_size]
        x, lengths, y = label_batch(encoded, labels, idx, pad, device)
        logits = model(x, lengths).float()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        by_index.update(zip(idx, logits.argmax(-1).tolist()))
    model.train()
    pred = [by_index[i] for i in range(len(encoded))]
    n = len(labels)
    return {
        "loss": loss / n,
        "accuracy": sum(p == g for p, g in zip(pred, labels)) / n,
        "macro_f1": macro_f1(pred, labels, logits.shape[-1]),
        **({"predicted": pred} if keep_predictions else {}),
    }


def tag_batch(rows: list, idx: list[int], pad: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, lengths and labels (IGNORE on padding) of the rows `idx`."""
    x, y, _ = collate([rows[i] for i in idx], pad)
    lengths = torch.tensor([len(rows[i][0]) for i in idx])
    return x.to(device), lengths.to(device), y.to(device)


@torch.no_grad()
def score_tagger(model, rows: list, gold: list[list[str]], names: list[str], pad: int, device, batch_size: int) -> dict:
    """Loss at the labelled sub-tokens, and entity scores of the predicted tags (a word cut by
    max_seq_len is predicted O)."""
    model.eval()
    loss, count, predicted = 0.0, 0, []
    for k in range(0, len(rows), batch_size):
        idx = list(range(k, min(k + batch_size, len(rows))))
        x, lengths, y = tag_batch(rows, idx, pad, device)
        logits = model(x, lengths).float()
        labelled = y != IGNORE
        loss += F.cross_entropy(logits[labelled], y[labelled], reduction="sum").item()
        count += int(labelled.sum())
        for r, i in enumerate(idx):
            first = [names[t] for t in logits[r][labelled[r]].argmax(-1).tolist()]
            predicted.append(first + ["O"] * (len(gold[i]) - len(first)))
    model.train()
    return {"loss": loss / max(count, 1), **entity_scores(predicted, gold)}
