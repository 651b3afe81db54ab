"""Continuous batching: one thread owns the model and a KV cache with a preallocated slot per running
sequence. Between two decode steps, finished or cancelled sequences leave their slots and waiting ones
are prefilled into free slots, so a request never waits for a whole batch to end. Each step runs every
running sequence's next token in one forward, each row at its own position (model/families/transformer.py's
SlotCache)."""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmkiln.model.families.transformer import Transformer
from lmkiln.model.inference.generate import sample_next
from lmkiln.model.inference.kv_cache import SlotCache, stored_dtype
from lmkiln.model.inference.memory import release_freed_memory
from lmkiln.serve.constraints import Constraint
from lmkiln.serve.prefix_cache import PrefixCache


class QueueFull(Exception):
    pass


@dataclass
class Sampling:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the k most likely
    prompt_logprobs: bool = False  # also each prompt token's (after the first), as one PromptLogprobs event


@dataclass
class Token:
    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class PromptLogprobs:
    """Each prompt token after the first as a Token with its logprob given the tokens before it (and the
    `logprobs` most likely there): what scoring a text (echo, max_tokens 0) asks for."""

    tokens: list[Token]


# What a sequence tells its owner: PromptLogprobs first when asked, then a Token per generated token, or
# the finish reason ("stop", "length", "cancelled", or an error message) as a str, which is always the
# last event.
Event = PromptLogprobs | Token | str


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    sampling: Sampling
    emit: Callable[[Event], None]
    stop_ids: frozenset[int] = frozenset()
    adapter: int = -1  # index in the engine's AdapterSet; -1: the base model
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    slot: int = -1
    generated: int = 0
    last: int = 0  # the token fed to the next step
    generator: torch.Generator | None = None
    constraint: Constraint | None = None  # structured output: the grammar that masks each step's logits
    cached: int = 0  # prompt tokens whose keys and values came from the prefix cache

    def cancel(self) -> None:
        """Thread-safe: the engine frees the slot before its next step."""
        self.cancelled = True


PREFILL_TOKENS = 2048  # padded prompt tokens one admitting forward takes at most


