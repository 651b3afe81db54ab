"""`kiln monitor URL --drift --requests DIR --reference SRC`: have the prompts users send moved away from
what the model was tuned on? The prompts of a window of the request log (`kiln serve --log-requests`)
are compared with a reference set (the fine-tuning data, or the same log before the window) by four
signals, each prompt measured once:

- length: its words;
- language: the data stage's language ID (languages under 2% of the reference are one "other");
- loss: the served model's own mean per-token loss on it, asked of the endpoint (`/v1/completions` with
  echo and logprobs, max_tokens 0: what lmkiln's and vLLM's servers answer);
- vocabulary: the share of its words the reference never uses (the reference's words are those of one
  half of it; the other half gives the reference's own share, so both sides are measured alike).

Each signal's drift is the population stability index (PSI) of the window against the reference: ten
bins at the reference's deciles (its categories, for language). By the usual reading, under 0.1 is
stable, 0.1 to 0.25 a moderate shift, above 0.25 (`--drift-threshold`) a drift, which alerts. The run's
one number is its largest PSI. The prompts most out of distribution (the mean of their tail
probabilities under the reference, signal by signal) are listed for someone to read."""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from lmkiln.errors import UserError

SIGNALS = ("length", "language", "loss", "vocabulary")
WORD = re.compile(r"\w+", re.UNICODE)
MINOR_LANGUAGE = 0.02  # languages rarer than this in the reference count as one category, "other"
EPS = 1e-4  # an empty bin's share, so that PSI stays finite


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """Population stability index of `current` against `reference`, in bins at the reference's quantiles."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    count = len(edges) + 1
    ref = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=count) / len(reference)
    cur = np.bincount(np.searchsorted(edges, current, side="right"), minlength=count) / len(current)
    return shares_psi(ref, cur)


def shares_psi(ref: np.ndarray, cur: np.ndarray) -> float:
    ref, cur = np.clip(ref, EPS, None), np.clip(cur, EPS, None)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def prompt_of(row: dict) -> str:
    """What a user asked in a data row or a logged request: the last user turn, or the text itself."""
    if "messages" in row or "instruction" in row:
        from lmkiln.data.examples import messages_of

        turns = messages_of(row) if "messages" in row else [{"role": "user", "content": row["instruction"]}]
        users = [m["content"] for m in turns if m.get("role") == "user"]
        return (users[-1] if users else "") + ("\n" + row["input"] if row.get("input") else "")
    return str(row.get("text") or row.get("prompt") or "")


def logged_prompts(directory: Path, since: float = 0.0, until: float = float("inf")) -> list[dict]:
    """{time, text} of each prompt logged in `directory` between the two times (epoch seconds)."""
    from lmkiln.serve.request_log import PREFIX, SUFFIX

    found = []
    for path in sorted(Path(directory).glob(f"{PREFIX}*{SUFFIX}")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{n}: not a JSON line of the request log") from None
            if not since <= record.get("time", 0) < until:
                continue
            inputs = record.get("input") or []
            if record.get("route") == "chat":
                texts = [prompt_of({"messages": inputs + [{"role": "assistant", "content": ""}]})]
            else:
                texts = [t for t in inputs if isinstance(t, str)]
            found += [{"time": record["time"], "text": t} for t in texts if t.strip()]
    return found


def reference_prompts(source: Path, columns: dict[str, str]) -> list[str]:
    """The prompts of a reference: a request-log directory, or a data file in any fine-tuning format."""
    if source.is_dir():
        return [p["text"] for p in logged_prompts(source)]
    from lmkiln.data.examples import load_file_examples

    examples, _ = load_file_examples(source, "auto", columns, "skip")
    return [t for t in map(prompt_of, examples) if t.strip()]


def prompt_losses(url: str, model: str | None, texts: list[str], client: httpx.Client, concurrency: int) -> list:
    """The endpoint's mean per-token loss on each text (None where it gives no prompt log-probabilities)."""

    from lmkiln.monitor.live import post

    def loss(text: str) -> float | None:
        body = {"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 0, "temperature": 0}
        try:
            logprobs = post(client, url, "completions", model, body)["choices"][0]["logprobs"]["token_logprobs"]
        except (TypeError, KeyError, IndexError):
            return None
        scored = [x for x in logprobs if x is not None]
        return -sum(scored) / len(scored) if scored else None

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(loss, texts))


