"""`kiln eval` on an encoder-decoder (T5): `gen:` instruction and chat rows (and the docstring task) as
text to text. The reply loss is the targets' nats per token with the input encoded; the replies are
greedy (or beam search, `eval.num_beams`), scored as a decoder's are (exact match, token F1, ROUGE-L, and
`eval.metrics`' BLEU and chrF). Tasks that score a decoder's continuations (perplexity, ICL, label
likelihoods) are noted and left out."""

from __future__ import annotations

from pathlib import Path

import torch

from lmkiln.data.examples import encode_pairs, source_and_target
from lmkiln.eval.generative import reply_scores
from lmkiln.log import console
from lmkiln.model.families.t5 import pair_batch, target_losses
from lmkiln.model.inference.load import load_format
from lmkiln.model.inference.t5_generate import generate, input_ids
from lmkiln.model.io.hub import load_model


@torch.no_grad()
def score_text_to_text(
    model, tok, rows: list[dict], max_len: int, max_new_tokens: int, num_beams: int, metrics
) -> dict:
    a, device = model.args, next(model.parameters()).device
    pairs = encode_pairs(tok, rows, max_len, a.eos_token_id)
    total = 0.0
    for i in range(0, len(pairs), 8):
        batch = pair_batch(
            pairs, list(range(i, min(i + 8, len(pairs)))), a.pad_token_id, a.decoder_start_token_id, device
        )
        total += target_losses(model, model.lm_head.weight, batch).sum().item()
    tokens = sum(len(t) for _, t in pairs)
    texts = []
    for row in rows:
        ids = input_ids(tok, source_and_target(row)[0], a.eos_token_id)[-max_len:]
        texts.append(tok.decode(generate(model, ids, max_new_tokens, num_beams), skip_special_tokens=True).strip())
    return reply_scores(rows, texts, total / tokens if tokens else None, tokens, metrics)


def evaluate_seq2seq(path: Path, name: str, recipe, generative: dict, docstrings: list | None, device) -> dict:
    cfg = recipe.eval
    tok, _ = load_format(path)
    model = load_model(path, device).eval()
    res: dict = {"path": str(path)}
    tasks = dict(generative)
    if docstrings is not None:
        tasks["docstrings"] = docstrings
    skipped = [t for t in cfg.tasks if not t.startswith("gen:") and t != "docstrings"]
    max_len = min(recipe.finetune.max_seq_len, model.args.max_seq_len)
    for task, rows in tasks.items():
        if "label" in rows[0] or "tags" in rows[0]:
            skipped.append(task)
            continue
        res[task] = score_text_to_text(model, tok, rows, max_len, cfg.max_new_tokens, cfg.num_beams, cfg.metrics)
    if skipped:
        console.print(f"{name}: an encoder-decoder: no score for {', '.join(skipped)}")
    return res
