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
from lmkiln.eval.stage import generative_tasks, paired_bootstrap
from lmkiln.log import console
from lmkiln.monitor.alerts import ALERT_EXIT, Gauges, append_history, notify


def ask(client: httpx.Client, url: str, model: str | None, row: dict, max_tokens: int) -> str | None:
    """The endpoint's greedy reply to the row's conversation, or None when the request fails. The
    model that answered (a version, with lmkiln's server) is added to `client.answered`."""
    body = {"messages": messages_of(row)[:-1], "max_tokens": max_tokens, "temperature": 0}
    if model:
        body["model"] = model
    try:
        r = client.post(f"{url.rstrip('/')}/chat/completions", json=body)
        r.raise_for_status()
        reply = r.json()
        client.answered.add(reply.get("model") or "")
        return reply["choices"][0]["message"]["content"] or ""
    except (httpx.HTTPError, KeyError, IndexError, ValueError):
        return None


def client_for(api_key: str | None, timeout: float) -> httpx.Client:
    """An HTTP client for the endpoint, with its API key when it has one."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client = httpx.Client(timeout=timeout, headers=headers)
    client.answered = set()
    return client


def score_endpoint(
    url: str, model: str | None, tasks: dict, max_tokens: int, concurrency: int, timeout: float, api_key: str | None
) -> dict:
    """Every task's scores on the endpoint, with each sample's, the count of failed requests, and the
    models that answered."""
    results = {}
    with client_for(api_key, timeout) as client, ThreadPoolExecutor(concurrency) as pool:
        for name, rows in tasks.items():
            client.answered = set()
            replies = list(pool.map(lambda row: ask(client, url, model, row, max_tokens), rows))
            scores = reply_scores(rows, [r or "" for r in replies], None, 0)
            scores["failed_requests"] = sum(r is None for r in replies)
            scores["answered_by"] = sorted(client.answered)
            results[name] = scores
    return results


def baseline_samples(baseline: Path | None, history: Path) -> dict[str, list[float]] | None:
    """Per task, each row's token F1 in the baseline: `kiln eval`'s eval.json (its first model), else the
    history's first run; None when there is neither."""
    if baseline is not None:
        if not baseline.is_file():
            raise UserError(f"--baseline {baseline}: no such file (expected an eval.json from kiln eval)")
        try:
            first = next(iter(json.loads(baseline.read_text()).values()))
        except (json.JSONDecodeError, StopIteration, AttributeError):
            raise UserError(f"--baseline {baseline}: not an eval.json (model -> task -> scores)") from None
        return {
            t: [s["token_f1"] for s in r["samples"]] for t, r in first.items() if isinstance(r, dict) and "samples" in r
        }
    if history.is_file() and history.stat().st_size:
        first = json.loads(history.read_text().splitlines()[0])
        return {t: r["token_f1_samples"] for t, r in first["tasks"].items()}
    return None


def judge(results: dict, base: dict[str, list[float]] | None) -> dict[str, dict]:
    """Per task: the mean token F1, the baseline's, the 95% interval of the difference, and whether it alerts."""
    out = {}
    for task, r in results.items():
        now = [s["token_f1"] for s in r["samples"]]
        entry = {
            "token_f1": r["token_f1"],
            "failed_requests": r["failed_requests"],
            "answered_by": r["answered_by"],
            "token_f1_samples": now,
        }
        before = (base or {}).get(task)
        if before is not None and len(before) == len(now):
            low, high = paired_bootstrap(before, now)
            entry.update(baseline_token_f1=round(sum(before) / len(before), 5), interval=[low, high], alert=high < 0)
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
    tasks = generative_tasks(recipe)
    tasks = {t: rows for t, rows in tasks.items() if "label" not in rows[0] and "tags" not in rows[0]}
    if not tasks:
        raise UserError("kiln monitor: --tasks needs gen:FILE tasks of instruction or chat rows")
    base = baseline_samples(baseline, history)
    results = score_endpoint(url, model, tasks, recipe.eval.max_new_tokens, concurrency, timeout, api_key)
    verdict = judge(results, base)
    append_history(history, {"time": round(time.time(), 3), "url": url, "tasks": verdict})
    if gauges is not None:
        gauges.scores(verdict)
    alerts = [t for t, v in verdict.items() if v.get("alert")]
    for task, v in verdict.items():
        against = (
            f" (baseline {v['baseline_token_f1']:.4f}, 95% interval of the change {v['interval'][0]:+.4f} to "
            f"{v['interval'][1]:+.4f})"
            if "interval" in v
            else " (the baseline)"
        )
        line = f"{task}: token F1 {v['token_f1']:.4f}{against}, {v['failed_requests']} failed requests"
        if v.get("alert"):  # said even under -q: it is what the run is for
            print(f"kiln monitor: ALERT {line}", file=sys.stderr)
        else:
            console.print(line)
    if alerts and webhook:
        notify(
            webhook, {"alert": "score below baseline", "url": url, "tasks": {t: verdict[t] for t in alerts}}, timeout
        )
    return ALERT_EXIT if alerts else 0
