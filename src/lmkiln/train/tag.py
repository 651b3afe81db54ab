"""`kiln finetune --task tag`: a label per word (named entities, clause parts) on an encoder, in
transformers' ModernBertForTokenClassification layout, from `{tokens, tags}` rows or CoNLL files with BIO
tags. Words are tokenised one by one (a space before all but the first, as the text has them) and each
word's label stands on its first sub-token, the rest unlabelled, as transformers' run_ner.py does.
Validation reports entity precision, recall and F1 (eval/tagging.py) before and after training."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from lmkiln.data.examples import collate
from lmkiln.errors import UserError
from lmkiln.eval.tagging import entity_scores
from lmkiln.log import console
from lmkiln.model.chat_format import ChatFormat
from lmkiln.model.encoder import Encoder, EncoderTagger
from lmkiln.model.hub import load_model
from lmkiln.model.loss import IGNORE
from lmkiln.train.classify import save_head_model, write_labelled_model
from lmkiln.train.dist import DistContext
from lmkiln.train.tuning import Checkpoints, Validation, make_trainable, run_epochs, train_always


def encode_words(
    tok, words: list[str], tags: list[str], index: dict[str, int], max_len: int, chat: ChatFormat
) -> tuple[list[int], list[int]]:
    """([CLS] sub-tokens [SEP], a label on each word's first sub-token); words past max_len are left out."""
    ids, labels = [chat.bos], [IGNORE]
    for i, (word, tag) in enumerate(zip(words, tags)):
        pieces = tok.encode(word if i == 0 else " " + word, add_special_tokens=False).ids or [chat.pad]
        if len(ids) + len(pieces) + 1 > max_len:
            break
        ids += pieces
        labels += [index.get(tag, IGNORE)] + [IGNORE] * (len(pieces) - 1)
    return ids + [chat.eos], labels + [IGNORE]


def _batch(rows: list, idx: list[int], pad: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, lengths and labels (IGNORE on padding) of the rows `idx`."""
    x, y, _ = collate([rows[i] for i in idx], pad)
    lengths = torch.tensor([len(rows[i][0]) for i in idx])
    return x.to(device), lengths.to(device), y.to(device)


@torch.no_grad()
def evaluate(
    model: EncoderTagger, rows: list, gold: list[list[str]], names: list[str], pad: int, device, batch_size: int
) -> dict:
    """Loss at the labelled sub-tokens, and entity scores of the predicted tags (a word cut by
    max_seq_len is predicted O)."""
    model.eval()
    loss, count, predicted = 0.0, 0, []
    for k in range(0, len(rows), batch_size):
        idx = list(range(k, min(k + batch_size, len(rows))))
        x, lengths, y = _batch(rows, idx, pad, device)
        logits = model(x, lengths).float()
        labelled = y != IGNORE
        loss += F.cross_entropy(logits[labelled], y[labelled], reduction="sum").item()
        count += int(labelled.sum())
        for r, i in enumerate(idx):
            first = [names[t] for t in logits[r][labelled[r]].argmax(-1).tolist()]
            predicted.append(first + ["O"] * (len(gold[i]) - len(first)))
    model.train()
    return {"loss": loss / max(count, 1), **entity_scores(predicted, gold)}


def save_tagger(model: EncoderTagger, out: Path, base_dir: Path, names: list[str]) -> None:
    """A ModernBertForTokenClassification directory: the encoder (no decoder), its head and the classifier."""
    head = {f"classifier.{k}": v for k, v in model.classifier.state_dict().items()}
    write_labelled_model(model.body, head, out, base_dir, names, "ModernBertForTokenClassification")


def build_tagger(
    recipe,
    base_dir: Path,
    splits: dict,
    tok,
    out: Path,
    on_eval: Callable[[int, float], None] | None = None,
    save: bool = True,
    ctx: DistContext | None = None,
    checkpoints: Checkpoints | None = None,
) -> dict:
    """Train, validate and save a token classifier; returns the stage metrics."""
    cfg = recipe.finetune
    ctx = ctx or DistContext()
    device = ctx.device
    body = load_model(base_dir, device)
    if not isinstance(body, Encoder):
        raise UserError(f"finetune.task=tag needs an encoder base (model.arch=modernbert); {base_dir} is a decoder")
    names = sorted({t for ex in splits["train"] for t in ex["tags"]} | {"O"})
    index = {n: i for i, n in enumerate(names)}
    chat = ChatFormat(base_dir)
    train = [encode_words(tok, ex["tokens"], ex["tags"], index, cfg.max_seq_len, chat) for ex in splits["train"]]
    val_ex = splits["val"][: cfg.max_val_examples]
    val = [encode_words(tok, ex["tokens"], ex["tags"], index, cfg.max_seq_len, chat) for ex in val_ex]
    if not val:
        raise UserError(f"finetune.data: the validation split of {cfg.data} is empty; add rows or raise val_fraction")
    gold = [ex["tags"] for ex in val_ex]
    torch.manual_seed(recipe.seed)
    model = EncoderTagger(body, len(names))
    trainable = make_trainable(body, cfg) + train_always([*body.head.parameters(), *model.classifier.parameters()])
    model.to(device)
    console.print(f"tag: {len(names)} tags ({', '.join(names)}), train {len(train):,} sentences, val {len(val):,}")

    def micro_loss(net, idx: list[int]) -> tuple[torch.Tensor, int]:
        x, lengths, y = _batch(train, idx, chat.pad, device)
        labelled = y != IGNORE
        return F.cross_entropy(net(x, lengths).float()[labelled], y[labelled], reduction="sum"), x.numel()

    def weight(idx: list[int]) -> int:
        return sum(sum(label != IGNORE for label in train[i][1]) for i in idx)

    guard = Validation(model, lambda: evaluate(model, val, gold, names, chat.pad, device, cfg.batch_size), cfg, on_eval)
    run = run_epochs(
        model,
        cfg,
        list(range(len(train))),
        [len(t[0]) for t in train],
        micro_loss,
        weight,
        guard,
        out,
        recipe.seed,
        "tag",
        ctx,
        checkpoints,
    )
    guard.restore_best()
    if save and ctx.is_main:
        save_head_model(model, cfg, out, base_dir, names, save_tagger, "token classification fine-tuning")
    best, base = guard.best, guard.base
    return {
        "task": "tag",
        "method": cfg.method,
        "labels": names,
        "examples": len(train),
        "skipped_rows": len(splits["skipped"]),
        "base_val_entity_f1": round(base["entity_f1"], 4),
        "val_entity_f1": round(best["entity_f1"], 4),
        "val_entity_precision": round(best["entity_precision"], 4),
        "val_entity_recall": round(best["entity_recall"], 4),
        **run,
        **guard.summary(),
        "trainable_parameters": trainable,
    }
