"""In-context-learning tasks in MosaicML's ICL JSONL format (also nanochat's CORE), zero- or few-shot:

  multiple_choice     {query, choices, gold}             which choice follows the query
  schema              {context_options, continuation, gold}  which context the continuation follows
  language_modeling   {context, continuation}            is the continuation the greedy one
  bias                {sent_more, sent_less, bias_type}  CrowS-Pairs: which sentence the model finds likelier

Scoring follows lm-evaluation-harness, so the numbers agree with it: a request is a (context,
continuation) pair with the continuation written as `delimiter + choice` (" " by default); whitespace at
the end of the context moves to the front of the continuation; the continuation's tokens are those of
encode(context + continuation) after the first len(encode(context)); no BOS unless `add_bos`.
`acc` picks the highest summed log-probability, `acc_norm` divides it by the choice's length in
characters, and `centered` rescales accuracy so the random baseline is 0 and a perfect score 1.
Language-modelling tasks score `acc` (every continuation token greedy) and, as the harness's
`perplexity`, exp of the mean negative log-likelihood of a continuation.

Bias pairs differ only in a demographic term; `sent_more` is the more stereotyping one. The score,
`pct_stereotype`, is the share of pairs whose `sent_more` has the higher log-likelihood: for generated
probes that name their terms, of the rest of the sentence given BOS and the term, so that a frequent
term ("American") does not make its sentence likelier whatever it says (CrowS-Pairs conditions on the
group term for the same reason); for occupation probes and a user's file, of each sentence whole after
BOS (or EOS where there is none). 0.5 means no preference either way, overall and per `bias_type`, each
axis with a bootstrap 95% interval (eval/bias_probes.py). `builtin:bias` is 2,528 pairs on five axes
generated from templates (eval/probes/axes/); `builtin:bias-small` 30 hand-written pairs.

Few-shot prompts: k examples drawn from the same file without the scored one (`random.Random(seed +
index)`), each written as it would be answered (`query + delimiter + gold choice`; for schema, the gold
context + delimiter + continuation), joined by `separator` ("\n\n"), then the separator and the
scored document.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmkiln.device import autocast
from lmkiln.errors import UserError
from lmkiln.io import text_lines
from lmkiln.model.families.transformer import visible_keys
from lmkiln.model.io.chat_format import ChatFormat
from lmkiln.model.loss import lm_head, token_logprobs

KINDS = ("multiple_choice", "schema", "language_modeling", "bias")
AXES_PREFIX = "bias:"  # bias:DIR: probes generated from a directory of a user's own axis files
BUILTIN = {
    "builtin:bias": Path(__file__).parent / "probes" / "axes",  # generated: eval/bias_probes.py
    "builtin:bias-small": Path(__file__).parent / "probes" / "bias_pairs.jsonl",  # 30 hand-written pairs
}


@dataclass
class IclTask:
    name: str
    path: str
    kind: str | None = None  # told by the first line's fields when None
    shots: int = 0
    delimiter: str = " "
    separator: str = "\n\n"
    max_examples: int | None = None


def _kind_of(doc: dict) -> str:
    if "choices" in doc:
        return "multiple_choice"
    if "context_options" in doc:
        return "schema"
    if "context" in doc:
        return "language_modeling"
    if "sent_more" in doc:
        return "bias"
    raise ValueError(
        f"fields {sorted(doc)} match no ICL format (multiple_choice {{query, choices, gold}}, "
        f"schema {{context_options, continuation, gold}}, language_modeling {{context, continuation}}, "
        f"bias {{sent_more, sent_less, bias_type}})"
    )


def _check(doc: dict, kind: str) -> None:
    def strings(key: str) -> None:
        v = doc.get(key)
        if not isinstance(v, list) or len(v) < 2 or not all(isinstance(s, str) for s in v):
            raise ValueError(f"'{key}' must be a list of 2 or more strings")

    def string(key: str) -> None:
        if not isinstance(doc.get(key), str):
            raise ValueError(f"'{key}' must be a string")

    if kind == "multiple_choice":
        string("query"), strings("choices")
        options = doc["choices"]
    elif kind == "schema":
        strings("context_options"), string("continuation")
        options = doc["context_options"]
    elif kind == "bias":
        string("sent_more"), string("sent_less"), string("bias_type")
        return
    else:
        string("context"), string("continuation")
        return
    gold = doc.get("gold")
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(options):
        raise ValueError(f"'gold' must be an index into the {len(options)} options, got {gold!r}")


def task_path(ref: str) -> Path:
    """Where a task's documents are: a built-in's file or axis directory, bias:DIR's directory, a file."""
    return BUILTIN.get(ref) or Path(ref.removeprefix(AXES_PREFIX))


