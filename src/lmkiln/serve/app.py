"""An OpenAI-compatible API over the continuous-batching engine: /v1/models, /v1/completions and
/v1/chat/completions (the model's chat template), streamed by server-sent events or whole (replies.py),
with structured outputs (constraints.py) and tool calls (tools.py); LoRA adapters by name
(`base+adapter`); the key, body limit and concurrency limit in front of every route (guard.py), and CORS;
/health, /metrics (Prometheus) and the chat page at /. An encoder (ModernBERT) gets /v1/embeddings and,
when it is a classifier, /v1/classify instead of the generating routes (serve/encoding.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from lmkiln.data.examples import conversation_text
from lmkiln.errors import UserError

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise UserError("serving needs the 'serve' extra: pip install 'lmkiln[serve]'") from exc

from lmkiln.serve.admin import VERSION_HEADER, add_admin_routes
from lmkiln.serve.blocklist import Blocklist
from lmkiln.serve.choices import start_choices
from lmkiln.serve.constraints import lark_grammar, request_grammar
from lmkiln.serve.guard import Guard
from lmkiln.serve.metrics import ServeMetrics
from lmkiln.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    TextsRequest,
)
from lmkiln.serve.replies import respond
from lmkiln.serve.request_log import RequestLog
from lmkiln.serve.seq2seq import respond as respond_seq2seq
from lmkiln.serve.tools import forced_grammar, messages_for_template, tool_dicts
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
        prefix_cache_bytes: int = 64 << 20,
    ) -> None:
        self.model_dir, self.device, self.first = Path(model_dir), device, (dict(adapters), version)
        self.name = name or self.model_dir.resolve().name
        self.max_batch, self.max_queue, self.context = max_batch, max_queue, context
        self.prefix_cache_bytes = prefix_cache_bytes  # each version's engine keeps shared prefixes this long
        self.log = None  # a RequestLog, with --log-requests
        self.blocklist: Blocklist | None = None  # with --blocklist
        self.error: str | None = None

        def engines():
            return [v.engine for v in self.versions.loaded() if v.engine is not None]

        self.metrics = ServeMetrics(
            lambda: sum(e.queue_depth for e in engines()),
            lambda: sum(e.batch_size for e in engines()),
            lambda: [e.prefix for e in engines() if e.prefix is not None],
        )
        self.versions = Versions(self.name, self._load_version, self.metrics.activated)

    def _load_version(self, label: str, model_dir: Path, adapters: dict[str, Path]) -> Version:
        return Version(
            label,
            model_dir,
            adapters,
            self.device,
            self.max_batch,
            self.max_queue,
            self.context,
            self.metrics.finished,
            self.prefix_cache_bytes,
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
    max_concurrent: int | None = 128,
    prefix_cache_mb: int = 64,
) -> FastAPI:
    """The app; `background=True` loads the model on a thread (the routes answer 503 until then);
    `request_log` records each generation request and reply; `version` names the first version (v1 by
    default), and serve/admin.py's routes load the next ones; `max_concurrent` requests to /v1/ at once at
    most (429 past it), None for no limit; `prefix_cache_mb` of shared prompt prefixes kept (0: none)."""
    server = Server(
        Path(model_dir),
        device,
        name,
        dict(adapters or {}),
        max_batch,
        max_queue,
        context,
        version,
        prefix_cache_mb << 20,
    )
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

    @app.middleware("http")
    async def count(request: Request, call_next):
        """Requests counted by route and status, and the version that answered named in a header."""
        began = time.perf_counter()
        response = await call_next(request)
        answered = getattr(request.state, "version", None)
        if answered is not None:  # the version that answered, streamed replies included
            response.headers[VERSION_HEADER] = answered
        if request.url.path.startswith("/v1/") and request.method == "POST":
            server.metrics.request(request.url.path, response.status_code, time.perf_counter() - began)
        return response

    # Starlette runs the last added outermost: CORS (preflights carry no key), then the guard.
    app.add_middleware(Guard, api_key=api_key, max_request_bytes=max_request_bytes, max_concurrent=max_concurrent)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        err = exc.errors()[0]
        param = _param(err["loc"][1:])
        if err["type"] == "extra_forbidden":
            return _error(ApiError(400, f"{param}: not supported by kiln serve (refused, not ignored)", param))
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
        grammar = request_grammar(req)
        choices = start_choices(
            server, version, adapter, req, prompts, version.stop_ids, req.logprobs, max_tokens, grammar
        )
        logged = {"route": "completions", "input": texts, "model": served}
        return await respond(server, request, req, choices, prompts, False, texts if req.echo else None, logged)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        req.check_tools()
        version, adapter = server.pick(req.model, "generate")
        request.state.version = version.label
        native = version.chat.renders_tools if version.engine is not None else False
        messages = messages_for_template(req, native)
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
        calling = bool(req.tools) and req.tool_choice != "none"
        try:
            tools = tool_dicts(req) if calling and native else None
            text = version.chat.render(messages, add_generation_prompt=True, tools=tools)
        except Exception as exc:
            raise ApiError(400, f"messages: the chat template cannot render them: {exc}", "messages") from None
        prompt = version.encode(text, "messages")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens or req.max_tokens or version.engine.context
        forced = forced_grammar(req)
        grammar = (lark_grammar(forced), "tool_choice") if forced else request_grammar(req)
        choices = start_choices(
            server, version, adapter, req, [prompt], version.stop_ids, logprobs, max_tokens, grammar
        )
        logged = {"route": "chat", "input": messages, "model": served}
        return await respond(server, request, req, choices, [prompt], True, None, logged, calling)

    add_admin_routes(app, server)
    return app


TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _param(loc: tuple) -> str:
    """The field a validation error is about, without pydantic's union-branch tags (prompt.str)."""
    parts = []
    for p in loc:
        if isinstance(p, str) and (p in TYPE_TAGS or "[" in p or p.startswith(("function-", "literal", "tagged"))):
            break
        parts.append(str(p))
    return ".".join(parts) or "body"


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
