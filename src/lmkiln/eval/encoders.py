"""`kiln eval` on an encoder (ModernBERT, BERT, RoBERTa), which generates nothing, so it is scored on
what its head does:
- a masked-LM directory: the masked-LM loss on the held-out text (task `perplexity`), its windows masked
  by BERT's rule at `pretrain.mask_rate` with a generator keyed by `eval.seed`, the same for every model;
- a sequence classifier: accuracy and macro-F1 on `gen:` classification rows, against the majority class;
- a token tagger: entity precision, recall and F1 on `gen:` tagging rows.
A score a model's head cannot give is left out of its column ("–"), so a base encoder and the classifier
tuned from it sit side by side: the base's masked-LM loss, the tuned model's accuracy."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from lmkiln.data.examples import encode_texts, encode_words
from lmkiln.eval.heads import score_classifier, score_tagger
from lmkiln.io import read_json
from lmkiln.log import console
from lmkiln.model.inference.load import load_format
from lmkiln.model.io.hub import load_encoder_classifier, load_model
from lmkiln.model.loss import next_token_losses
from lmkiln.model.masking import mlm_batch

MASK_TOKENS = ("[MASK]", "<mask>")


def mask_id_of(model_dir: Path, tok) -> int | None:
    """The mask token's id: tokenizer_config.json's mask_token, else BERT's or RoBERTa's spelling."""
    named = read_json(model_dir / "tokenizer_config.json").get("mask_token")
    named = named.get("content") if isinstance(named, dict) else named
    for token in (named, *MASK_TOKENS):
        if isinstance(token, str) and tok.token_to_id(token) is not None:
            return tok.token_to_id(token)
    return None


@torch.no_grad()
def mlm_loss(
    model,
    tok,
    chat,
    texts: Iterable[str],
    mask_id: int,
    max_tokens: int,
    seq_len: int,
    rate: float,
    seed: int,
    batch_size: int = 8,
) -> dict:
    """Mean loss at the masked positions of the held-out documents, each framed [CLS] text [SEP] and
    packed into windows of seq_len tokens (a document a segment of its own, as in pretraining)."""
    stream: list[int] = []
    for text in texts:
        stream += [chat.bos, *tok.encode(text, add_special_tokens=False).ids, chat.eos]
        if len(stream) >= max_tokens:
            break
    n = min(len(stream), max_tokens) // seq_len
    if n == 0:
        raise ValueError(f"the held-out text has {len(stream)} tokens; the masked-LM loss needs {seq_len}")
    windows = np.asarray(stream[: n * seq_len], dtype=np.int64).reshape(n, seq_len)
    ids = {"cls": chat.bos, "sep": chat.eos, "pad": chat.pad, "mask": mask_id}
    x, y, seg = mlm_batch(windows, np.random.default_rng(seed), rate, ids, model.args.vocab_size)
    device = next(model.parameters()).device
    weight, bias = model.output_layer()
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        xb, yb, sb = (t[i : i + batch_size].to(device) for t in (x, y, seg))
        losses, _ = next_token_losses(model, xb, yb, weight, sb, bias=bias)
        total, count = total + losses.sum().item(), count + len(losses)
    return {"loss": total / max(count, 1), "masked_tokens": count, "tokens": n * seq_len, "mask_rate": rate}


def score_classification(model, names: list[str], tok, chat, rows: list[dict], max_len: int, device) -> dict:
    """Accuracy and macro-F1 of a sequence classifier on {text, label} rows, and the majority class's
    accuracy; rows whose label the classifier was not trained on are left out (and counted)."""
    index = {n: i for i, n in enumerate(names)}
    known = [r for r in rows if r["label"] in index]
    if not known:
        raise ValueError(f"none of the rows' labels is one the classifier knows ({', '.join(names)})")
    encoded = encode_texts(tok, known, max_len, chat, closed=True)
    labels = [index[r["label"]] for r in known]
    scores = score_classifier(model, encoded, labels, chat.pad, device, batch_size=16, keep_predictions=True)
    predicted = iter(names[p] for p in scores["predicted"])
    return {
        "accuracy": round(scores["accuracy"], 5),
        "macro_f1": round(scores["macro_f1"], 5),
        "loss": round(scores["loss"], 5),
        "majority_accuracy": round(Counter(labels).most_common(1)[0][1] / len(labels), 5),
        "labels": names,
        "examples": len(known),
        "unknown_label_rows": len(rows) - len(known),
        "predicted": [next(predicted) if r["label"] in index else None for r in rows],
    }


def score_tagging(model, names: list[str], tok, chat, rows: list[dict], max_len: int, device) -> dict:
    """Entity precision, recall and F1 of a tagger on {tokens, tags} rows (tags it does not know count
    as wrong predictions of them)."""
    index = {n: i for i, n in enumerate(names)}
    encoded = [encode_words(tok, r["tokens"], r["tags"], index, max_len, chat) for r in rows]
    scores = score_tagger(model, encoded, [r["tags"] for r in rows], names, chat.pad, device, batch_size=16)
    return {**{k: round(v, 5) for k, v in scores.items()}, "examples": len(rows)}


def evaluate_encoder(
    path: Path,
    name: str,
    recipe,
    texts: Callable[[], Iterable[str]],
    labelled: dict[str, list[dict]],
    device,
) -> dict:
    """Every score the encoder at `path` can give: the masked-LM loss (task `perplexity`) and, per
    labelled task, classification or tagging scores; a task its head cannot do is noted and skipped."""
    cfg = recipe.eval
    tok, chat = load_format(path)
    architecture = (read_json(path / "config.json").get("architectures") or [""])[0]
    res: dict = {"path": str(path)}
    skipped = [t for t in cfg.tasks if not t.startswith("gen:") and t != "perplexity"]
    if architecture.endswith(("ForSequenceClassification", "ForTokenClassification")):
        model, names = load_encoder_classifier(path, device)
        per_token = architecture.endswith("ForTokenClassification")
        max_len = min(recipe.finetune.max_seq_len, model.body.args.max_seq_len)
        for task, rows in labelled.items():
            if ("tags" in rows[0]) != per_token:
                skipped.append(task)
                continue
            score = score_tagging if per_token else score_classification
            res[task] = score(model, names, tok, chat, rows, max_len, device)
        skipped += ["perplexity"] if "perplexity" in cfg.tasks else []
    else:
        model = load_model(path, device).eval()
        skipped += list(labelled)
        mask_id = mask_id_of(path, tok)
        if "perplexity" in cfg.tasks and (mask_id is None or not getattr(model.args, "masked_lm", True)):
            skipped.append("perplexity")
        elif "perplexity" in cfg.tasks:
            seq_len = min(cfg.seq_len, model.args.max_seq_len)
            rate = recipe.pretrain.mask_rate
            res["mlm"] = mlm_loss(model, tok, chat, texts(), mask_id, cfg.max_tokens, seq_len, rate, cfg.seed)
    if skipped:
        console.print(f"{name}: an encoder ({architecture}): no score for {', '.join(skipped)}")
    return res
