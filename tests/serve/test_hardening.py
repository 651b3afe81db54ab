"""The bad-request matrix, as a security reviewer tries it: oversized bodies (declared and chunked) are
refused at the limit without being read, a wrong key is a 401 from a constant-time compare, requests
past --max-concurrent get 429 with Retry-After, malformed or mistyped JSON and prompts past the context
are 400s naming what is wrong, and none of it is a 500. With a key, every route but /health needs it,
and the chat page takes it through a login form into a session cookie, never the URL."""

import json
import os
import socket
import threading
import time
from urllib.parse import urlparse

import httpx
import openai
import pytest

from lmkiln.serve.app import create_app
from lmkiln.serve.request_log import RequestLog
from tests.serve.conftest import serving

MB = 1 << 20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _send_big_body(url: str, chunked: bool, total: int = 50 * MB) -> tuple[int, int]:
    """POST `total` bytes of JSON-ish body on a raw socket, as a client that keeps sending until the
    server answers; (status, bytes sent before the answer)."""
    host = urlparse(url)
    sock = socket.create_connection((host.hostname, host.port), timeout=30)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}"
    sock.sendall(
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{framing}\r\n\r\n".encode()
    )
    piece, sent = b"x" * (256 << 10), 0
    sock.setblocking(False)
    answer = b""
    while sent < total:
        try:
            answer += sock.recv(65536)
            if b"\r\n\r\n" in answer:
                break
        except BlockingIOError:
            pass
        data = (f"{len(piece):x}\r\n".encode() + piece + b"\r\n") if chunked else piece
        try:
            sock.sendall(data)
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            break
        sent += len(piece)
    sock.setblocking(True)
    deadline = time.time() + 30
    while b"\r\n\r\n" not in answer and time.time() < deadline:
        got = sock.recv(65536)
        if not got:
            break
        answer += got
    sock.close()
    return int(answer.split(b" ", 2)[1]), sent


@pytest.fixture(scope="module")
def guarded(tiny_model):
    app = create_app(tiny_model, device="cpu", name="tiny", api_key="sekret", max_concurrent=1, max_batch=1)
    with serving(app) as url:
        yield url, app


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_50mb_body_is_refused_at_the_limit_and_not_read(tiny_model, chunked):
    app = create_app(tiny_model, device="cpu", name="tiny")
    with serving(app) as url:
        before = _rss()
        status, sent = _send_big_body(url, chunked)
        grown = _rss() - before
    assert status == 413
    assert sent < 10 * MB, f"the server let {sent} bytes in before refusing"
    assert grown < 10 * MB, f"RSS grew by {grown / MB:.1f} MB"


def test_wrong_key_is_401_from_a_constant_time_compare(guarded, monkeypatch):
    import hmac

    url, _ = guarded
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert compared, "the key was not compared with hmac.compare_digest"
    for path in ("/metrics", "/", "/v1/models"):  # every route behind the key
        assert httpx.get(url + path).status_code == 401
    assert httpx.get(url + "/health").status_code == 200  # load balancers' probe stays open


def test_the_chat_page_takes_the_key_by_form_into_a_cookie(guarded):
    url, _ = guarded
    page = httpx.get(url + "/")
    assert page.status_code == 401 and 'type="password"' in page.text and 'method="post"' in page.text
    assert httpx.post(url + "/login", data={"key": "nope"}).status_code == 401
    login = httpx.post(url + "/login", data={"key": "sekret"})
    assert login.status_code == 303 and login.headers["location"] == "/"
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "sekret" not in cookie
    with httpx.Client(base_url=url, cookies=login.cookies) as browser:
        assert "<textarea" in browser.get("/").text
        assert browser.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert "?key=" not in (url + "/")  # and the page never reads one
    from lmkiln.serve.app import STATIC

    assert "location.search" not in (STATIC / "index.html").read_text()


def test_requests_past_max_concurrent_get_429_with_retry_after(guarded):
    url, app = guarded
    engine = app.state.server.engine
    auth = {"authorization": "Bearer sekret"}
    engine.max_batch = 0  # hold admissions: the first request stays in flight
    held = {}
    body = {"prompt": "def", "max_tokens": 2}
    t = threading.Thread(target=lambda: held.update(r=httpx.post(url + "/v1/completions", json=body, headers=auth)))
    t.start()
    try:
        deadline = time.time() + 30
        while engine.queue_depth == 0:
            assert time.time() < deadline, "the first request never reached the queue"
            time.sleep(0.005)
        busy = httpx.post(url + "/v1/completions", json=body, headers=auth)
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        assert "--max-concurrent" in busy.json()["error"]["message"]
    finally:
        engine.max_batch = 1
        with engine.wake:
            engine.wake.notify()
        t.join(timeout=30)
    assert held["r"].status_code == 200  # the one in flight was answered


def test_malformed_and_mistyped_requests_are_400_never_500(tiny_model):
    app = create_app(tiny_model, device="cpu", name="tiny")
    with serving(app) as url:
        cases = [
            ("/v1/completions", b"{not json", None),
            ("/v1/completions", json.dumps({"prompt": 3}).encode(), "prompt"),
            ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": "many"}).encode(), "max_tokens"),
            ("/v1/chat/completions", json.dumps({"messages": "hi"}).encode(), "messages"),
            ("/v1/chat/completions", json.dumps({"messages": [{"role": "user"}]}).encode(), "messages.0.content"),
            ("/v1/chat/completions", json.dumps([1, 2]).encode(), None),
            ("/v1/completions", json.dumps({"prompt": "word " * 400}).encode(), "prompt"),
        ]
        for path, body, param in cases:
            r = httpx.post(url + path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, (body[:40], r.status_code, r.text)
            if param is not None:
                assert r.json()["error"]["param"] == param, r.text


def test_the_request_log_is_readable_by_its_owner_only(tmp_path):
    log = RequestLog(tmp_path / "log", redact=False, max_bytes=MB, max_files=2)
    log.write({"input": "a secret prompt"})
    log.close()
    (path,) = (tmp_path / "log").glob("requests-*.jsonl")
    assert path.stat().st_mode & 0o777 == 0o600
