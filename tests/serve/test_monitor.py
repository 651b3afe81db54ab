"""`kiln monitor`: a live endpoint re-evaluated on gen: rows, its history, and an alert (exit 3, a line,
a webhook) when a score falls below the baseline beyond the paired bootstrap interval."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import pytest

from lmkiln.cli import main
from lmkiln.serve.app import create_app
from tests.serve.conftest import serving
from tests.serve.test_versions import degraded


def _rows(path):
    rows = [{"instruction": f"Name the number {i}.", "output": f"The number is {i}."} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def golden_rows(url, path, headers=None):
    """The golden set: the deployed version's own greedy replies, as an operator records them at release."""
    questions = [f"What sound does a {a} make? ({i})" for i, a in enumerate(["cat", "dog", "cow", "duck"] * 4)]
    with path.open("w") as fh:
        for q in questions:
            body = {"messages": [{"role": "user", "content": q}], "max_tokens": 6, "temperature": 0}
            reply = httpx.post(url + "/v1/chat/completions", json=body, headers=headers).json()
            fh.write(json.dumps({"instruction": q, "output": reply["choices"][0]["message"]["content"]}) + "\n")
    return path


def webhook_server():
    """A local HTTP server that keeps the JSON bodies POSTed to it: (server, bodies)."""
    received = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    hook = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    return hook, received


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _monitor(url, rows, history, *extra):
    return main(
        ["-q", "monitor", url, "--tasks", f"gen:{rows}", "--history", str(history), "eval.max_new_tokens=6", *extra]
    )


def test_monitoring_the_same_model_twice_raises_no_alert(tiny_model, tmp_path):
    rows, history = _rows(tmp_path / "qa.jsonl"), tmp_path / "history.jsonl"
    with serving(create_app(tiny_model, device="cpu", name="tiny")) as url:
        assert _monitor(url + "/v1", rows, history) == 0  # the first run is the baseline
        assert _monitor(url + "/v1", rows, history) == 0
    first, second = (json.loads(line) for line in history.read_text().splitlines())
    task = second["tasks"]["qa"]
    assert "interval" not in first["tasks"]["qa"] and task["alert"] is False and task["failed_requests"] == 0
    assert task["metric"] == "token_f1" and task["score"] == first["tasks"]["qa"]["score"]  # greedy: the same replies


def test_a_score_below_the_baseline_alerts_with_exit_code_and_webhook(tiny_model, tmp_path, capsys):
    rows, history = _rows(tmp_path / "qa.jsonl"), tmp_path / "history.jsonl"
    # a baseline that answered every row perfectly, as kiln eval writes it
    baseline = tmp_path / "eval.json"
    samples = [{"token_f1": 1.0} for _ in range(8)]
    baseline.write_text(json.dumps({"good-model": {"qa": {"token_f1": 1.0, "samples": samples}}}))
    hook, received = webhook_server()
    metrics_port = free_port()
    try:
        with serving(create_app(tiny_model, device="cpu", name="tiny")) as url:
            webhook = f"http://127.0.0.1:{hook.server_address[1]}/alerts"
            extra = ["--baseline", str(baseline), "--webhook", webhook, "--metrics-port", str(metrics_port)]
            code = _monitor(url + "/v1", rows, history, *extra)
    finally:
        hook.shutdown()
    assert code == 3
    gauges = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text  # the gauge of the alert, for Prometheus
    assert 'lmkiln_monitor_alert{task="qa"} 1.0' in gauges
    assert "kiln monitor: ALERT qa: token F1" in capsys.readouterr().err
    assert received and received[0]["tasks"]["qa"]["alert"] is True and received[0]["tasks"]["qa"]["interval"][1] < 0
    assert json.loads(history.read_text())["tasks"]["qa"]["alert"] is True


