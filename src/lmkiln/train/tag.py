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

from lmkiln.data.examples import encode_words
from lmkiln.errors import UserError
from lmkiln.eval.heads import score_tagger, tag_batch
from lmkiln.log import console
from lmkiln.model.chat_format import ChatFormat
from lmkiln.model.encoder import EncoderBase, EncoderTagger
from lmkiln.model.hub import load_model
from lmkiln.model.loss import IGNORE
from lmkiln.train.classify import save_head_model, write_labelled_model
from lmkiln.train.dist import DistContext
from lmkiln.train.tuning import Checkpoints, Validation, make_trainable, run_epochs, train_always

TOKEN_CLS = {
    "modernbert": "ModernBertForTokenClassification",
    "bert": "BertForTokenClassification",
    "roberta": "RobertaForTokenClassification",
}


def save_tagger(model: EncoderTagger, out: Path, base_dir: Path, names: list[str]) -> None:
    """A *ForTokenClassification directory: the encoder (no decoder), its head and the classifier."""
    head = {f"classifier.{k}": v for k, v in model.classifier.state_dict().items()}
    write_labelled_model(model.body, head, out, base_dir, names, TOKEN_CLS[model.body.args.arch])


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
    if not isinstance(body, EncoderBase):
        raise UserError(
            f"finetune.task=tag needs an encoder base (ModernBERT, BERT or RoBERTa); {base_dir} is a decoder"
        )
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
    head = [*body.feature_params(per_token=True), *model.classifier.parameters()]
    trainable = make_trainable(body, cfg) + train_always(head)
    model.to(device)
    console.print(f"tag: {len(names)} tags ({', '.join(names)}), train {len(train):,} sentences, val {len(val):,}")

    def micro_loss(net, idx: list[int]) -> tuple[torch.Tensor, int]:
        x, lengths, y = tag_batch(train, idx, chat.pad, device)
        labelled = y != IGNORE
        return F.cross_entropy(net(x, lengths).float()[labelled], y[labelled], reduction="sum"), x.numel()

    def weight(idx: list[int]) -> int:
        return sum(sum(label != IGNORE for label in train[i][1]) for i in idx)

    guard = Validation(
        model, lambda: score_tagger(model, val, gold, names, chat.pad, device, cfg.batch_size), cfg, on_eval
    )
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
