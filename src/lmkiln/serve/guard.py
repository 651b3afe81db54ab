"""What stands in front of every route, as raw ASGI (so it runs before FastAPI reads a byte of the
body): the API key, compared in constant time, from the Authorization header or the chat page's
session cookie; the body limit on the bytes actually read, chunked bodies included (413 as soon as
it is passed, the rest never read); and the limit on requests in flight (429 with Retry-After).
/health stays open for load balancers; the login route takes the key for the chat page."""

from __future__ import annotations

import hashlib
import hmac
import json
from urllib.parse import parse_qs

from lmkiln.serve.protocol import ApiError

OPEN_PATHS = ("/health", "/login")  # a probe needs no key; the login page is where the key is entered
COOKIE = "lmkiln_session"


def session_token(api_key: str) -> str:
    """The chat page's cookie: derived from the key, so it is valid exactly as long as the key is,
    and the key itself never sits in the browser."""
    return hmac.new(api_key.encode(), b"lmkiln chat page session", hashlib.sha256).hexdigest()


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


class Guard:
    """ASGI middleware: auth, body size and concurrency before the app sees a request."""

    def __init__(self, app, api_key: str | None, max_request_bytes: int, max_concurrent: int | None) -> None:
        self.app, self.api_key, self.limit, self.max_concurrent = app, api_key, max_request_bytes, max_concurrent
        self.session = session_token(api_key) if api_key else None
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, headers = scope["path"], _headers(scope)
        if path.startswith("/admin/") and not self.api_key:
            return await _reply(send, 403, "the admin API needs a key: start kiln serve with --api-key")
        if path == "/login" and self.api_key:
            return await self._login(scope, receive, send, headers)
        if self.api_key and path not in OPEN_PATHS and not self._authorised(headers):
            if path == "/" and scope["method"] == "GET":
                return await _login_page(send, 401, "")
            return await _reply(send, 401, "missing or wrong API key (Authorization: Bearer KEY)")
        size = headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > self.limit):
            return await _reply(send, 413, f"request body is {size} bytes; the limit is {self.limit}")
        limited = path.startswith("/v1/") and scope["method"] == "POST" and self.max_concurrent is not None
        if limited and self.in_flight >= self.max_concurrent:
            retry = {"retry-after": "1"}
            return await _reply(send, 429, f"{self.in_flight} requests in flight (--max-concurrent)", retry)
        self.in_flight += limited
        try:
            await self._bounded(scope, receive, send)
        finally:
            self.in_flight -= limited

    def _authorised(self, headers: dict[str, str]) -> bool:
        bearer = headers.get("authorization", "")
        if bearer.startswith("Bearer ") and _same(bearer[7:], self.api_key):
            return True
        return _same(_cookies(headers).get(COOKIE, ""), self.session)

    async def _bounded(self, scope, receive, send) -> None:
        """The app, with a receive that counts body bytes: past the limit, the 413 goes out at once and
        the app is told the client left (whatever it sends after that is dropped)."""
        read, refused = 0, False

        async def counted():
            nonlocal read, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > self.limit:
                    refused = True
                    await _reply(send, 413, f"request body passed the limit of {self.limit} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not refused:
                await send(message)

        await self.app(scope, counted, guarded_send)

    async def _login(self, scope, receive, send, headers) -> None:
        """POST /login with the key (a form field): the session cookie, HttpOnly and same-site, then
        the chat page. The key travels in the body, never in a URL."""
        if scope["method"] != "POST":
            return await _login_page(send, 200, "")
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > 4096:
                return await _reply(send, 413, "the login form is longer than 4096 bytes")
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        key = parse_qs(body.decode("utf-8", "replace")).get("key", [""])[0]
        if not _same(key, self.api_key):
            return await _login_page(send, 401, "Wrong key.")
        cookie = f"{COOKIE}={self.session}; HttpOnly; SameSite=Strict; Path=/"
        headers = _raw({"location": "/", "set-cookie": cookie})
        await send({"type": "http.response.start", "status": 303, "headers": headers})
        await send({"type": "http.response.body", "body": b""})


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


def _cookies(headers: dict[str, str]) -> dict[str, str]:
    pairs = (part.strip().partition("=") for part in headers.get("cookie", "").split(";"))
    return {name: value for name, _, value in pairs if name}


def _raw(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in headers.items()]


async def _reply(send, status: int, message: str, extra: dict[str, str] | None = None) -> None:
    body = json.dumps(ApiError(status, message).body()).encode()
    headers = {"content-type": "application/json", "content-length": str(len(body)), **(extra or {})}
    if status == 413:
        headers["connection"] = "close"  # the unread rest of the body is never read
    await send({"type": "http.response.start", "status": status, "headers": _raw(headers)})
    await send({"type": "http.response.body", "body": body})


LOGIN_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>lmkiln: key</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{font:16px system-ui;max-width:24rem;margin:4rem auto;padding:0 1rem}input,button{font:inherit;padding:.4rem}
.error{color:#b00}</style></head><body><h1>lmkiln</h1>
<p>This server needs its API key. It is kept in a session cookie, not in the address.</p>
<form method="post" action="/login"><input type="password" name="key" autocomplete="current-password" autofocus
aria-label="API key" placeholder="API key"> <button type="submit">Open</button></form>
<p class="error">{error}</p></body></html>"""


async def _login_page(send, status: int, error: str) -> None:
    body = LOGIN_PAGE.replace("{error}", error).encode()
    headers = {"content-type": "text/html; charset=utf-8", "content-length": str(len(body))}
    await send({"type": "http.response.start", "status": status, "headers": _raw(headers)})
    await send({"type": "http.response.body", "body": body})
