"""An OpenAI-compatible API: `/v1/models` and `/v1/completions` (streaming by server-sent events)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

from lmkiln.errors import UserError

try:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, Field
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise UserError("serving needs the 'serve' extra: pip install 'lmkiln[serve]'") from exc


class CompletionRequest(BaseModel):
    model: str | None = None
    prompt: str
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": None}})


def create_app(model_dir: str | Path, device: str = "auto", name: str | None = None) -> FastAPI:
    from lmkiln.device import pick_device
    from lmkiln.model.generate import stream
    from lmkiln.model.hub import generation_eos, load_model
    from lmkiln.tokenizer.train import load_tokenizer

    model_dir = Path(model_dir)
    model = load_model(model_dir, pick_device(device))
    tok = load_tokenizer(model_dir)
    model_name = name or model_dir.resolve().name
    stop_ids = generation_eos(model_dir)
    lock = threading.Lock()  # one generation at a time (continuous batching comes with the serving issue)
    created = int(time.time())
    app = FastAPI(title="lmkiln", version="0.1")

    @app.exception_handler(Exception)
    async def _internal(request, exc):  # keep OpenAI's error shape even for bugs
        return _error(500, f"internal error: {exc}", "server_error")

    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"][1:])
        return _error(400, f"{param}: {err['msg']}", param=param)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "lmkiln"}]}

    def _pieces(req: CompletionRequest):
        prompt = tok.encode(req.prompt, add_special_tokens=False).ids
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        return prompt, stops

    def _run(req: CompletionRequest, prompt: list[int], stops: list[str]):
        """Yield text deltas, cut at the first stop string; returns the finish reason via StopIteration."""
        ids: list[int] = []
        emitted = ""
        with lock:
            for token in stream(model, prompt, req.max_tokens, temperature=req.temperature, top_k=req.top_k,
                                top_p=req.top_p, stop_ids=stop_ids, seed=req.seed):
                ids.append(token)
                text = tok.decode(ids)
                cut = min((text.find(s) for s in stops if s and s in text), default=-1)
                if cut >= 0:
                    if cut > len(emitted):
                        yield text[len(emitted):cut], len(ids)
                    return "stop"
                if not text.endswith("\ufffd"):  # wait for a whole UTF-8 character
                    yield text[len(emitted):], len(ids)
                    emitted = text
        return "length" if len(ids) >= req.max_tokens else "stop"

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        if req.model not in (None, model_name):
            return _error(404, f"model '{req.model}' is not served here (serving '{model_name}')", param="model")
        prompt, stops = _pieces(req)
        if len(prompt) >= model.args.max_seq_len:
            return _error(413, f"prompt is {len(prompt)} tokens; the context is {model.args.max_seq_len}", param="prompt")
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def body(text: str, finish: str | None, usage: dict | None = None) -> dict:
            out = {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                   "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
            if usage:
                out["usage"] = usage
            return out

        def usage(n: int) -> dict:
            return {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}

        if req.stream:
            def events():
                gen, n = _run(req, prompt, stops), 0
                try:
                    while True:
                        delta, n = next(gen)
                        yield f"data: {json.dumps(body(delta, None))}\n\n"
                except StopIteration as stop:
                    yield f"data: {json.dumps(body('', stop.value, usage(n)))}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")

        gen, text, n = _run(req, prompt, stops), "", 0
        try:
            while True:
                delta, n = next(gen)
                text += delta
        except StopIteration as stop:
            finish = stop.value
        return body(text, finish, usage(n))

    return app