def load_docs(path: str | Path, kind: str | None = None) -> tuple[list[dict], str]:
    """The documents of an ICL file, each checked; a bad line is a UserError naming file and line."""
    ref = str(path)
    path = task_path(ref)
    if ref.startswith(AXES_PREFIX) or path.is_dir():  # builtin:bias or bias:DIR, generated from axis files
        from lmkiln.eval.bias_probes import generate

        if not path.is_dir() or not any(path.glob("*.yaml")):
            raise UserError(
                f"eval task '{ref}': expected a directory of bias axis files (*.yaml), see {BUILTIN['builtin:bias']}"
            )
        return generate(path), "bias"
    if not path.is_file():
        raise UserError(f"eval task file '{path}' does not exist")
    docs = []
    for n, line in text_lines(path):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            if not isinstance(doc, dict):
                raise ValueError("expected a JSON object")
            kind = kind or _kind_of(doc)
            _check(doc, kind)
        except (json.JSONDecodeError, ValueError) as exc:
            raise UserError(f"{path}:{n}: {exc}") from None
        docs.append(doc)
    if not docs:
        raise UserError(f"{path}: no documents")
    return docs, kind


def _answered(doc: dict, kind: str, delimiter: str) -> str:
    if kind == "multiple_choice":
        return doc["query"] + delimiter + doc["choices"][doc["gold"]]
    if kind == "schema":
        return doc["context_options"][doc["gold"]] + delimiter + doc["continuation"]
    return doc["context"] + delimiter + doc["continuation"]


def requests_of(docs: list[dict], kind: str, index: int, task: IclTask, seed: int) -> list[tuple[str, str]]:
    """The (context, continuation) pairs that score document `index`, one per option."""
    doc = docs[index]
    prefix = ""
    if task.shots:
        others = [j for j in range(len(docs)) if j != index]
        shots = random.Random(seed + index).sample(others, min(task.shots, len(others)))
        prefix = task.separator.join(_answered(docs[j], kind, task.delimiter) for j in shots) + task.separator
    if kind == "multiple_choice":
        return [(prefix + doc["query"], task.delimiter + c) for c in doc["choices"]]
    if kind == "schema":
        return [(prefix + c, task.delimiter + doc["continuation"]) for c in doc["context_options"]]
    return [(prefix + doc["context"], task.delimiter + doc["continuation"])]


