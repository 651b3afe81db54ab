"""A request's generated choices: each one's sequence in the engine, its text cut at the request's stop
strings and kept clear of the blocklist (text that could begin either is held back until it cannot),
and every choice's pieces merged as they come."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Protocol

from lmkiln.serve.batching import PromptLogprobs, QueueFull, Sampling, Sequence, Token
from lmkiln.serve.blocklist import Blocklist
from lmkiln.serve.constraints import Constraint
from lmkiln.serve.metrics import ServeMetrics
from lmkiln.serve.protocol import ApiError
from lmkiln.serve.versions import Version


class Server(Protocol):
    """What a request's choices use of the server (serve/app.py's Server, which imports this module)."""

    metrics: ServeMetrics
    blocklist: Blocklist


class Choice:
    """One generated choice: its sequence in the engine, and its text cut at the request's stop strings
    (text that could begin a stop string is held back until it cannot)."""

    def __init__(
        self,
        version: Version,
        metrics: ServeMetrics,
        prompt: list[int],
        sampling: Sampling,
        stop_ids: frozenset[int],
        stops: list[str],
        adapter: int,
        blocklist: Blocklist | None = None,
        constraint: Constraint | None = None,
    ) -> None:
        self.version, self.metrics, self.stops, self.blocklist = version, metrics, stops, blocklist
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.seq = Sequence(
            prompt,
            sampling,
            lambda event: loop.call_soon_threadsafe(self.queue.put_nowait, event),
            stop_ids,
            adapter,
            constraint=constraint,
        )
        self.tokens = 0
        self.prompt_tokens = [Token(prompt[0])]  # with prompt logprobs: the rest, each with its logprob
        try:
            version.engine.submit(self.seq)
        except QueueFull as exc:
            raise ApiError(429, f"the server is busy: {exc}; retry later") from None

    def _filtered(self, text: str, emitted: str, blocked: int, tokens: list[Token]):
        """The last piece of a reply cut before a blocked phrase (never held-back text was sent past it)."""
        self.metrics.filtered()
        return text[len(emitted) : blocked], tokens, "content_filter"

    def _held(self, text: str) -> int:
        """Characters at the end of text that could start a stop string."""
        return max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)

    async def pieces(self) -> AsyncIterator[tuple[str, list[Token], str | None]]:
        ids, tokens, emitted = [], [], ""
        try:
            while True:
                event = await self.queue.get()
                if isinstance(event, PromptLogprobs):
                    self.prompt_tokens += event.tokens
                    continue
                if isinstance(event, str):
                    if event.startswith("error"):
                        raise RuntimeError(event)
                    text = self.version.decode(ids)
                    blocked = self.blocklist.cut(text, final=True) if self.blocklist else None
                    if blocked is not None:
                        yield self._filtered(text, emitted, blocked, tokens)
                        return
                    yield text[len(emitted) :], tokens, "length" if event == "length" else "stop"
                    return
                if not ids:
                    self.metrics.first_token(time.perf_counter() - self.seq.submitted)
                ids.append(event.id)
                tokens.append(event)
                self.tokens += 1
                text = self.version.decode(ids)
                cut = min((text.find(s) for s in self.stops if s in text), default=-1)
                blocked = self.blocklist.cut(text, final=False) if self.blocklist else None
                if blocked is not None and (cut < 0 or blocked < cut):
                    yield self._filtered(text, emitted, blocked, tokens)
                    return
                if cut >= 0:
                    yield text[len(emitted) : cut], tokens, "stop"
                    return
                held = max(self._held(text), self.blocklist.held(text) if self.blocklist else 0)
                safe = len(text) - held
                if not text.endswith("\ufffd") and safe > len(emitted):  # whole UTF-8 characters only
                    yield text[len(emitted) : safe], tokens, None
                    emitted, tokens = text[:safe], []
        finally:
            self.seq.cancel()  # done, stopped by a stop string, or the client went away: free the slot


def start_choices(
    server: Server,
    version: Version,
    adapter: str | None,
    req,
    prompts: list[list[int]],
    stop_ids: frozenset[int],
    logprobs: int | None,
    max_tokens: int,
    grammar: tuple[str, str] | None = None,
) -> list[Choice]:
    """Each prompt's `req.n` choices submitted to the engine; `grammar` (an llguidance grammar and the
    field that asked for it) constrains every one of them, each with its own matcher."""
    index = version.adapters[adapter] if adapter else -1
    stop_ids = frozenset() if req.ignore_eos else stop_ids
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
                    prompt_logprobs=getattr(req, "echo", False) and logprobs is not None,
                )
                constraint = version.grammars.constraint(*grammar) if grammar else None
                choices.append(
                    Choice(
                        version,
                        server.metrics,
                        prompt,
                        sampling,
                        stop_ids,
                        req.stop or [],
                        index,
                        server.blocklist,
                        constraint,
                    )
                )
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
