"""`kiln monitor URL --tasks gen:FILE ...`: re-evaluate a live OpenAI-compatible endpoint (lmkiln's, vLLM's,
llama.cpp's server) on the rows `kiln eval` scores, and raise an alert when it got worse.

Each row's conversation before its last reply goes to `/v1/chat/completions` (greedy, at most
`eval.max_new_tokens`), a few at a time (`--concurrency`), each with a timeout; a failed or timed-out
request is a reply of nothing (every score 0) and is counted, never a crash. The replies are scored as
`kiln eval` scores them (exact match, token F1, ROUGE-L), and each run is appended to a history file.
The baseline is an `eval.json` that `kiln eval` wrote (its first model's samples), or else the first run
in the history. A task alerts when its mean token F1 is below the baseline's beyond the paired bootstrap
95% interval (the same rows, resampled together): the run exits 3, the alert is logged, and with
`--webhook` it is POSTed as JSON; `--metrics-port` serves the latest scores and alerts to Prometheus."""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from lmkiln.data.examples import messages_of
from lmkiln.errors import UserError
from lmkiln.eval.generative import reply_scores
from lmkiln.eval.results import paired_bootstrap
from lmkiln.eval.stage import generative_tasks
from lmkiln.log import console
from lmkiln.monitor.alerts import ALERT_EXIT, Gauges, append_history, notify

METRIC_NAMES = {"token_f1": "token F1", "accuracy": "accuracy", "acc": "acc"}


def post(client: httpx.Client, url: str, route: str, model: str | None, body: dict) -> dict | None:
    """The endpoint's JSON reply (None when the request fails); the model that answered (a version, with
    lmkiln's server) is added to `client.answered`."""
    try:
        r = client.post(f"{url.rstrip('/')}/{route}", json={**body, "model": model} if model else body)
        r.raise_for_status()
        reply = r.json()
        client.answered.add(reply.get("model") or "")
        return reply
    except (httpx.HTTPError, ValueError, AttributeError):
        return None


def ask(client: httpx.Client, url: str, model: str | None, row: dict, max_tokens: int) -> str | None:
    """The endpoint's greedy reply to the row's conversation, or None when the request fails."""
    body = {"messages": messages_of(row)[:-1], "max_tokens": max_tokens, "temperature": 0}
    try:
        return post(client, url, "chat/completions", model, body)["choices"][0]["message"]["content"] or ""
    except (TypeError, KeyError, IndexError):
        return None