def encode_pair(tok, context: str, continuation: str, bos: int | None) -> tuple[list[int], list[int]]:
    """Context and continuation tokens by the harness's rules (see the module docstring)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok.encode(context + continuation, add_special_tokens=False).ids
    ctx = tok.encode(context, add_special_tokens=False).ids
    start = [bos] if bos is not None else []
    if not ctx and not start:
        raise ValueError("an empty context needs a BOS token to condition on (set eval.add_bos)")
    return start + ctx, whole[len(ctx) :]


def _rows(pairs: list[tuple[list[int], list[int]]], limit: int) -> list[tuple[list[int], list[tuple[int, list[int]]]]]:
    """Pairs grouped into rows: (context ids, [(pair index, continuation ids), ...]). Pairs whose context
    ids are equal (the choices of a multiple-choice document) share one row. A pair longer than the
    model's context keeps its last max_seq_len + 1 tokens, in a row of its own."""
    rows: dict[tuple, tuple[list[int], list]] = {}
    filled: dict[tuple, int] = {}  # tokens in the open row of each context
    chunk: dict[tuple, int] = {}
    for i, (ctx, cont) in enumerate(pairs):
        if len(ctx) + len(cont) - 1 > limit:
            cont = cont[-limit:]
            ctx = (ctx + cont)[-(limit + 1) :][: -len(cont)] or ctx[-1:]
            key: tuple = ("alone", i)
        else:
            # a context shared by many pairs (every bias sentence starts from BOS) opens a new row each
            # `limit` tokens: one row of thousands would need a mask of millions of entries
            shared = tuple(ctx)
            if filled.get(shared, 0) + len(cont) > limit:
                chunk[shared], filled[shared] = chunk.get(shared, 0) + 1, 0
            filled[shared] = filled.get(shared, len(ctx)) + len(cont)
            key = (shared, chunk.get(shared, 0))
        rows.setdefault(key, (ctx, []))[1].append((i, cont))
    return list(rows.values())


def _layout(ctx: list[int], conts: list[list[int]]) -> tuple[list[int], list[int], np.ndarray, list[list[int]]]:
    """One row: the context, then the continuations as a prefix tree, each token once however many
    continuations begin with it (the last token of each is left out: nothing is predicted from it),
    at the positions it has after the context alone. Returns the tokens, their positions, which tokens
    each may attend to (T x T: its ancestors and itself), and for each continuation the row indices its
    tokens are predicted from: the context's last token, then the tree nodes of its own prefixes."""
    tokens, positions, parent = list(ctx), list(range(len(ctx))), list(range(-1, len(ctx) - 1))
    node: dict[tuple, int] = {}
    sources = []
    for cont in conts:
        src, at = [len(ctx) - 1], len(ctx) - 1
        for k in range(len(cont) - 1):
            key = tuple(cont[: k + 1])
            if key not in node:
                node[key] = len(tokens)
                tokens.append(cont[k])
                positions.append(len(ctx) + k)
                parent.append(at)
            at = node[key]
            src.append(at)
        sources.append(src)
    sees = np.zeros((len(tokens), len(tokens)), dtype=bool)
    for i, p in enumerate(parent):  # parents come first: each row is its parent's plus itself
        if p >= 0:
            sees[i] = sees[p]
        sees[i, i] = True
    return tokens, positions, sees, sources


LINE_TOKENS = 160  # rows are packed end to end into lines of about this many tokens (or the longest row)


def _lines(laid: list, capacity: int) -> list[list]:
    """Rows packed first-fit, longest first, into lines of at most `capacity` tokens: a batch of lines
    has almost no padding, where rows of ragged lengths side by side would (each line is one sequence
    whose mask keeps its rows apart)."""
    lines: list[list] = []
    room: list[int] = []
    for row in sorted(laid, key=lambda row: -len(row[0][0])):
        n = len(row[0][0])
        k = next((k for k, free in enumerate(room) if free >= n), None)
        if k is None:
            lines.append([])
            room.append(capacity)
            k = len(lines) - 1
        lines[k].append(row)
        room[k] -= n
    return lines


