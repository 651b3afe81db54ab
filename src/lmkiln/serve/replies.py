"""A generation request's reply in OpenAI's shape, whole or as server-sent events: each choice's text,
logprobs and finish reason, tool calls parsed out of chat replies, usage, and the request log's record."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from lmkiln.serve.batching import Token
from lmkiln.serve.choices import Choice, merged
from lmkiln.serve.protocol import ApiError, chat_logprobs, completion_logprobs
from lmkiln.serve.tools import CallStream, parse_calls


async def respond(
    server,
    request: Request,
    req,
    choices: list[Choice],
    prompts: list[list[int]],
    chat: bool,
    echo: list[str] | None,
    logged: dict,
    calling: bool = False,
):
    """The reply to a generation request; `logged` is what the request log records of it (the route,
    the input, and the served model: the version that answered); with `calling`, tool calls in the
    reply come back as `tool_calls`."""
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
            events(server, req, choices, head, usage, logprobs_of, chat, log, calling), media_type="text/event-stream"
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
            message, finish = {"role": "assistant", "content": r["text"]}, r["finish"]
            if calling:
                content, calls = parse_calls(r["text"])
                if calls:
                    message, finish = (
                        {"role": "assistant", "content": content or None, "tool_calls": calls},
                        "tool_calls",
                    )
            body.append({"index": i, "message": message, "logprobs": lp, "finish_reason": finish})
        else:
            body.append({"index": i, "text": r["text"], "logprobs": lp, "finish_reason": r["finish"]})
    log([r["text"] for r in results.values()], [r["finish"] for r in results.values()])
    return {**head, "choices": body, "usage": usage()}


async def events(server, req, choices, head, usage, logprobs_of, chat, log, calling=False) -> AsyncIterator[str]:
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
    streams = [CallStream() for _ in choices] if calling else None
    called = [0] * len(choices)
    try:
        async for i, text, tokens, finish in merged(choices):
            texts[i] += text
            finishes[i] = finish or finishes[i]
            if not text and finish is None:
                continue
            lp = logprobs_of(tokens, offsets[i])
            offsets[i] += len(text)
            if chat:
                delta = {"content": text} if text else {}
                if streams is not None:
                    delta, finish = _call_delta(streams[i], text, finish, called, i)
                choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
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


def _call_delta(stream: CallStream, text: str, finish: str | None, called: list[int], i: int):
    """A streamed chat delta with tool calls: content outside calls, each call whole as it closes (with
    its index among the choice's calls), and finish_reason tool_calls when the reply made any."""
    content, calls = stream.feed(text)
    if finish is not None:
        content += stream.flush()
    delta: dict = {"content": content} if content else {}
    if calls:
        delta["tool_calls"] = [{"index": called[i] + k, **c} for k, c in enumerate(calls)]
        called[i] += len(calls)
    if finish is not None and called[i]:
        finish = "tool_calls"
    return delta, finish
