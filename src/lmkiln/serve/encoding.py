"""What `kiln serve` offers for an encoder, which reads text whole and generates nothing: embeddings
(any ModernBERT, BERT or RoBERTa directory: the mean of the final hidden states, unit length) and, for a
classifier (*ForSequenceClassification), each label's probability."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from lmkiln.errors import UserError
from lmkiln.io import read_json
from lmkiln.serve.protocol import ApiError


def is_encoder(model_dir: Path) -> bool:
    from lmkiln.model.families import is_encoder_config

    return is_encoder_config(read_json(Path(model_dir) / "config.json"))


class EncoderService:
    def __init__(self, model_dir: Path, device) -> None:
        from lmkiln.model.families import family_of_config
        from lmkiln.model.inference.load import load_format
        from lmkiln.model.io.hub import load_encoder_classifier, load_model

        self.tok, _ = load_format(model_dir)
        config = read_json(model_dir / "config.json")
        arch = (config.get("architectures") or [""])[0]
        if arch.endswith("ForSequenceClassification"):
            self.classifier, self.labels = load_encoder_classifier(model_dir, device)
            self.encoder = self.classifier.body
        elif arch in family_of_config(config).hf_classes:
            self.classifier, self.labels = None, []
            self.encoder = load_model(model_dir, device).eval()
        else:
            raise UserError(
                f"{model_dir}: an encoder's '{arch}' cannot be served (a masked LM, base model or sequence classifier)"
            )
        self.context = self.encoder.args.max_seq_len
        self.lock = threading.Lock()  # one forward at a time: the model's buffers are shared

    def rows(self, texts: list[str]) -> list[list[int]]:
        """Each text as the tokenizer lays it out ([CLS] text [SEP]); too long a text is a 413."""
        rows = []
        for i, text in enumerate(texts):
            ids = self.tok.encode(text).ids
            if len(ids) > self.context:
                raise ApiError(400, f"input[{i}]: {len(ids)} tokens; the context is {self.context}", "input")
            rows.append(ids)
        return rows

    def embeddings(self, texts: list[str]) -> tuple[list[list[float]], int]:
        from lmkiln.model.families.encoder import mean_embeddings

        rows = self.rows(texts)
        with self.lock:
            vectors = mean_embeddings(self.encoder, rows)
        return vectors.tolist(), sum(map(len, rows))

    def classify(self, texts: list[str]) -> tuple[list[dict], int]:
        if self.classifier is None:
            raise ApiError(
                400, "this encoder has no classification head: serve a `kiln finetune --task classify` model"
            )
        from lmkiln.model.families.encoder import pad_rows

        ids, lengths = pad_rows(self.rows(texts))
        device = next(self.classifier.parameters()).device
        with self.lock, torch.no_grad():
            probs = self.classifier(ids.to(device), lengths.to(device)).float().softmax(-1).cpu()
        out = []
        for i, p in enumerate(probs.tolist()):
            best = max(range(len(p)), key=p.__getitem__)
            out.append({"index": i, "label": self.labels[best], "scores": dict(zip(self.labels, p))})
        return out, int(lengths.sum())
