"""An OpenAI-compatible API over the continuous-batching engine: /v1/models, /v1/completions and
/v1/chat/completions (the model's chat template), streamed by server-sent events or whole; LoRA
adapters by name (`base+adapter`); bearer-token auth, CORS and a body limit; /health, /metrics
(Prometheus) and the chat page at /. An encoder (ModernBERT) gets /v1/embeddings and, when it is a
classifier, /v1/classify instead of the generating routes (serve/encoding.py)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from lmkiln.data.examples import conversation_text
from lmkiln.errors import UserError

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise UserError("serving needs the 'serve' extra: pip install 'lmkiln[serve]'") from exc

from lmkiln.serve.admin import VERSION_HEADER, add_admin_routes
from lmkiln.serve.batching import Token
from lmkiln.serve.blocklist import Blocklist
from lmkiln.serve.choices import Choice, merged, start_choices
from lmkiln.serve.metrics import ServeMetrics
from lmkiln.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    TextsRequest,
    chat_logprobs,
    completion_logprobs,
)
from lmkiln.serve.request_log import RequestLog
from lmkiln.serve.seq2seq import respond as respond_seq2seq
from lmkiln.serve.versions import Version, Versions

STATIC = Path(__file__).parent / "static"


def cache_summary(engine) -> str:
    """What the KV cache takes now and at most, for the operator choosing --max-batch and --context."""
    e, mb = engine, 2**20
    most = e.max_batch * e.context * e.token_bytes
    return (
        f"KV cache: {e.token_bytes / 1024:,.1f} KiB per token; {e.max_batch} slots x {e.cache.capacity:,} tokens = "
        f"{e.cache.nbytes / mb:,.0f} MiB now, growing with the longest running sequence to at most "
        f"{e.max_batch} x {e.context:,} = {most / mb:,.0f} MiB (--max-batch, --context)"
    )


class Server:
    """The served name's versions (serve/versions.py), its metrics and request log. The first version
    loads on a thread when asked, so the routes answer 503 until it is ready."""

    def __init__(
        self,
        model_dir: Path,
        device: str,
        name: str | None,
        adapters: dict[str, Path],
        max_batch: int,
        max_queue: int,
        context: int | None,
        version: str | None = None,
    ) -> None:
        self.model_dir, self.device, self.first = Path(model_dir), device, (dict(adapters), version)
        self.name = name or self.model_dir.resolve().name
        self.max_batch, self.max_queue, self.context = max_batch, max_queue, context
        self.log = None  # a RequestLog, with --log-requests
        self.blocklist: Blocklist | None = None  # with --blocklist
        self.error: str | None = None

        def engines():
            return [v.engine for v in self.versions.loaded() if v.engine is not None]

        self.metrics = ServeMetrics(
            lambda: sum(e.queue_depth for e in engines()),
            lambda: sum(e.batch_size for e in engines()),
        )
        self.versions = Versions(self.name, self._load_version, self.metrics.activated)

    def _load_version(self, label: str, model_dir: Path, adapters: dict[str, Path]) -> Version:
        return Version(
            label, model_dir, adapters, self.device, self.max_batch, self.max_queue, self.context, self.metrics.finished
        )

    def load(self) -> None:
        adapters, label = self.first
        try:
            version = self.versions.build(self.model_dir, adapters, label, checks=False)
        except UserError as exc:
            self.error = str(exc)
            raise
        self.versions.activate(version)
        if version.engine is not None:
            from lmkiln.log import console

            console.print(cache_summary(version.engine), soft_wrap=True)

    @property
    def active(self) -> Version:
        """The version new requests go to; 503 while the first one loads."""
        if self.versions.active is None:
            raise ApiError(503, self.error or f"model {self.name} is loading; retry shortly")
        return self.versions.active

    @property
    def engine(self):
        return self.versions.active.engine if self.versions.active else None

    def pick(self, requested: str | None, route: str) -> tuple[Version, str | None]:
        """The version and adapter a request names, checked against the route: an encoder reads text
        whole and generates nothing; a decoder has no embeddings."""
        self.active  # noqa: B018 - 503 while loading, with the load error when it failed
        version, adapter = self.versions.pick(requested)
        if route == "generate" and version.encoder is not None:
            raise ApiError(
                400, f"model {self.name} is an encoder: it does not generate; use /v1/embeddings or /v1/classify"
            )
        if route == "encode" and version.encoder is None:
            raise ApiError(400, f"model {self.name} is a decoder: /v1/embeddings and /v1/classify need an encoder")
        return version, adapter

    def close(self) -> None:
        self.versions.close()


def create_app(
    model_dir: str | Path,
    device: str = "auto",
    name: str | None = None,
    adapters: dict[str, Path] | None = None,
    max_batch: int = 16,
    max_queue: int = 64,
    context: int | None = None,
    api_key: str | None = None,
    cors_origins: list[str] | None = None,
    max_request_bytes: int = 1 << 20,
    background: bool = False,
    request_log: RequestLog | None = None,
    version: str | None = None,
    blocklist: Blocklist | None = None,
) -> FastAPI:
    """The app; `background=True` loads the model on a thread (the routes answer 503 until then);
    `request_log` records each generation request and reply; `version` names the first version (v1 by
    default), and serve/admin.py's routes load the next ones."""
    server = Server(Path(model_dir), device, name, dict(adapters or {}), max_batch, max_queue, context, version)
    server.blocklist = blocklist
    if request_log is not None:
        request_log.on_write = server.metrics.logged
        server.log = request_log
    if background:
        threading.Thread(target=lambda: _quiet_load(server), name="lmkiln-load", daemon=True).start()
    else:
        server.load()
    app = FastAPI(title="lmkiln", version="0.1")
    app.state.server = server
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Auth and body size before any parsing; requests counted by route and status."""
        began = time.perf_counter()
        path = request.url.path
        if path.startswith("/admin/") and not api_key:
            return _error(ApiError(403, "the admin API needs a key: start kiln serve with --api-key"))
        if path.startswith(("/v1/", "/admin/")):
            if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
                return _error(ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)"))
            size = request.headers.get("content-length")
            if size is not None and int(size) > max_request_bytes:
                return _error(ApiError(413, f"request body is {size} bytes; the limit is {max_request_bytes}"))
        response = await call_next(request)
        answered = getattr(request.state, "version", None)
        if answered is not None:  # the version that answered, streamed replies included
            response.headers[VERSION_HEADER] = answered
        if path.startswith("/v1/") and request.method == "POST":
            server.metrics.request(path, response.status_code, time.perf_counter() - began)
        return response

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"][1:]) or "body"
        return _error(ApiError(400, f"{param}: {err['msg']}", param))

    @app.exception_handler(Exception)
    async def _internal(request, exc):  # OpenAI's error shape even for bugs
        return _error(ApiError(500, f"internal error: {exc}"))

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    def health():
        version = server.versions.active
        if version is None:
            status = "failed" if server.error else "loading"
            return JSONResponse(
                status_code=503, content={"status": status, "model": server.name, "error": server.error}
            )
        head = {"status": "ok", "model": server.name, "version": version.label}
        if version.encoder is not None:
            kind = "classifier" if version.encoder.classifier is not None else "encoder"
            return {**head, "kind": kind, "context": version.context}
        if version.seq2seq is not None:
            return {**head, "kind": "encoder-decoder", "context": version.context}
        engine = version.engine
        return {
            **head,
            "queue": engine.queue_depth,
            "running": engine.batch_size,
            "max_batch": server.max_batch,
            "context": engine.context,
            "kv_cache_bytes": engine.cache.nbytes,
            "kv_cache_max_bytes": server.max_batch * engine.context * engine.token_bytes,
        }

    @app.get("/metrics")
    def metrics():
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def models():
        active = server.active
        now = int(time.time())
        states = {d["version"]: d["state"] for d in server.versions.describe()}
        data = []
        for m in server.versions.model_ids():
            label = m.partition("+")[0].partition("@")[2] or active.label
            data.append(
                {
                    "id": m,
                    "object": "model",
                    "created": now,
                    "owned_by": "lmkiln",
                    "version": label,
                    "state": states[label],
                }
            )
        return {"object": "list", "data": data}

    @app.post("/v1/embeddings")
    async def embeddings(req: TextsRequest, request: Request):
        version, _ = server.pick(req.model, "encode")
        request.state.version = version.label
        vectors, tokens = await asyncio.to_thread(version.encoder.embeddings, req.texts())
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": _packed(v) if req.encoding_format == "base64" else v}
                for i, v in enumerate(vectors)
            ],
            "model": server.versions.served_id(version),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    @app.post("/v1/classify")
    async def classify(req: TextsRequest, request: Request):
        version, _ = server.pick(req.model, "encode")
        request.state.version = version.label
        results, tokens = await asyncio.to_thread(version.encoder.classify, req.texts())
        served = server.versions.served_id(version)
        return {"object": "list", "data": results, "model": served, "usage": {"prompt_tokens": tokens}}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        req.check_scoring()
        version, adapter = server.pick(req.model, "generate")
        request.state.version = version.label
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        served = server.versions.served_id(version, adapter)
        if version.seq2seq is not None:
            return await asyncio.to_thread(
                respond_seq2seq, version.seq2seq, req, texts, False, served, "prompt", server.blocklist, server.metrics
            )
        prompts = [version.encode(t, "prompt") for t in texts]
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        choices = start_choices(server, version, adapter, req, prompts, version.stop_ids, req.logprobs, max_tokens)
        logged = {"route": "completions", "input": texts, "model": served}
        return await _respond(server, request, req, choices, prompts, False, texts if req.echo else None, logged)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        version, adapter = server.pick(req.model, "generate")
        request.state.version = version.label
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        served = server.versions.served_id(version, adapter)
        if version.seq2seq is not None:
            text = conversation_text(messages)
            return await asyncio.to_thread(
                respond_seq2seq,
                version.seq2seq,
                req,
                [text],
                True,
                served,
                "messages",
                server.blocklist,
                server.metrics,
            )
        try:
            text = version.chat.render(messages, add_generation_prompt=True)
        except Exception as exc:
            raise ApiError(400, f"messages: the chat template cannot render them: {exc}", "messages") from None
        prompt = version.encode(text, "messages")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens or req.max_tokens or version.engine.context
        choices = start_choices(server, version, adapter, req, [prompt], version.stop_ids, logprobs, max_tokens)
        logged = {"route": "chat", "input": messages, "model": served}
        return await _respond(server, request, req, choices, [prompt], True, None, logged)

    add_admin_routes(app, server)
    return app


def _packed(vector: list[float]) -> str:
    import base64

    import numpy as np

    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


def _quiet_load(server: Server) -> None:
    try:
        server.load()
    except UserError:
        pass  # /health reports it


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content=exc.body())


async def _respond(
    server: Server,
    request: Request,
    req,
    choices: list[Choice],
    prompts: list[list[int]],
    chat: bool,
    echo: list[str] | None,
    logged: dict,
):
    """The reply to a generation request; `logged` is what the request log records of it (the route,
    the input, and the served model: the version that answered)."""
    started = time.perf_counter()
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    head = {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": logged["model"],
    }
    decode = choices[0].version.decode
    n_prompt = sum(len(p) for p in prompts)

    def usage() -> dict:
        done = sum(c.tokens for c in choices)
        return {"prompt_tokens": n_prompt, "completion_tokens": done, "total_tokens": n_prompt + done}

    def logprobs_of(tokens: list[Token], offset: int):
        if not tokens or tokens[0].logprob is None:
            return None
        return chat_logprobs(tokens, decode) if chat else completion_logprobs(tokens, decode, offset)

    def log(texts: list[str], finishes: list[str | None]) -> None:
        if server.log is not None:
            server.log.write(
                {
                    **logged,
                    "output": texts,
                    "finish_reasons": finishes,
                    **usage(),
                    "latency_s": round(time.perf_counter() - started, 4),
                }
            )

    if req.stream:
        return StreamingResponse(
            _events(server, req, choices, head, usage, logprobs_of, chat, log), media_type="text/event-stream"
        )

    results = {i: {"text": echo[i // req.n] if echo else "", "tokens": [], "finish": None} for i in range(len(choices))}

    async def collect() -> None:
        async for i, text, tokens, finish in merged(choices):
            r = results[i]
            r["tokens"] += tokens
            r["text"] += text
            r["finish"] = finish or r["finish"]

    task = asyncio.create_task(collect())
    while not task.done():  # a client that hangs up cancels its sequences
        await asyncio.wait({task}, timeout=0.25)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            return Response(status_code=499)
    task.result()
    body = []
    for i, r in results.items():
        if echo and req.logprobs is not None:  # the prompt's tokens too, the first without a logprob
            lp = completion_logprobs(choices[i].prompt_tokens + r["tokens"], decode, 0)
        else:
            lp = logprobs_of(r["tokens"], len(echo[i // req.n]) if echo else 0)
        if chat:
            body.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": r["text"]},
                    "logprobs": lp,
                    "finish_reason": r["finish"],
                }
            )
        else:
            body.append({"index": i, "text": r["text"], "logprobs": lp, "finish_reason": r["finish"]})
    log([r["text"] for r in results.values()], [r["finish"] for r in results.values()])
    return {**head, "choices": body, "usage": usage()}


async def _events(server, req, choices, head, usage, logprobs_of, chat, log) -> AsyncIterator[str]:
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

    def event(payload: dict) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    if chat:
        for i in range(len(choices)):
            yield event(
                {
                    **head,
                    "choices": [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                }
            )
    offsets = [0] * len(choices)
    texts, finishes = [""] * len(choices), [None] * len(choices)
    try:
        async for i, text, tokens, finish in merged(choices):
            texts[i] += text
            finishes[i] = finish or finishes[i]
            if not text and finish is None:
                continue
            lp = logprobs_of(tokens, offsets[i])
            offsets[i] += len(text)
            if chat:
                choice = {
                    "index": i,
                    "delta": {"content": text} if text else {},
                    "logprobs": lp,
                    "finish_reason": finish,
                }
            else:
                choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}
            yield event({**head, "choices": [choice]})
    except Exception as exc:
        yield event(ApiError(500, f"internal error: {exc}").body())
        return
    log(texts, finishes)
    if req.stream_options is not None and req.stream_options.include_usage:
        yield event({**head, "choices": [], "usage": usage()})
    yield "data: [DONE]\n\n"
