"""`kiln finetune --task tag`: a label per word (named entities, clause parts) on an encoder, in
transformers' *ForTokenClassification layout, from `{tokens, tags}` rows or CoNLL files with BIO
tags. Words are tokenised one by one (a space before all but the first, as the text has them) and each
word's label stands on its first sub-token, the rest unlabelled, as transformers' run_ner.py does.
Validation reports entity precision, recall and F1 (eval/tagging.py) before and after training."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lmkiln.data.examples import encode_words
from lmkiln.errors import UserError
from lmkiln.eval.heads import score_tagger, tag_batch
from lmkiln.log import console
from lmkiln.model.families import family_of
from lmkiln.model.families.encoder import EncoderBase, EncoderTagger
from lmkiln.model.io.hub import load_model
from lmkiln.model.loss import IGNORE
from lmkiln.train.classify import save_label_model, write_labelled_model
from lmkiln.train.epochs import make_trainable, train_always
from lmkiln.train.finetune_run import FinetuneRun, Training


def save_tagger(model: EncoderTagger, out: Path, base_dir: Path, names: list[str]) -> None:
    """A *ForTokenClassification directory: the encoder (no decoder), its head and the classifier."""
    head = {f"classifier.{k}": v for k, v in model.classifier.state_dict().items()}
    arch = model.body.args.arch
    write_labelled_model(model.body, head, out, base_dir, names, family_of(model.body.args).token_classifier[arch])


def prepare_tagger(run: FinetuneRun) -> Training:
    cfg, device, chat = run.cfg, run.device, run.chat
    body = load_model(run.base_dir, device)
    if not isinstance(body, EncoderBase):
        raise UserError(
            f"finetune.task=tag needs an encoder base (ModernBERT, BERT or RoBERTa); {run.base_dir} is a decoder"
        )
    names = sorted({t for ex in run.splits["train"] for t in ex["tags"]} | {"O"})
    index = {n: i for i, n in enumerate(names)}
    train = [
        encode_words(run.tok, ex["tokens"], ex["tags"], index, cfg.max_seq_len, chat) for ex in run.splits["train"]
    ]
    val_ex = run.splits["val"][: cfg.max_val_examples]
    val = [encode_words(run.tok, ex["tokens"], ex["tags"], index, cfg.max_seq_len, chat) for ex in val_ex]
    if not val:
        raise UserError(f"finetune.data: the validation split of {cfg.data} is empty; add rows or raise val_fraction")
    gold = [ex["tags"] for ex in val_ex]
    torch.manual_seed(run.recipe.seed)
    model = EncoderTagger(body, len(names))
    head = [*body.feature_params(per_token=True), *model.classifier.parameters()]
    trainable = make_trainable(body, cfg) + train_always(head)
    model.to(device)
    console.print(f"tag: {len(names)} tags ({', '.join(names)}), train {len(train):,} sentences, val {len(val):,}")

    def micro_loss(net, idx: list[int]) -> tuple[torch.Tensor, int]:
        x, lengths, y = tag_batch(train, idx, chat.pad, device)
        labelled = y != IGNORE
        return F.cross_entropy(net(x, lengths).float()[labelled], y[labelled], reduction="sum"), x.numel()

    return Training(
        model,
        list(range(len(train))),
        [len(t[0]) for t in train],
        micro_loss,
        lambda idx: sum(sum(label != IGNORE for label in train[i][1]) for i in idx),
        lambda: score_tagger(model, val, gold, names, chat.pad, device, cfg.batch_size),
        save_label_model(run, model, names, save_tagger),
        trainable,
        name="tag",
        title="token classification fine-tuning",
        facts={"task": "tag", "labels": names, "examples": len(train)},
        scores=lambda guard: {
            "base_val_entity_f1": round(guard.base["entity_f1"], 4),
            "val_entity_f1": round(guard.best["entity_f1"], 4),
            "val_entity_precision": round(guard.best["entity_precision"], 4),
            "val_entity_recall": round(guard.best["entity_recall"], 4),
        },
    )
