"""`kiln monitor report`: one self-contained HTML page of what `kiln monitor` found over time, for people
to look at: each task's score run by run inside its baseline band (a score below the band is an alert),
the version that answered, drift per signal against its threshold, the alerts, and the prompts most out of
distribution. Charts are inline SVG (matplotlib); nothing is fetched when the page opens."""

from __future__ import annotations

import io
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from lmkiln.errors import UserError
from lmkiln.monitor.alerts import read_history
from lmkiln.monitor.live import METRIC_NAMES

GENERATOR = "lmkiln monitor report"  # in the page's <meta name="generator">: a file lmkiln may replace
TEMPLATE = Path(__file__).with_name("report.html.j2")


def _when(t: float) -> datetime:
    return datetime.fromtimestamp(t, tz=timezone.utc)


def _time_axis(ax, times: list[datetime]) -> None:
    """Dates as the span needs them (seconds to months), and room around a lone point."""
    import matplotlib.dates as mdates

    locator = mdates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    if len(set(times)) == 1:
        ax.set_xlim(times[0] - timedelta(minutes=30), times[0] + timedelta(minutes=30))


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg") :]  # inline: without the XML prologue


def score_chart(runs: list[dict]) -> str | None:
    """Each task's score per run; the band is the baseline's 95% interval as the paired bootstrap sees
    it from that run (score - high to score - low): a point below it is an alert. A dotted line marks a
    change of the version that answered."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for r in runs for t in r["tasks"]})
    if not tasks:
        return None
    fig, axes = plt.subplots(len(tasks), 1, figsize=(9, 2.6 * len(tasks)), squeeze=False, sharex=True)
    for ax, task in zip(axes[:, 0], tasks):
        points = [(_when(r["time"]), r["tasks"][task]) for r in runs if task in r["tasks"]]
        times = [t for t, _ in points]
        scores = [v["score"] for _, v in points]
        low = [v["score"] - v["interval"][1] if "interval" in v else v["score"] for _, v in points]
        high = [v["score"] - v["interval"][0] if "interval" in v else v["score"] for _, v in points]
        ax.fill_between(times, low, high, color="#9ecae1", alpha=0.5, step="mid", label="baseline, 95% interval")
        metric = METRIC_NAMES[points[-1][1]["metric"]]
        ax.plot(times, scores, "o-", color="#08519c", label=metric)
        alerts = [(t, v["score"]) for t, v in points if v.get("alert")]
        if alerts:
            ax.plot(*zip(*alerts), "o", color="#cb181d", markersize=9, label="alert")
        answered = None
        for t, v in points:
            now = ", ".join(v.get("answered_by") or [])
            if answered is not None and now != answered:
                ax.axvline(t, color="#636363", linestyle=":")
                ax.annotate(now, (t, 1.0), xycoords=("data", "axes fraction"), fontsize=8, va="top", ha="left")
            answered = now
        ax.set_title(task, loc="left", fontsize=10)
        ax.set_ylabel(metric)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[-1, 0].legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    _time_axis(axes[-1, 0], [_when(r["time"]) for r in runs])
    return _svg(fig)


def drift_chart(drifts: list[dict]) -> str | None:
    """Each signal's PSI per window (log scale), and the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not drifts:
        return None
    fig, ax = plt.subplots(figsize=(9, 3.2))
    times = [_when(d["time"]) for d in drifts]
    for signal in ("length", "language", "loss", "vocabulary"):
        values = [d["signals"].get(signal, {}).get("psi") for d in drifts]
        if any(v is not None for v in values):
            ax.plot(times, [max(v, 1e-3) if v is not None else float("nan") for v in values], "o-", label=signal)
    ax.axhline(drifts[-1]["threshold"], color="#cb181d", linestyle="--", label="threshold")
    ax.set_yscale("log")
    ax.set_ylabel("PSI against the reference")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    _time_axis(ax, times)
    return _svg(fig)


def alert_rows(runs: list[dict], drifts: list[dict]) -> list[dict]:
    """Every alert, newest first: when, what kind, what, and the figures behind it."""
    rows = []
    for r in runs:
        for task, v in r["tasks"].items():
            if v.get("alert"):
                detail = (
                    f"{METRIC_NAMES[v['metric']]} {v['score']:.4f} against {v['baseline']:.4f}; change "
                    f"{v['interval'][0]:+.4f} to {v['interval'][1]:+.4f}; answered by "
                    f"{', '.join(v.get('answered_by') or ['?'])}"
                )
                rows.append({"time": r["time"], "kind": "score", "what": task, "detail": detail})
    for d in drifts:
        drifted = {s: v for s, v in d["signals"].items() if v.get("alert")}
        if drifted:
            detail = ", ".join(f"{s} PSI {v['psi']:.3f}" for s, v in drifted.items())
            detail += f" (threshold {d['threshold']}; {d['window']['prompts']} prompts)"
            rows.append({"time": d["time"], "kind": "drift", "what": ", ".join(drifted), "detail": detail})
    return sorted(rows, key=lambda r: -r["time"])


def render(runs: list[dict], drifts: list[dict]) -> str:
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["when"] = lambda t: _when(t).strftime("%Y-%m-%d %H:%M UTC")
    env.filters["metric"] = METRIC_NAMES.get
    latest = next((d for d in reversed(drifts) if d["alert"]), drifts[-1]) if drifts else None
    return env.from_string(TEMPLATE.read_text()).render(
        generator=GENERATOR,
        made=time.time(),
        runs=runs,
        drifts=drifts,
        scores=score_chart(runs) if runs else None,
        drift=drift_chart(drifts),
        alerts=alert_rows(runs, drifts),
        outliers=latest,
    )


def write_report(history: Path, drift_history: Path, out: Path) -> Path:
    """The page for the two histories, written atomically to `out` (never over a file lmkiln did not write)."""
    from lmkiln.io import write_text

    runs, drifts = read_history(history), read_history(drift_history)
    if not runs and not drifts:
        raise UserError(f"kiln monitor report: nothing to report: neither {history} nor {drift_history} has a run")
    if out.exists() and (out.is_dir() or GENERATOR not in out.read_text(errors="replace")[:2000]):
        raise UserError(f"--out {out}: exists and is not a report kiln monitor wrote; choose another path")
    write_text(out, render(runs, drifts))
    return out
