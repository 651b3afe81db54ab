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

from lmkiln.serve.batching import QueueFull, Sampling, Sequence, Token
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
    """The model, tokenizer, engine and adapters behind the routes; loaded on a thread when asked, so
    the routes answer 503 until it is ready."""

    def __init__(
        self,
        model_dir: Path,
        device: str,
        name: str | None,
        adapters: dict[str, Path],
        max_batch: int,
        max_queue: int,
        context: int | None,
    ) -> None:
        self.model_dir, self.device, self.adapter_dirs = Path(model_dir), device, adapters
        self.name = name or self.model_dir.resolve().name
        self.max_batch, self.max_queue, self.context = max_batch, max_queue, context
        self.engine = None
        self.encoder = None  # an EncoderService, for a ModernBERT directory
        self.seq2seq = None  # a Seq2SeqService, for a T5 directory
        self.log = None  # a RequestLog, with --log-requests
        self.error: str | None = None
        self.metrics = ServeMetrics(
            lambda: self.engine.queue_depth if self.engine else 0, lambda: self.engine.batch_size if self.engine else 0
        )

    def load(self) -> None:
        from lmkiln.device import pick_device
        from lmkiln.model.inference import load_for_inference
        from lmkiln.serve.adapters import AdapterSet
        from lmkiln.serve.batching import Engine
        from lmkiln.serve.encoding import EncoderService, is_encoder

        try:
            from lmkiln.serve.seq2seq import Seq2SeqService, is_seq2seq

            if is_seq2seq(self.model_dir):
                if self.adapter_dirs:
                    raise UserError("--adapter: adapters are served on a decoder; merge them into the T5 model instead")
                self.seq2seq = Seq2SeqService(self.model_dir, pick_device(self.device))
                return
            if is_encoder(self.model_dir):
                if self.adapter_dirs:
                    raise UserError("--adapter: adapters are served on a decoder; merge them into an encoder instead")
                self.encoder = EncoderService(self.model_dir, pick_device(self.device))
                return
            lm = load_for_inference(self.model_dir, pick_device(self.device))
            model, self.tok, self.chat = lm.model, lm.tok, lm.chat
            self.stop_ids = lm.chat.stop_ids
            adapters = AdapterSet(model) if self.adapter_dirs else None
            self.adapters = {n: adapters.add(n, d) for n, d in self.adapter_dirs.items()}
            self.engine = Engine(
                model, self.max_batch, self.max_queue, self.context, adapters, on_finish=self.metrics.finished
            )
            from lmkiln.log import console

            console.print(cache_summary(self.engine), soft_wrap=True)
        except UserError as exc:
            self.error = str(exc)
            raise

    def ready(self) -> None:
        if self.engine is None and self.encoder is None and self.seq2seq is None:
            raise ApiError(503, self.error or f"model {self.name} is loading; retry shortly")

    def generative(self) -> None:
        """Ready, and a decoder: an encoder reads text whole and generates nothing."""
        self.ready()
        if self.encoder is not None:
            raise ApiError(
                400, f"model {self.name} is an encoder: it does not generate; use /v1/embeddings or /v1/classify"
            )

    def encoding(self):
        """Ready, and an encoder: its EncoderService."""
        self.ready()
        if self.encoder is None:
            raise ApiError(400, f"model {self.name} is a decoder: /v1/embeddings and /v1/classify need an encoder")
        return self.encoder

    def model_ids(self) -> list[str]:
        return [self.name] + [f"{self.name}+{a}" for a in self.adapter_dirs]

    def adapter_of(self, requested: str | None) -> int:
        if requested in (None, "", self.name):
            return -1
        base, _, adapter = requested.partition("+")
        if base == self.name and adapter in self.adapters:
            return self.adapters[adapter]
        raise ApiError(404, f"model '{requested}' is not served here (serving {', '.join(self.model_ids())})", "model")

    def encode(self, text: str, param: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if not ids:
            raise ApiError(400, f"{param}: empty after tokenisation", param)
        if len(ids) >= self.engine.context:
            raise ApiError(413, f"{param}: {len(ids)} tokens; the context is {self.engine.context}", param)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


class Choice:
    """One generated choice: its sequence in the engine, and its text cut at the request's stop strings
    (text that could begin a stop string is held back until it cannot)."""

    def __init__(
        self,
        server: Server,
        prompt: list[int],
        sampling: Sampling,
        stop_ids: frozenset[int],
        stops: list[str],
        adapter: int,
    ) -> None:
        self.server, self.stops = server, stops
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.seq = Sequence(
            prompt, sampling, lambda event: loop.call_soon_threadsafe(self.queue.put_nowait, event), stop_ids, adapter
        )
        self.tokens = 0
        try:
            server.engine.submit(self.seq)
        except QueueFull as exc:
            raise ApiError(429, f"the server is busy: {exc}; retry later") from None

    def _held(self, text: str) -> int:
        """Characters at the end of text that could start a stop string."""
        return max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)

    async def pieces(self) -> AsyncIterator[tuple[str, list[Token], str | None]]:
        ids, tokens, emitted = [], [], ""
        try:
            while True:
                event = await self.queue.get()
                if isinstance(event, str):
                    if event.startswith("error"):
                        raise RuntimeError(event)
                    text = self.server.decode(ids)
                    yield text[len(emitted) :], tokens, "length" if event == "length" else "stop"
                    return
                if not ids:
                    self.server.metrics.first_token(time.perf_counter() - self.seq.submitted)
                ids.append(event.id)
                tokens.append(event)
                self.tokens += 1
                text = self.server.decode(ids)
                cut = min((text.find(s) for s in self.stops if s in text), default=-1)
                if cut >= 0:
                    yield text[len(emitted) : cut], tokens, "stop"
                    return
                safe = len(text) - self._held(text)
                if not text.endswith("\ufffd") and safe > len(emitted):  # whole UTF-8 characters only
                    yield text[len(emitted) : safe], tokens, None
                    emitted, tokens = text[:safe], []
        finally:
            self.seq.cancel()  # done, stopped by a stop string, or the client went away: free the slot


