"""`kiln finetune --task classify`: a label head on the decoder, in transformers' *ForSequenceClassification
layout (the hidden state of each text's last token through a bias-free `score` layer), trained with
cross-entropy, full or LoRA/DoRA (the head is always trained). Validation accuracy and macro-F1 are measured
before and after, against the majority class, and the best evaluation's weights are kept."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmkiln.data.examples import encode_texts
from lmkiln.errors import UserError
from lmkiln.eval.heads import label_batch, score_classifier
from lmkiln.io import atomic_dir, write_json
from lmkiln.log import console
from lmkiln.model.families import family_of, is_encoder_config
from lmkiln.model.families.encoder import EncoderBase, EncoderClassifier
from lmkiln.model.families.transformer import Transformer
from lmkiln.model.io.checks import require_same_format
from lmkiln.model.io.hub import load_encoder_classifier, load_model, save_state
from lmkiln.model.lora import merge_lora
from lmkiln.runs import FINAL
from lmkiln.train.epochs import Validation, make_trainable, train_always
from lmkiln.train.estimate import print_memory
from lmkiln.train.finetune_run import FinetuneRun, Training


class Classifier(nn.Module):
    def __init__(self, body: Transformer, num_labels: int) -> None:
        super().__init__()
        self.body = body
        self.score = nn.Linear(body.args.hidden_size, num_labels, bias=False)
        nn.init.normal_(self.score.weight, std=0.02)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        hidden = self.body.hidden_states(ids)
        return self.score(hidden[torch.arange(len(ids), device=ids.device), lengths - 1])


def write_labelled_model(
    body, head: dict, out: Path, base_dir: Path, names: list[str], architecture: str, **config
) -> None:
    """An HF *ForSequence/TokenClassification directory: the backbone's weights (no LM head or decoder), the
    head's tensors, and config.json naming the architecture and the labels (and `config`'s other keys)."""
    if isinstance(body, EncoderBase):
        state = body.backbone_state(per_token=architecture.endswith("ForTokenClassification"))
    else:
        state = {k: v for k, v in body.state_dict().items() if not k.startswith("lm_head.")}
    save_state(body.args, {**state, **head}, out, base_dir)
    written = json.loads((out / "config.json").read_text())
    written.update(
        architectures=[architecture],
        num_labels=len(names),
        id2label={str(i): n for i, n in enumerate(names)},
        label2id={n: i for i, n in enumerate(names)},
        **config,
    )
    write_json(out / "config.json", written)


def save_classifier(model: Classifier | EncoderClassifier, out: Path, base_dir: Path, names: list[str]) -> None:
    """A *ForSequenceClassification directory: `score` on a decoder; on an encoder `classifier` (and what
    precedes it in the backbone's weights: ModernBERT's prediction head, BERT's pooler)."""
    if isinstance(model, EncoderClassifier):
        head = {f"classifier.{k}": v for k, v in model.classifier.state_dict().items()}
        extra = {"tie_word_embeddings": True}  # an encoder's config keeps its own
        if family_of(model.body.args).pooled_classifier:
            extra["classifier_pooling"] = model.pooling
    else:
        head = {"score.weight": model.score.weight}
        extra = {"tie_word_embeddings": False}  # a decoder's classifier has no head to tie
    write_labelled_model(
        model.body,
        head,
        out,
        base_dir,
        names,
        family_of(model.body.args).sequence_classifier[model.body.args.arch],
        problem_type="single_label_classification",
        **extra,
    )


def load_classifier(model_dir: Path, device="cpu") -> tuple[Classifier, list[str]]:
    """A classifier directory saved by `save_classifier` (or by transformers), and its label names."""
    from lmkiln.model.io.hub import label_args, load_head_model

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    names = [config["id2label"][str(i)] for i in range(config["num_labels"])]
    if is_encoder_config(config):
        return load_encoder_classifier(model_dir, device)
    # the body as a causal LM whose (unused) head is tied, so it needs no weights of its own
    args = label_args(config, str(model_dir / "config.json"))
    with torch.device("meta"):
        model = Classifier(Transformer(args), len(names))
    expected = {k for k in model.state_dict() if k != "body.lm_head.weight"}
    load_head_model(model, model_dir, expected, lambda name: name if name == "score.weight" else f"body.{name}")
    model.body.lm_head.weight = model.body.model.embed_tokens.weight
    return model.to(device).eval(), names


def _new_classifier(base_dir: Path, num_labels: int, cfg, device) -> tuple[Classifier | EncoderClassifier, int]:
    """The base model with a new label head, made trainable as the recipe says (the head always trains);
    and the trainable parameter count."""
    body = load_model(base_dir, device)
    if isinstance(body, EncoderBase):
        if cfg.pooling != "cls" and not family_of(body.args).pooled_classifier:
            raise UserError(
                f"finetune.pooling={cfg.pooling}: {body.args.arch}'s sequence classifier reads the first token "
                "(transformers has no other pooling for it); leave pooling at cls"
            )
        model = EncoderClassifier(body, num_labels, cfg.pooling)
        head = [*body.feature_params(per_token=False), *model.classifier.parameters()]
    else:
        if cfg.pooling != "cls":
            raise UserError(
                f"finetune.pooling={cfg.pooling} applies to an encoder; a decoder's classifier reads the last token"
            )
        model = Classifier(body, num_labels)
        head = [model.score.weight]
    trainable = make_trainable(body, cfg)
    if not isinstance(body, EncoderBase) and body.lm_head.weight is not body.model.embed_tokens.weight:
        body.lm_head.weight.requires_grad_(False)  # a classifier never uses (nor saves) the LM head
    return model.to(device), trainable + train_always(head)


def save_label_model(run: FinetuneRun, model: nn.Module, names: list[str], write) -> Callable[[Validation], None]:
    """`finish` for a label-head task: the best evaluation's weights back in the model (on every rank), and
    where the run writes, the model as `final/` (LoRA merged first, `write` laying out its directory, the
    base's format required of it)."""

    def finish(guard: Validation) -> None:
        guard.restore_best()
        if not run.writes:
            return
        if run.cfg.method == "lora":
            merge_lora(model.body)
        with atomic_dir(run.out / FINAL) as tmp:
            write(model, tmp, run.base_dir, names)
            require_same_format(run.base_dir, tmp)

    return finish


def _label_data(run: FinetuneRun) -> tuple[list[str], list[dict]]:
    """The label names (sorted) and the validation rows whose label training has."""
    names = sorted({ex["label"] for ex in run.splits["train"]})
    val_ex = [ex for ex in run.splits["val"] if ex["label"] in names]
    if len(names) < 2 or not val_ex:
        raise UserError(f"finetune.data: classification needs 2 or more labels and validation rows (labels: {names})")
    return names, val_ex


def prepare_classifier(run: FinetuneRun) -> Training:
    cfg, device, chat = run.cfg, run.device, run.chat
    names, val_ex = _label_data(run)
    index = {n: i for i, n in enumerate(names)}
    torch.manual_seed(run.recipe.seed)
    model, trainable = _new_classifier(run.base_dir, len(names), cfg, device)
    encoder = isinstance(model, EncoderClassifier)
    train_ids = encode_texts(run.tok, run.splits["train"], cfg.max_seq_len, chat, closed=encoder)
    val_ids = encode_texts(run.tok, val_ex, cfg.max_seq_len, chat, closed=encoder)
    train_y, val_y = [index[ex["label"]] for ex in run.splits["train"]], [index[ex["label"]] for ex in val_ex]
    # padded positions are never read: a decoder reads its last real token, an encoder keeps padding apart
    pad = chat.pad if encoder else (chat.eos if chat.eos is not None else 0)
    majority = Counter(val_y).most_common(1)[0][1] / len(val_y)
    console.print(
        f"classify: {len(names)} labels, train {len(train_ids):,}, val {len(val_ids):,}; "
        f"majority class {majority:.1%} of val"
    )
    print_memory(model.body, cfg, max(map(len, train_ids)), vocab_logits=False)

    def micro_loss(net, batch: list[int]) -> tuple[torch.Tensor, int]:
        x, lengths, y = label_batch(train_ids, train_y, batch, pad, device)
        return F.cross_entropy(net(x, lengths).float(), y, reduction="sum"), x.numel()

    return Training(
        model,
        list(range(len(train_ids))),
        [len(t) for t in train_ids],
        micro_loss,
        len,
        lambda: score_classifier(model, val_ids, val_y, pad, device, cfg.batch_size),
        save_label_model(run, model, names, save_classifier),
        trainable,
        name="classify",
        title="classification fine-tuning",
        facts={"task": "classify", "labels": names, "examples": len(train_ids)},
        scores=lambda guard: {
            "majority_accuracy": round(majority, 4),
            "base_val_accuracy": round(guard.base["accuracy"], 4),
            "val_accuracy": round(guard.best["accuracy"], 4),
            "val_macro_f1": round(guard.best["macro_f1"], 4),
        },
    )