def client_for(api_key: str | None, timeout: float) -> httpx.Client:
    """An HTTP client for the endpoint, with its API key when it has one."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client = httpx.Client(timeout=timeout, headers=headers)
    client.answered = set()
    return client


def reply_task(client: httpx.Client, pool, url: str, model: str | None, rows: list[dict], max_tokens: int) -> dict:
    """A gen: task of instruction or chat rows (token F1, as kiln eval scores replies) or of classification
    rows (accuracy: the reply, trimmed and lower-cased, is the label)."""
    labelled = "label" in rows[0]
    asked = [{"instruction": r["text"], "output": r["label"]} if labelled else r for r in rows]
    replies = list(pool.map(lambda row: ask(client, url, model, row, max_tokens), asked))
    failed = sum(r is None for r in replies)
    if labelled:
        samples = [
            int((r or "").strip().strip(".").lower() == str(row["label"]).lower()) for r, row in zip(replies, rows)
        ]
        return {
            "metric": "accuracy",
            "score": round(sum(samples) / len(samples), 5),
            "samples": samples,
            "failed_requests": failed,
        }
    scores = reply_scores(rows, [r or "" for r in replies], None, 0)
    samples = [s["token_f1"] for s in scores["samples"]]
    extra = {k: scores[k] for k in ("exact_match", "rouge_l") if k in scores}
    return {"metric": "token_f1", "score": scores["token_f1"], "samples": samples, "failed_requests": failed, **extra}


def loglikelihood(client: httpx.Client, url: str, model: str | None, context: str, continuation: str):
    """(the continuation's summed log-probability, whether each of its tokens is the greedy one) after the
    context, from the endpoint's prompt log-probabilities; None when it does not answer."""
    body = {"prompt": context + continuation, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
    try:
        lp = post(client, url, "completions", model, body)["choices"][0]["logprobs"]
        offsets, logprobs = lp["text_offset"], lp["token_logprobs"]
    except (TypeError, KeyError, IndexError):
        return None
    # the continuation's tokens: those that start at or after the context's end (lm-eval's local-completions)
    picked = [k for k, at in enumerate(offsets) if at >= len(context) and logprobs[k] is not None]
    if not picked:
        return None
    total = sum(logprobs[k] for k in picked)
    greedy = all(max((lp["top_logprobs"][k] or {}).values(), default=0.0) <= logprobs[k] + 1e-6 for k in picked)
    return total, greedy


def icl_task(client: httpx.Client, pool, url: str, model: str | None, task, seed: int) -> dict:
    """An ICL task file scored as kiln eval scores it (acc), from the endpoint's log-probabilities."""
    from lmkiln.eval.icl import load_docs, per_document, score_docs, task_requests

    docs, kind = load_docs(task.path, task.kind)
    if kind == "bias":
        raise UserError(f"{task.path}: bias probes score sentences from the model's own BOS: run them with kiln eval")
    docs = docs[: task.max_examples] if task.max_examples else docs
    requests, texts = task_requests(docs, kind, task, seed)
    pairs = [pair for reqs in requests for pair in reqs]
    scored = list(pool.map(lambda pair: loglikelihood(client, url, model, *pair), pairs))
    failed = sum(x is None for x in scored)
    scored = [x if x is not None else (float("-inf"), False) for x in scored]
    scores = score_docs(docs, kind, per_document(scored, requests), texts)
    return {
        "metric": "acc",
        "score": scores["acc"],
        "samples": scores["correct"],
        "failed_requests": failed,
        "acc_norm": scores["acc_norm"],
        "kind": kind,
    }


def score_endpoint(recipe, url: str, model: str | None, concurrency: int, timeout: float, api_key: str | None) -> dict:
    """Every task's score on the endpoint, each row's, the failed requests and the models that answered."""
    from lmkiln.eval.stage import icl_tasks

    gen = generative_tasks(recipe)
    for name, rows in gen.items():
        if "tags" in rows[0]:
            raise UserError(f"kiln monitor: {name}: tagging rows are scored on an encoder's tagger by kiln eval")
    results = {}
    with client_for(api_key, timeout) as client, ThreadPoolExecutor(concurrency) as pool:
        for name, rows in gen.items():
            client.answered = set()
            results[name] = reply_task(client, pool, url, model, rows, recipe.eval.max_new_tokens)
            results[name]["answered_by"] = sorted(client.answered)
        for task in icl_tasks(recipe.eval):
            client.answered = set()
            results[task.name] = icl_task(client, pool, url, model, task, recipe.eval.seed)
            results[task.name]["answered_by"] = sorted(client.answered)
    return results


def baseline_samples(baseline: Path | None, history: Path) -> dict[str, list[float]] | None:
    """Per task, each row's score in the baseline: `kiln eval`'s eval.json (its first model: token F1 of
    each reply, or each document's correctness), else the history's first run; None when there is neither."""
    if baseline is not None:
        if not baseline.is_file():
            raise UserError(f"--baseline {baseline}: no such file (expected an eval.json from kiln eval)")
        try:
            first = next(iter(json.loads(baseline.read_text()).values()))
        except (json.JSONDecodeError, StopIteration, AttributeError):
            raise UserError(f"--baseline {baseline}: not an eval.json (model -> task -> scores)") from None
        found = {}
        for t, r in first.items():
            if isinstance(r, dict) and "samples" in r:
                found[t] = [s["token_f1"] for s in r["samples"]]
            elif isinstance(r, dict) and "correct" in r:
                found[t] = r["correct"]
        return found
    if history.is_file() and history.stat().st_size:
        first = json.loads(history.read_text().splitlines()[0])
        return {t: r["samples"] for t, r in first["tasks"].items()}
    return None


def judge(results: dict, base: dict[str, list[float]] | None) -> dict[str, dict]:
    """Per task: its score, the baseline's, the 95% interval of the difference, and whether it alerts."""
    out = {}
    for task, r in results.items():
        entry = dict(r)
        before = (base or {}).get(task)
        if before is not None and len(before) == len(r["samples"]):
            low, high = paired_bootstrap(before, r["samples"])
            entry.update(baseline=round(sum(before) / len(before), 5), interval=[low, high], alert=high < 0)
        out[task] = entry
    return out


def monitor_once(
    recipe,
    url: str,
    model: str | None,
    history: Path,
    baseline: Path | None,
    webhook: str | None,
    concurrency: int,
    timeout: float,
    gauges: Gauges | None = None,
    api_key: str | None = None,
) -> int:
    """One re-evaluation: scores appended to `history`; the exit code (ALERT_EXIT when a task alerts)."""
    base = baseline_samples(baseline, history)
    results = score_endpoint(recipe, url, model, concurrency, timeout, api_key)
    verdict = judge(results, base)
    append_history(history, {"time": round(time.time(), 3), "url": url, "tasks": verdict})
    if gauges is not None:
        gauges.scores(verdict)
    alerts = [t for t, v in verdict.items() if v.get("alert")]
    for task, v in verdict.items():
        against = (
            f" (baseline {v['baseline']:.4f}, 95% interval of the change {v['interval'][0]:+.4f} to "
            f"{v['interval'][1]:+.4f})"
            if "interval" in v
            else " (the baseline)"
        )
        line = f"{task}: {METRIC_NAMES[v['metric']]} {v['score']:.4f}{against}, {v['failed_requests']} failed requests"
        if v.get("alert"):  # said even under -q: it is what the run is for
            print(f"kiln monitor: ALERT {line}", file=sys.stderr)
        else:
            console.print(line)
    if alerts and webhook:
        notify(
            webhook, {"alert": "score below baseline", "url": url, "tasks": {t: verdict[t] for t in alerts}}, timeout
        )
    return ALERT_EXIT if alerts else 0