@torch.no_grad()
def loglikelihoods(
    model, pairs: list[tuple[list[int], list[int]]], batch_size: int = 16, greedy: bool = True
) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): the continuation's summed log-probability and whether
    every one of its tokens is the greedy choice (False for all with `greedy=False`, which skips that
    pass over the vocabulary: multiple-choice scoring needs only the sums).

    The choices of a document share their context and any common beginning, so each token runs once: a
    row holds the context and the continuations as a prefix tree, each token at the position it would
    have alone and attending only to what precedes it there (the same numbers as one forward per
    choice). Rows are packed into lines of about LINE_TOKENS tokens, `batch_size` x 128 tokens a
    forward; the LM head runs only where a continuation token is predicted, a chunk at a time."""
    model.eval()
    device = next(model.parameters()).device
    laid = [(_layout(ctx, [c for _, c in members]), members) for ctx, members in _rows(pairs, model.args.max_seq_len)]
    if not laid:
        return []
    if all(len(members) == 1 for _, members in laid):  # no tree anywhere: a row per sequence, causal
        lines = [[row] for row in sorted(laid, key=lambda row: -len(row[0][0]))]
        capacity = max(64, sum(len(row[0][0]) for row in laid) // len(laid))
    else:
        capacity = max(LINE_TOKENS, max(len(row[0][0]) for row in laid))
        lines = _lines(laid, capacity)
    per_batch = max(1, batch_size * 128 // capacity)
    out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    for b in range(0, len(lines), per_batch):
        batch = lines[b : b + per_batch]
        width = max(sum(len(row[0][0]) for row in line) for line in batch)
        x = torch.zeros(len(batch), width, dtype=torch.long)
        pos = torch.zeros(len(batch), width, dtype=torch.long)
        sees = np.broadcast_to(np.eye(width, dtype=bool), (len(batch), width, width)).copy()  # padding: itself
        at, targets, members_in_order = [], [], []
        for r, line in enumerate(batch):
            start = 0
            for (tokens, positions, row_sees, sources), members in line:
                end = start + len(tokens)
                x[r, start:end], pos[r, start:end] = torch.tensor(tokens), torch.tensor(positions)
                sees[r, start:end, start:end] = row_sees
                for src, (_, cont) in zip(sources, members):
                    at += [(r, start + c) for c in src]
                    targets += cont
                members_in_order += members
                start = end
        if all(len(line) == 1 and len(line[0][1]) == 1 for line in batch):
            layout = None  # one sequence a row, right-padded: the model's own causal path
        else:
            mask = torch.from_numpy(sees)
            if model.args.sliding_window is not None:
                mask &= visible_keys(pos, pos[:, None, :], model.args.sliding_window)
            # additive, made once: SDPA would turn a boolean mask into this in every layer
            bias = torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, float("-inf"))
            layout = (pos.to(device), bias[:, None].to(device))
        # each predicting position once through the head, however many continuations it predicts for
        flat = torch.tensor([r * width + c for r, c in at])
        unique, rows = flat.unique(sorted=True, return_inverse=True)
        order = rows.argsort(stable=True)
        with autocast(device):
            hidden = model(x.to(device), hidden_only=True, layout=layout).flatten(0, 1)
            scored, best = token_logprobs(
                hidden[unique.to(device)],
                lm_head(model),
                torch.tensor(targets, device=device)[order.to(device)],
                greedy=greedy,
                rows=rows[order].to(device),
            )
        picked = torch.empty(len(targets), dtype=scored.dtype)
        picked[order] = scored.cpu()
        top = torch.zeros(len(targets), dtype=torch.bool)
        if best is not None:
            top[order] = best.cpu()
        k = 0
        for i, cont in members_in_order:
            out[i] = (picked[k : k + len(cont)].sum().item(), bool(top[k : k + len(cont)].all()))
            k += len(cont)
    return out


def score_docs(
    docs: list[dict], kind: str, results: list[list[tuple[float, bool]]], choices_text: list[list[str]]
) -> dict:
    """acc, acc_norm, centered and the per-document correctness (for paired comparisons)."""
    correct, correct_norm, baseline, nll = [], [], 0.0, 0.0
    for doc, res, texts in zip(docs, results, choices_text):
        if kind == "language_modeling":
            correct.append(res[0][1])
            correct_norm.append(res[0][1])
            nll -= res[0][0]
            continue
        ll = [r[0] for r in res]
        norm = [v / max(len(t), 1) for v, t in zip(ll, texts)]
        correct.append(max(range(len(ll)), key=ll.__getitem__) == doc["gold"])
        correct_norm.append(max(range(len(norm)), key=norm.__getitem__) == doc["gold"])
        baseline += 1 / len(ll)
    n = len(docs)
    acc, acc_norm, base = sum(correct) / n, sum(correct_norm) / n, baseline / n
    return {
        "acc": round(acc, 5),
        "acc_norm": round(acc_norm, 5),
        "centered": round((max(acc, acc_norm) - base) / (1 - base), 5),
        "random_baseline": round(base, 5),
        "n": n,
        "correct": [int(c) for c in correct],
        **({"perplexity": round(math.exp(nll / n), 4)} if kind == "language_modeling" else {}),
    }


def bias_scores(model, tok, chat: ChatFormat, docs: list[dict], batch_size: int = 16) -> dict:
    start = chat.start  # each sentence scored from the model's own BOS (or EOS)
    if start is None:
        raise UserError(
            "bias probes need a BOS or EOS token to start each sentence from; the model's config.json, "
            "generation_config.json and tokenizer_config.json name neither"
        )
    pairs = []
    for d in docs:
        for sent, term in ((d["sent_more"], d.get("term_more")), (d["sent_less"], d.get("term_less"))):
            if term and sent.startswith(term):  # generated probes: the rest of the sentence given the term
                pairs.append(encode_pair(tok, term, sent[len(term) :], start))
            else:  # a user's CrowS-Pairs file: each sentence whole
                pairs.append(([start], tok.encode(sent, add_special_tokens=False).ids))
    scored = loglikelihoods(model, pairs, batch_size, greedy=False)
    prefers = [scored[2 * i][0] > scored[2 * i + 1][0] for i in range(len(docs))]
    from lmkiln.eval.bias_probes import axis_scores

    axes = axis_scores(docs, prefers)
    return {
        "kind": "bias",
        "pct_stereotype": round(sum(prefers) / len(docs), 5),
        "n": len(docs),
        "by_type": {a["axis"]: a["stereotype_share"] for a in axes},
        "axes": axes,
    }


def evaluate_task(
    model,
    tok,
    chat: ChatFormat,
    task: IclTask,
    seed: int = 1234,
    add_bos: bool = False,
    batch_size: int = 16,
    loaded: tuple[list[dict], str] | None = None,
) -> dict:
    """Score one task; `loaded` is load_docs' result when the file was already read (each model, each
    validation would otherwise read it again)."""
    docs, kind = loaded or load_docs(task.path, task.kind)
    if task.max_examples:
        docs = docs[: task.max_examples]
    if kind == "bias":
        return bias_scores(model, tok, chat, docs, batch_size)
    bos = chat.bos if add_bos else None
    requests, texts = task_requests(docs, kind, task, seed)
    flat = []
    for i, reqs in enumerate(requests):
        try:
            flat += [encode_pair(tok, c, t, bos) for c, t in reqs]
        except ValueError as exc:
            raise UserError(f"{task.path}: document {i + 1}: {exc}") from None
    scored = loglikelihoods(model, flat, batch_size, greedy=kind == "language_modeling")
    return {"kind": kind, "shots": task.shots, **score_docs(docs, kind, per_document(scored, requests), texts)}


def task_requests(
    docs: list[dict], kind: str, task: IclTask, seed: int
) -> tuple[list[list[tuple[str, str]]], list[list[str]]]:
    """Per document: its (context, continuation) requests, and the option texts acc_norm divides by."""
    requests = [requests_of(docs, kind, i, task, seed) for i in range(len(docs))]
    texts = [
        doc["choices"] if kind == "multiple_choice" else [doc["continuation"]] * len(reqs)
        for doc, reqs in zip(docs, requests)
    ]
    return requests, texts


def per_document(scored: list, requests: list[list]) -> list[list]:
    """The flat scores of every request, cut back into each document's."""
    out, k = [], 0
    for reqs in requests:
        out.append(scored[k : k + len(reqs)])
        k += len(reqs)
    return out


def core_average(results: dict) -> float | None:
    """The mean centred score over the ICL tasks in `results` (task name -> scores), as nanochat's
    CORE; None with fewer than two such tasks."""
    centred = [r["centered"] for r in results.values() if isinstance(r, dict) and "centered" in r]
    return round(sum(centred) / len(centred), 5) if len(centred) > 1 else None
