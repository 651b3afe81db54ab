"""What every `kiln monitor` check shares: its history file (a JSON line a run), and its alert: exit code 3,
a webhook POST, and Prometheus gauges on `--metrics-port`."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from lmkiln.errors import UserError
from lmkiln.log import console

ALERT_EXIT = 3  # 2 is a usage error; an alert is its own outcome for cron and CI


def append_history(path: Path, record: dict) -> None:
    """One run as one JSON line, appended in one write (a reader never sees half a run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def read_history(path: Path) -> list[dict]:
    """Every run a history holds ([] when there is none yet)."""
    if not path.is_file():
        return []
    runs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            runs.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(f"{path}:{n}: not a JSON line of a kiln monitor history") from None
    return runs


def notify(webhook: str, payload: dict, timeout: float) -> None:
    """POST the alert as JSON; a webhook that fails is a line, never a crash."""
    try:
        httpx.post(webhook, json=payload, timeout=timeout)
    except httpx.HTTPError as exc:
        console.print(f"webhook {webhook}: {exc}")


class Gauges:
    """`--metrics-port`: the latest run's scores and alerts for Prometheus, on loopback."""

    def __init__(self, port: int) -> None:
        try:
            from prometheus_client import CollectorRegistry, Gauge, start_http_server
        except ImportError:
            raise UserError("--metrics-port needs the 'serve' extra: pip install 'lmkiln[serve]'") from None
        r = CollectorRegistry()
        self.alert = Gauge(
            "lmkiln_monitor_alert", "1 while the task's score is below its baseline", ["task"], registry=r
        )
        self.score = Gauge(
            "lmkiln_monitor_score", "the latest run's score (token F1, accuracy or acc)", ["task", "metric"], registry=r
        )
        self.failed = Gauge("lmkiln_monitor_failed_requests", "the latest run's failed requests", ["task"], registry=r)
        self.drift = Gauge(
            "lmkiln_monitor_drift_psi", "the latest window's PSI against the reference", ["signal"], registry=r
        )
        self.drift_alert = Gauge(
            "lmkiln_monitor_drift_alert", "1 while the signal's PSI is past the threshold", ["signal"], registry=r
        )
        try:
            start_http_server(port, addr="127.0.0.1", registry=r)
        except OSError as exc:
            raise UserError(f"--metrics-port {port}: cannot listen on 127.0.0.1:{port} ({exc.strerror})") from None

    def scores(self, verdict: dict) -> None:
        for task, v in verdict.items():
            self.alert.labels(task).set(1 if v.get("alert") else 0)
            self.score.labels(task, v["metric"]).set(v["score"])
            self.failed.labels(task).set(v["failed_requests"])

    def drifted(self, signals: dict) -> None:
        for signal, v in signals.items():
            if "psi" in v:
                self.drift.labels(signal).set(v["psi"])
                self.drift_alert.labels(signal).set(1 if v["alert"] else 0)