class Features:
    """Each prompt's signals: words, language, loss (or None), and the share of unknown words."""

    def __init__(self, texts: list[str], vocabulary: set[str], losses: list) -> None:
        from lmkiln.data.language import top_language

        words = [[w.lower() for w in WORD.findall(t)] for t in texts]
        self.texts = texts
        self.length = np.array([len(w) for w in words], dtype=float)
        self.language = [top_language(t)[0] or "none" for t in texts]
        self.loss = np.array([np.nan if x is None else x for x in losses], dtype=float)
        self.vocabulary = np.array([sum(x not in vocabulary for x in w) / max(len(w), 1) for w in words])


def compare(ref: Features, cur: Features, threshold: float) -> dict[str, dict]:
    """Per signal: its PSI, and whether it is past the threshold (a signal that cannot be measured:
    the reason instead)."""
    out = {}
    for name in ("length", "vocabulary", "loss"):
        r, c = getattr(ref, name), getattr(cur, name)
        r, c = r[~np.isnan(r)], c[~np.isnan(c)]
        if len(r) < 10 or len(c) < 10:
            out[name] = {"skipped": "the endpoint gives no prompt log-probabilities (echo with logprobs)"}
            continue
        out[name] = {"psi": round(psi(r, c), 4), "reference_mean": float(r.mean()), "window_mean": float(c.mean())}
    majors = major_languages(ref.language)
    cats = sorted(majors) + ["other"]
    counts = [Counter(_category(x, majors) for x in langs) for langs in (ref.language, cur.language)]
    shares = [np.array([c[k] for k in cats]) / sum(c.values()) for c in counts]
    out["language"] = {
        "psi": round(shares_psi(*shares), 4),
        "reference_shares": dict(zip(cats, np.round(shares[0], 4).tolist())),
        "window_shares": dict(zip(cats, np.round(shares[1], 4).tolist())),
    }
    for v in out.values():
        if "psi" in v:
            v["alert"] = v["psi"] > threshold
    return {s: out[s] for s in SIGNALS}


def major_languages(languages: list[str]) -> set[str]:
    return {x for x, n in Counter(languages).items() if n / len(languages) >= MINOR_LANGUAGE}


def _category(language: str, majors: set[str]) -> str:
    return language if language in majors else "other"


def outliers(ref: Features, cur: Features, top: int) -> list[dict]:
    """The window's prompts furthest out of the reference, each with its tail probability per signal."""
    majors = major_languages(ref.language)
    ref_loss = ref.loss[~np.isnan(ref.loss)]
    ranked = []
    for i, text in enumerate(cur.texts):
        tails = {
            "length": 2 * abs(float(np.mean(ref.length <= cur.length[i])) - 0.5),
            "vocabulary": float(np.mean(ref.vocabulary < cur.vocabulary[i])),
            "language": 0.0 if cur.language[i] in majors else 1.0,
        }
        if len(ref_loss) and not np.isnan(cur.loss[i]):
            tails["loss"] = float(np.mean(ref_loss < cur.loss[i]))
        score = sum(tails.values()) / len(tails)
        ranked.append({"score": round(score, 4), "text": text[:500], "language": cur.language[i], **_rounded(tails)})
    unique = {x["text"]: x for x in sorted(ranked, key=lambda x: x["score"])}  # a prompt sent twice, once
    return sorted(unique.values(), key=lambda x: -x["score"])[:top]


def _rounded(tails: dict) -> dict:
    return {f"{k}_tail": round(v, 4) for k, v in tails.items()}