class Engine:
    def __init__(
        self,
        model: Transformer,
        max_batch: int = 16,
        max_queue: int = 64,
        context: int | None = None,
        adapters=None,
        on_finish: Callable[[Sequence, str], None] | None = None,
        cache_start: int = 32,  # tokens per slot at first: a slot grows (doubling) as its sequence does
        prefix_cache_bytes: int = 64 << 20,  # shared prompt prefixes kept this long at most; 0: none
    ) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.context = min(context or model.args.max_seq_len, model.args.max_seq_len)
        self.max_batch, self.max_queue = max_batch, max_queue
        stored = stored_dtype(model)
        self.cache = SlotCache(model.args, max_batch, self.context, self.device, stored, initial=cache_start)
        self.token_bytes = SlotCache.bytes_per_token(model.args, stored)
        self.prefix = PrefixCache(self.cache, prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.adapters, self.on_finish = adapters, on_finish
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self.wake = threading.Condition()
        self.steps = itertools.count()
        self._stop = False
        self.thread = threading.Thread(target=self._loop, name="lmkiln-engine", daemon=True)
        self.thread.start()

    def submit(self, seq: Sequence) -> None:
        with self.wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max-queue {self.max_queue})")
            self.waiting.append(seq)
            self.wake.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def batch_size(self) -> int:
        return len(self.running)

    def close(self) -> None:
        with self.wake:
            self._stop = True
            self.wake.notify()
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self.wake:
                if (
                    not self._stop
                    and not self.waiting
                    and not self.running
                    and self.cache.capacity > self.cache.initial
                ):
                    self.cache.release()  # idle: the cache returns to its initial size, and its pages to the OS
                while not self._stop and not self.waiting and not self.running:
                    self.wake.wait()
                if self._stop:
                    return
            try:
                with torch.no_grad():
                    self._admit()
                    if self.running:
                        self._decode()
            except Exception as exc:  # a bug must not leave clients waiting forever
                with self.wake:  # taken under the lock: a request submitted meanwhile is not dropped unanswered
                    waiting = list(self.waiting)
                    self.waiting.clear()
                for seq in list(self.running.values()) + waiting:
                    self._finish(seq, f"error: {exc}")

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.slot >= 0:
            self.running.pop(seq.slot, None)
            seq.slot = -1
        seq.emit(reason)
        if self.on_finish is not None:
            self.on_finish(seq, reason)

    def _admit(self) -> None:
        """Prefill waiting sequences into free slots: those that want only a reply together, in one
        forward (`_prefill`); one that scores its prompt (prompt_logprobs) on its own."""
        for seq in [s for s in self.running.values() if s.cancelled]:
            self._finish(seq, "cancelled")
        fresh: list[Sequence] = []
        while self.waiting and len(self.running) < self.max_batch:
            with self.wake:
                seq = self.waiting.popleft()
            if seq.cancelled:
                seq.emit("cancelled")
                continue
            seq.slot = next(s for s in range(self.max_batch) if s not in self.running)
            self.running[seq.slot] = seq
            if seq.sampling.seed is not None:
                seq.generator = torch.Generator(device=self.device).manual_seed(seq.sampling.seed)
            self.cache.lengths[seq.slot] = 0
            if not seq.sampling.prompt_logprobs:
                if self.prefix is not None:
                    seq.cached = self.cache.lengths[seq.slot] = self.prefix.restore(seq.slot, seq.prompt, seq.adapter)
                fresh.append(seq)
                continue
            logits = self._forward([seq], [seq.prompt])[0]
            seq.emit(PromptLogprobs(self._scored(logits[:-1], seq.prompt[1:], seq.sampling.logprobs or 0)))
            if seq.sampling.max_tokens == 0:  # scoring only
                self._finish(seq, "length")
            else:
                self._sample(seq, logits[-1].float())
        fresh.sort(key=lambda q: len(q.prompt) - q.cached, reverse=True)
        while fresh:  # groups of about PREFILL_TOKENS padded tokens, longest first, each row within the context
            longest = len(fresh[0].prompt) - fresh[0].cached
            take = 1
            while (
                take < len(fresh)
                and (take + 1) * longest <= PREFILL_TOKENS
                and fresh[take].cached + longest <= self.context
            ):
                take += 1
            self._prefill(fresh[:take])
            fresh = fresh[take:]

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Prompts, past their cached prefixes, into their slots in one forward, right-padded to the
        longest: each row attends only to its own slot up to its own position, so the padding's keys are
        never seen (each is overwritten by the row's own next token first); the head runs at each
        prompt's last token alone. Their full blocks then go to the prefix cache."""
        rests = [s.prompt[s.cached :] for s in seqs]
        longest = max(len(r) for r in rests)
        tokens = [r + [r[-1]] * (longest - len(r)) for r in rests]
        hidden = self._forward(seqs, tokens, hidden_only=True)
        last = hidden[torch.arange(len(seqs)), torch.tensor([len(r) - 1 for r in rests])]
        logits = self.model.lm_head(last[:, None])[:, 0].float()
        for seq, row in zip(seqs, logits):
            self.cache.lengths[seq.slot] = len(seq.prompt)  # not the padded length the forward advanced by
            if self.prefix is not None:
                self.prefix.store(seq.slot, seq.prompt, seq.adapter)
            self._sample(seq, row)

    @staticmethod
    def _scored(logits: torch.Tensor, ids: list[int], top: int) -> list[Token]:
        """Each of `ids` with its logprob under the logits before it, and the `top` most likely there."""
        logp = torch.log_softmax(logits.float(), -1)
        chosen = logp.gather(1, torch.tensor(ids, dtype=torch.long, device=logp.device)[:, None])[:, 0].tolist()
        tops = logp.topk(top) if top > 0 else None
        return [
            Token(i, lp, list(zip(tops.indices[k].tolist(), tops.values[k].tolist())) if tops is not None else None)
            for k, (i, lp) in enumerate(zip(ids, chosen))
        ]

    def _forward(self, seqs: list[Sequence], tokens: list[list[int]], hidden_only: bool = False) -> torch.Tensor:
        self.cache.rows = [s.slot for s in seqs]
        self.cache.reserve(max(self.cache.lengths[s.slot] + len(t) for s, t in zip(seqs, tokens)))
        if self.adapters is not None:
            self.adapters.select([s.adapter for s in seqs])
        x = torch.tensor(tokens, device=self.device)
        out = self.model(x, cache=self.cache, hidden_only=hidden_only)
        if x.shape[1] > 1:  # a prefill: glibc keeps its freed activations' pages, to count again at the next peak
            release_freed_memory()
        return out

    def _decode(self) -> None:
        seqs = [self.running[slot] for slot in sorted(self.running)]  # slot order: the cache is read as a view
        logits = self._forward(seqs, [[s.last] for s in seqs])[:, -1].float()
        next(self.steps)
        for seq, row in zip(seqs, logits):
            self._sample(seq, row)

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Pick the next token from the sequence's logits, tell the owner, and retire it when done."""
        if seq.cancelled:
            return self._finish(seq, "cancelled")
        p = seq.sampling
        allowed = logits if seq.constraint is None else seq.constraint.mask(logits)
        token = sample_next(allowed, p.temperature, p.top_k, p.top_p, seq.generator)
        if token in seq.stop_ids:
            return self._finish(seq, "stop")
        event = Token(token)
        if p.logprobs is not None:
            logp = torch.log_softmax(logits, -1)
            event.logprob = float(logp[token])
            if p.logprobs > 0:
                values, ids = logp.topk(p.logprobs)
                event.top = list(zip(ids.tolist(), values.tolist()))
        seq.generated += 1
        seq.last = token
        seq.emit(event)
        if seq.constraint is not None:
            try:
                complete = seq.constraint.consume(token)
            except RuntimeError as exc:  # this sequence's grammar failed: it alone ends, with the reason
                return self._finish(seq, f"error: {exc}")
            if complete:
                return self._finish(seq, "stop")  # the grammar is complete: nothing may follow
        length = self.cache.lengths[seq.slot] + 1  # with this token, once it is fed back
        if seq.generated >= p.max_tokens or length >= self.context:
            self._finish(seq, "length")