def start_choices(
    server: Server, req, prompts: list[list[int]], stop_ids: frozenset[int], logprobs: int | None, max_tokens: int
) -> list[Choice]:
    adapter = server.adapter_of(req.model)
    choices = []
    try:
        for prompt in prompts:
            for j in range(req.n):
                sampling = Sampling(
                    max_tokens,
                    req.temperature,
                    req.top_p,
                    req.top_k,
                    None if req.seed is None else req.seed + j,
                    logprobs,
                )
                choices.append(Choice(server, prompt, sampling, stop_ids, req.stop or [], adapter))
    except ApiError:
        for c in choices:
            c.seq.cancel()
        raise
    return choices


async def merged(choices: list[Choice]) -> AsyncIterator[tuple[int, str, list[Token], str | None]]:
    """Every choice's pieces as they come, tagged with the choice's index."""
    if len(choices) == 1:
        async for piece in choices[0].pieces():
            yield (0, *piece)
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, choice: Choice) -> None:
        try:
            async for piece in choice.pieces():
                await queue.put((i, *piece))
        except Exception as exc:
            await queue.put(exc)

    tasks = [asyncio.create_task(pump(i, c)) for i, c in enumerate(choices)]
    try:
        for _ in range(len(choices)):
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item[3] is not None:
                    break
    finally:
        for t in tasks:
            t.cancel()


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
) -> FastAPI:
    """The app; `background=True` loads the model on a thread (the routes answer 503 until then);
    `request_log` records each generation request and reply."""
    server = Server(Path(model_dir), device, name, dict(adapters or {}), max_batch, max_queue, context)
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
        if path.startswith("/v1/"):
            if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
                return _error(ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)"))
            size = request.headers.get("content-length")
            if size is not None and int(size) > max_request_bytes:
                return _error(ApiError(413, f"request body is {size} bytes; the limit is {max_request_bytes}"))
        response = await call_next(request)
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
        if server.encoder is not None:
            kind = "classifier" if server.encoder.classifier is not None else "encoder"
            return {"status": "ok", "model": server.name, "kind": kind, "context": server.encoder.context}
        if server.seq2seq is not None:
            return {"status": "ok", "model": server.name, "kind": "encoder-decoder", "context": server.seq2seq.context}
        if server.engine is None:
            status = "failed" if server.error else "loading"
            return JSONResponse(
                status_code=503, content={"status": status, "model": server.name, "error": server.error}
            )
        return {
            "status": "ok",
            "model": server.name,
            "queue": server.engine.queue_depth,
            "running": server.engine.batch_size,
            "max_batch": server.max_batch,
            "context": server.engine.context,
            "kv_cache_bytes": server.engine.cache.nbytes,
            "kv_cache_max_bytes": server.max_batch * server.engine.context * server.engine.token_bytes,
        }

    @app.get("/metrics")
    def metrics():
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def models():
        server.ready()
        now = int(time.time())
        return {
            "object": "list",
            "data": [{"id": m, "object": "model", "created": now, "owned_by": "lmkiln"} for m in server.model_ids()],
        }

    @app.post("/v1/embeddings")
    async def embeddings(req: TextsRequest):
        service = server.encoding()
        vectors, tokens = await asyncio.to_thread(service.embeddings, req.texts())
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": _packed(v) if req.encoding_format == "base64" else v}
                for i, v in enumerate(vectors)
            ],
            "model": server.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    @app.post("/v1/classify")
    async def classify(req: TextsRequest):
        service = server.encoding()
        results, tokens = await asyncio.to_thread(service.classify, req.texts())
        return {"object": "list", "data": results, "model": server.name, "usage": {"prompt_tokens": tokens}}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        server.generative()
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if server.seq2seq is not None:
            return await asyncio.to_thread(respond_seq2seq, server.seq2seq, req, texts, False, server.name, "prompt")
        prompts = [server.encode(t, "prompt") for t in texts]
        choices = start_choices(server, req, prompts, server.stop_ids, req.logprobs, req.max_tokens or 16)
        logged = {"route": "completions", "input": texts}
        return await _respond(server, request, req, choices, prompts, False, texts if req.echo else None, logged)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        server.generative()
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        if server.seq2seq is not None:
            text = conversation_text(messages)
            return await asyncio.to_thread(respond_seq2seq, server.seq2seq, req, [text], True, server.name, "messages")
        try:
            text = server.chat.render(messages, add_generation_prompt=True)
        except Exception as exc:
            raise ApiError(400, f"messages: the chat template cannot render them: {exc}", "messages") from None
        prompt = server.encode(text, "messages")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens or req.max_tokens or server.engine.context
        choices = start_choices(server, req, [prompt], server.chat.stop_ids, logprobs, max_tokens)
        return await _respond(server, request, req, choices, [prompt], True, None, {"route": "chat", "input": messages})

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
    echo: list[str] | None = None,
    logged: dict | None = None,
):
    started = time.perf_counter()
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    head = {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": req.model or server.name,
    }
    n_prompt = sum(len(p) for p in prompts)

    def usage() -> dict:
        done = sum(c.tokens for c in choices)
        return {"prompt_tokens": n_prompt, "completion_tokens": done, "total_tokens": n_prompt + done}

    def logprobs_of(tokens: list[Token], offset: int):
        if not tokens or tokens[0].logprob is None:
            return None
        return chat_logprobs(tokens, server.decode) if chat else completion_logprobs(tokens, server.decode, offset)

    def log(texts: list[str], finishes: list[str | None]) -> None:
        if server.log is not None and logged is not None:
            server.log.write(
                {
                    **logged,
                    "model": head["model"],
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