def drift_once(
    url: str,
    model: str | None,
    requests: Path,
    reference: Path | None,
    window_hours: float | None,
    sample: int,
    threshold: float,
    client: httpx.Client,
    concurrency: int,
    columns: dict[str, str],
    show: int = 10,
) -> dict:
    """One drift check: the window's prompts against the reference; the record the history keeps."""
    now = time.time()
    since = now - window_hours * 3600 if window_hours else 0.0
    window = [p["text"] for p in logged_prompts(requests, since, now + 1)]
    if reference is None:  # the same log before the window
        if not window_hours:
            raise UserError("--reference: without one, --window HOURS splits the log into reference and window")
        ref_texts = [p["text"] for p in logged_prompts(requests, 0.0, since)]
        ref_name = f"{requests} before the window"
    else:
        ref_texts, ref_name = reference_prompts(reference, columns), str(reference)
    for what, texts in (("window", window), ("reference", ref_texts)):
        if len(texts) < 20:
            raise UserError(f"--drift: the {what} has {len(texts)} prompts; at least 20 are needed to compare")
    rng = random.Random(0)  # sorted first: the same prompts give the same sample, in whatever order they were logged
    window = rng.sample(sorted(window), min(sample, len(window)))
    ref_texts = rng.sample(sorted(ref_texts), min(2 * sample, len(ref_texts)))
    half = len(ref_texts) // 2  # one half names the reference's words, the other is measured against them
    vocabulary = {w.lower() for t in ref_texts[:half] for w in WORD.findall(t)}
    ref_side = ref_texts[half:]
    losses = prompt_losses(url, model, ref_side + window, client, concurrency)
    ref = Features(ref_side, vocabulary, losses[: len(ref_side)])
    cur = Features(window, vocabulary, losses[len(ref_side) :])
    signals = compare(ref, cur, threshold)
    scores = [v["psi"] for v in signals.values() if "psi" in v]
    return {
        "time": round(now, 3),
        "url": url,
        "window": {"since": round(since, 3), "until": round(now, 3), "prompts": len(window)},
        "reference": {"source": ref_name, "prompts": len(ref_side)},
        "drift": max(scores),
        "threshold": threshold,
        "alert": any(v.get("alert") for v in signals.values()),
        "signals": signals,
        "outliers": outliers(ref, cur, show),
    }


def check_drift(
    url: str,
    model: str | None,
    requests: Path,
    reference: Path | None,
    window_hours: float | None,
    history: Path,
    options: dict,
    webhook: str | None = None,
    gauges=None,
) -> int:
    """One drift check, appended to `history`, said in a line per signal; ALERT_EXIT when a signal drifted.
    `options`: sample, threshold, concurrency, timeout, api_key, columns, show."""
    import sys

    from lmkiln.log import console
    from lmkiln.monitor.alerts import ALERT_EXIT, append_history, notify
    from lmkiln.monitor.live import client_for

    if not Path(requests).is_dir():
        raise UserError(f"--requests {requests}: not a directory (kiln serve --log-requests DIR writes one)")
    if reference is not None and not Path(reference).exists():
        raise UserError(f"--reference {reference}: no such file or directory")
    with client_for(options.get("api_key"), options.get("timeout", 120.0)) as client:
        record = drift_once(
            url,
            model,
            requests,
            reference,
            window_hours,
            options.get("sample", 500),
            options.get("threshold", 0.25),
            client,
            options.get("concurrency", 4),
            options.get("columns", {}),
            options.get("show", 10),
        )
    append_history(history, record)
    if gauges is not None:
        gauges.drifted(record["signals"])
    parts = [f"{s} {v['psi']:.3f}" if "psi" in v else f"{s} skipped" for s, v in record["signals"].items()]
    line = (
        f"drift: {record['window']['prompts']} prompts against {record['reference']['prompts']} of "
        f"{record['reference']['source']}: PSI {', '.join(parts)}; drift {record['drift']:.3f} "
        f"(threshold {record['threshold']})"
    )
    if record["alert"]:  # said even under -q, as a score alert is
        drifted = [s for s, v in record["signals"].items() if v.get("alert")]
        print(f"kiln monitor: DRIFT ALERT {', '.join(drifted)}: {line}", file=sys.stderr)
        for o in record["outliers"][:3]:
            print(f"  out of distribution ({o['score']:.2f}): {o['text'][:120]!r}", file=sys.stderr)
        if webhook:
            notify(webhook, {"alert": "drift", "url": url, **record}, options.get("timeout", 120.0))
    else:
        console.print(line, soft_wrap=True)
    for s, v in record["signals"].items():
        if "skipped" in v:
            console.print(f"drift: {s} not measured: {v['skipped']}")
    return ALERT_EXIT if record["alert"] else 0