def test_an_alert_end_to_end_after_the_server_is_switched_to_a_degraded_version(tiny_model, tmp_path, capsys):
    """First the live model passes; then the version API switches the server to a noisy copy of it, and
    the next run alerts: exit 3, the line, the gauge and the webhook (received by a local server)."""
    history = tmp_path / "history.jsonl"
    hook, received = webhook_server()
    metrics_port = free_port()
    key = {"Authorization": "Bearer s3cret"}
    try:
        with serving(create_app(tiny_model, device="cpu", name="tiny", api_key="s3cret")) as url:
            rows = golden_rows(url, tmp_path / "golden.jsonl", key)
            webhook = f"http://127.0.0.1:{hook.server_address[1]}/alerts"
            extra = ["--webhook", webhook, "--api-key", "s3cret"]
            assert _monitor(url + "/v1", rows, history, *extra) == 0  # passes, and is the baseline
            noisy = degraded(tiny_model, tmp_path / "noisy")
            swapped = httpx.post(url + "/admin/models", json={"model": str(noisy)}, headers=key, timeout=120)
            assert swapped.json()["version"] == "v2"
            assert _monitor(url + "/v1", rows, history, *extra, "--metrics-port", str(metrics_port)) == 3
    finally:
        hook.shutdown()
    first, second = (json.loads(line)["tasks"]["golden"] for line in history.read_text().splitlines())
    assert first["score"] == 1.0 and second["score"] < 0.5 and second["alert"] is True
    assert first["answered_by"] == ["tiny@v1"] and second["answered_by"] == ["tiny@v2"]
    assert "kiln monitor: ALERT golden: token F1" in capsys.readouterr().err
    gauges = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    assert 'lmkiln_monitor_alert{task="golden"} 1.0' in gauges
    assert len(received) == 1 and received[0]["tasks"]["golden"]["alert"] is True


def test_an_endpoint_that_does_not_answer_counts_failures_without_crashing(tmp_path):
    port = free_port()  # nothing listens on it
    rows, history = _rows(tmp_path / "qa.jsonl"), tmp_path / "history.jsonl"
    assert _monitor(f"http://127.0.0.1:{port}/v1", rows, history, "--timeout", "2") == 0
    assert json.loads(history.read_text())["tasks"]["qa"]["failed_requests"] == 8


def test_icl_task_files_over_the_endpoint_score_as_kiln_eval_does(tiny_model, tmp_path):
    """An ICL file's documents scored from the endpoint's prompt log-probabilities give the same
    per-document correctness as kiln eval's own scoring of the model; classification rows score the
    reply against the label."""
    from lmkiln.eval.icl import IclTask, encode_pair, evaluate_task, loglikelihoods
    from lmkiln.model.inference.load import load_for_inference
    from lmkiln.monitor.live import client_for, loglikelihood

    docs = [
        {"query": f"The {a} says", "choices": [s, "meow" if s != "meow" else "woof", "nothing at all"], "gold": 0}
        for a, s in [("cat", "meow"), ("dog", "woof"), ("cow", "moo"), ("duck", "quack"), ("owl", "hoot")] * 2
    ]
    icl = tmp_path / "sounds.jsonl"
    icl.write_text("".join(json.dumps(d) + "\n" for d in docs))
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"text": f"{a}?", "label": "animal"}) + "\n" for a in ["cat", "dog", "owl"]))
    history = tmp_path / "history.jsonl"
    lm = load_for_inference(tiny_model)
    pairs = [("The cat says", " meow"), ("The dog says", " nothing at all")]
    want = loglikelihoods(lm.model, [encode_pair(lm.tok, c, t, None) for c, t in pairs], 4, greedy=True)
    with serving(create_app(tiny_model, device="cpu", name="tiny")) as url:
        with client_for(None, 30) as client:
            got = [loglikelihood(client, url + "/v1", None, c, t) for c, t in pairs]
        argv = ["-q", "monitor", url + "/v1", "--tasks", str(icl), f"gen:{labels}", "--history", str(history)]
        assert main([*argv, "eval.max_new_tokens=3"]) == 0
    for (ll, greedy), (ll_local, greedy_local) in zip(got, want):
        assert ll == pytest.approx(ll_local, abs=1e-4) and greedy == greedy_local
    run = json.loads(history.read_text())["tasks"]
    local = evaluate_task(lm.model, lm.tok, lm.chat, IclTask("sounds", str(icl)))
    assert run["sounds"]["metric"] == "acc" and run["sounds"]["samples"] == local["correct"]
    assert run["sounds"]["score"] == local["acc"] and run["sounds"]["failed_requests"] == 0
    assert run["labels"]["metric"] == "accuracy" and len(run["labels"]["samples"]) == 3
    assert run["sounds"]["answered_by"] == ["tiny@v1"]
