"""The docstring task: loss on the reference docstring, and ROUGE-L of the generated one."""

from __future__ import annotations

from rouge_score import rouge_scorer
from tokenizers import Tokenizer

from lmkiln.model.generate import generate
from lmkiln.model.transformer import Transformer
from lmkiln.tokenizer.train import special_ids
from lmkiln.train.formats import ChatFormat, encode_all, prompt_ids


def rouge_l(prediction: str, reference: str, scorer=None) -> float:
    scorer = scorer or rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return scorer.score(reference, prediction)["rougeL"].fmeasure


def score_instructions(model: Transformer, tok: Tokenizer, examples: list[dict], max_new_tokens: int,
                       max_len: int, chat: ChatFormat | None = None) -> dict:
    """Reply loss (nats/token) over the references, greedy generations, and their mean ROUGE-L F1."""
    from lmkiln.train.finetune import reply_loss

    device = next(model.parameters()).device
    ids = special_ids(tok)
    encoded, _ = encode_all(tok, examples, max_len, chat)
    nats, count = reply_loss(model, encoded, 8, ids["pad"], device)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    samples, total = [], 0.0
    for ex in examples:
        prompt = prompt_ids(tok, ex, chat)
        if len(prompt) >= model.args.max_seq_len:
            prompt = prompt[-(model.args.max_seq_len - max_new_tokens):]
        out = generate(model, prompt, max_new_tokens, stop_ids=[ids["end"], ids["eos"]])
        text = tok.decode(out).strip()
        score = rouge_l(text, ex["output"], scorer)
        total += score
        samples.append({"id": ex["id"], "input": ex["input"], "reference": ex["output"],
                        "generated": text, "rouge_l": round(score, 4)})
    return {"reply_loss": round(nats / max(count, 1), 5), "rouge_l": round(total / max(len(examples), 1), 5),
            "examples": len(examples), "samples": samples}
