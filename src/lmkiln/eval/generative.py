"""Generative tasks: the reply loss on the references, greedy generations scored by exact match, token
F1 (SQuAD's normalisation: lower case, no punctuation, no articles) and ROUGE-L; and classification rows
scored by each label's likelihood after the text (accuracy, macro-F1). The docstring task is one of them."""

from __future__ import annotations

import re
import string
from collections import Counter

import torch
from rouge_score import rouge_scorer
from tokenizers import Tokenizer

from lmkiln.data.examples import collate, encode_all, messages_of, prompt_text
from lmkiln.device import autocast
from lmkiln.model.families.transformer import Transformer
from lmkiln.model.inference.generate import generate_greedy_batch
from lmkiln.model.io.chat_format import ChatFormat
from lmkiln.model.loss import lm_head, next_token_losses


def rouge_l(prediction: str, reference: str, scorer=None) -> float:
    scorer = scorer or rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return scorer.score(reference, prediction)["rougeL"].fmeasure


def normalize_answer(text: str) -> list[str]:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction), normalize_answer(reference)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref:
        return float(pred == ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def batch_loss(model, batch: list, pad_id: int, device) -> tuple[torch.Tensor, int, int]:
    """Summed next-token loss over the trained tokens of (ids, labels[, segments]) rows, their count,
    and the tokens the batch holds."""
    x, y, seg = collate(batch, pad_id)
    x, y = x.to(device), y.to(device)
    with autocast(device):
        loss, _ = next_token_losses(
            model,
            x,
            y,
            lm_head(getattr(model, "module", model)),  # DDP's or not
            seg.to(device) if seg is not None else None,
        )
    return loss.sum(), len(loss), x.numel()


@torch.no_grad()
def reply_loss(model, encoded: list, batch_size: int, pad_id: int, device) -> tuple[float, int]:
    """Summed next-token loss over reply tokens, and their count."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        loss, n, _ = batch_loss(model, encoded[i : i + batch_size], pad_id, device)
        total += loss.item()
        count += n
    model.train()
    return total, count


def macro_f1(pred: list[int], gold: list[int], num_labels: int) -> float:
    scores = []
    for c in range(num_labels):
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / max(len(scores), 1)


def corpus_scores(hypotheses: list[str], references: list[str], metrics: list[str]) -> dict[str, float]:
    """Corpus BLEU and/or chrF of the hypotheses against one reference each, by sacrebleu with its
    defaults: the numbers its command line prints for the same two files."""
    import sacrebleu

    scorers = {"bleu": sacrebleu.corpus_bleu, "chrf": sacrebleu.corpus_chrf}
    return {m: round(scorers[m](hypotheses, [references]).score, 4) for m in metrics}


def score_instructions(
    model: Transformer,
    tok: Tokenizer,
    examples: list[dict],
    max_new_tokens: int,
    max_len: int,
    chat: ChatFormat,
    metrics: list[str] = (),
    rewards: list = (),
) -> dict:
    """Reply loss (nats/token) over the references, greedy generations of the last reply, and their mean
    exact match, token F1 and ROUGE-L F1; with `metrics`, corpus BLEU and chrF (translation's); with
    `rewards` (eval/rewards.py), each reply's rewards and their means."""

    device = next(model.parameters()).device
    encoded, _ = encode_all(tok, examples, max_len, chat)
    nats, count = reply_loss(model, encoded, 8, chat.pad, device)
    asked, prompts = [prompt_text(ex, chat) for ex in examples], []
    for text in asked:
        prompt = tok.encode(text, add_special_tokens=False).ids
        if len(prompt) >= model.args.max_seq_len:
            prompt = prompt[-(model.args.max_seq_len - max_new_tokens) :]
        prompts.append(prompt)
    replies = generate_greedy_batch(model, prompts, max_new_tokens, sorted(chat.stop_ids))
    texts = [tok.decode(reply).strip() for reply in replies]
    scores = reply_scores(examples, texts, nats / count if count else None, count, metrics)
    if rewards:
        add_rewards(scores, rewards, examples, asked, texts)
    return scores


def add_rewards(scores: dict, rewards: list, examples: list[dict], asked: list[str], texts: list[str]) -> None:
    """Each reply scored by the rewards as GRPO scores a completion (the prompt as the model saw it, the
    row's own fields): the means beside the other scores, each sample's weighted sum with it."""
    from lmkiln.eval.rewards import mean_rewards, score_all, weighted

    cases = [(q, text, ex.get("row", {}), f"row {ex['id']}") for ex, q, text in zip(examples, asked, texts)]
    values = score_all(rewards, cases)
    for sample, row in zip(scores["samples"], values):
        sample["reward"] = round(weighted(rewards, row), 5)
    scores.update(mean_rewards(rewards, values))


def reply_scores(
    examples: list[dict], texts: list[str], loss: float | None, tokens: int, metrics: list[str] = ()
) -> dict:
    """The generated replies against the references (each row's last reply): mean exact match, token F1
    and ROUGE-L, corpus BLEU/chrF when asked, the samples, and the references' loss (nats per token)."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    samples, totals = [], Counter()
    for ex, text in zip(examples, texts):
        reference = messages_of(ex)[-1]["content"]
        scores = {
            "exact_match": exact_match(text, reference),
            "token_f1": token_f1(text, reference),
            "rouge_l": rouge_l(text, reference, scorer),
        }
        totals.update(scores)
        samples.append(
            {
                "id": ex["id"],
                "input": ex.get("input") or messages_of(ex)[-2]["content"],
                "reference": reference,
                "generated": text,
                **{k: round(v, 4) for k, v in scores.items()},
            }
        )
    n = max(len(examples), 1)
    corpus = corpus_scores([s["generated"] for s in samples], [s["reference"] for s in samples], list(metrics))
    # no reference that fits in max_len has no loss to report (not a loss of 0)
    return {
        "reply_loss": round(loss, 5) if loss is not None else None,
        "reply_tokens": tokens,
        **{k: round(totals[k] / n, 5) for k in ("exact_match", "token_f1", "rouge_l")},
        **corpus,
        "examples": len(examples),
        "samples": samples,
    }


def score_labels(
    model: Transformer,
    tok: Tokenizer,
    chat: ChatFormat,
    examples: list[dict],
    delimiter: str = " ",
    add_bos: bool = False,
) -> dict:
    """Classification rows {text, label}: each label scored as the continuation of the text (as an ICL
    multiple-choice task over the file's labels); accuracy and macro-F1 against the majority class."""
    from lmkiln.eval.icl import encode_pair, loglikelihoods

    labels = sorted({ex["label"] for ex in examples})
    bos = chat.bos if add_bos else None
    pairs = [encode_pair(tok, ex["text"], delimiter + label, bos) for ex in examples for label in labels]
    scored = loglikelihoods(model, pairs, greedy=False)
    k = len(labels)
    pred = [max(range(k), key=lambda j: scored[i * k + j][0]) for i in range(len(examples))]
    gold = [labels.index(ex["label"]) for ex in examples]
    majority = Counter(gold).most_common(1)[0][1] / len(gold)
    return {
        "accuracy": round(sum(p == g for p, g in zip(pred, gold)) / len(gold), 5),
        "macro_f1": round(macro_f1(pred, gold, k), 5),
        "majority_accuracy": round(majority, 5),
        "labels": labels,
        "examples": len(examples),
        "predicted": [labels[p] for p in pred],
    }
