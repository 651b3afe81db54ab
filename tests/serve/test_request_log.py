"""`kiln serve --log-requests`: each generation request and reply as a JSON line, personal data redacted
before it reaches disk, files rotated within their limits, and a log that cannot be written never
failing a request."""

import json

import httpx

from lmkiln.serve.app import create_app
from lmkiln.serve.request_log import RequestLog
from tests.serve.conftest import serving

EMAIL = "jane.doe@example.com"


def _records(log: RequestLog) -> list[dict]:
    return [json.loads(line) for path in log.files() for line in path.read_text().splitlines()]


def test_requests_are_logged_with_personal_data_redacted(tiny_model, tmp_path):
    log = RequestLog(tmp_path / "logs")
    app = create_app(tiny_model, device="cpu", name="tiny", request_log=log)
    with serving(app) as url:
        body = {"prompt": f"Write to {EMAIL} about", "max_tokens": 4, "temperature": 0}
        assert httpx.post(url + "/v1/completions", json=body).status_code == 200
        chat = {"messages": [{"role": "user", "content": f"my mail is {EMAIL}"}], "max_tokens": 4, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=chat) as r:
            assert r.status_code == 200 and "[DONE]" in r.read().decode()
        metrics = httpx.get(url + "/metrics").text
    log.close()
    assert 'lmkiln_request_log_records_total{status="written"} 2.0' in metrics
    completion, streamed = _records(log)
    assert completion["route"] == "completions" and completion["model"] == "tiny@v1"
    assert completion["completion_tokens"] == 4 and completion["latency_s"] > 0
    assert completion["finish_reasons"] == ["length"] and isinstance(completion["output"][0], str)
    assert streamed["route"] == "chat" and streamed["input"][0]["role"] == "user"
    raw = "".join(p.read_text() for p in log.files())
    assert EMAIL not in raw and "example.com" not in raw  # redacted before it reached the file


def test_files_rotate_within_their_limits_and_foreign_files_stay(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "notes.txt").write_text("mine")
    log = RequestLog(tmp_path / "logs", max_bytes=400, max_files=3)
    for i in range(40):
        log.write({"route": "completions", "input": [f"prompt {i}"], "output": ["x" * 50]})
    log.close()
    files = log.files()
    assert len(files) == 3 and all(p.stat().st_size <= 400 for p in files)
    kept = [r["input"][0] for r in _records(log)]
    assert kept[-1] == "prompt 39" and "prompt 0" not in kept  # the newest records, the oldest files gone
    assert (tmp_path / "logs" / "notes.txt").read_text() == "mine"


def test_a_log_that_cannot_be_written_drops_records_without_failing_requests(tiny_model, tmp_path):
    (tmp_path / "blocker").write_text("a file where the log directory would go")
    log = RequestLog(tmp_path / "blocker" / "logs")
    app = create_app(tiny_model, device="cpu", name="tiny", request_log=log)
    with serving(app) as url:
        for _ in range(2):
            r = httpx.post(url + "/v1/completions", json={"prompt": "hello", "max_tokens": 2})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None
        metrics = httpx.get(url + "/metrics").text
    assert log.dropped == 2 and log.written == 0
    assert 'lmkiln_request_log_records_total{status="dropped"} 2.0' in metrics


def test_serve_refuses_a_log_path_that_is_a_file(tiny_model, tmp_path, capsys):
    from lmkiln.cli import main

    (tmp_path / "log.txt").write_text("not a directory")
    assert main(["serve", str(tiny_model), "--port", "0", "--log-requests", str(tmp_path / "log.txt")]) == 2
    assert "--log-requests" in capsys.readouterr().err and (tmp_path / "log.txt").read_text() == "not a directory"
