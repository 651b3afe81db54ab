"""Generation with a KV cache: greedy or sampled (temperature, top-k, top-p), streaming token by token."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import torch

from lmkiln.errors import UserError
from lmkiln.log import console
from lmkiln.model.families.transformer import Transformer
from lmkiln.model.inference.kv_cache import KVCache, SlotCache, StaticKVCache, stored_dtype
from lmkiln.model.linear import row_blocks_pay

# inductor's C++ wrapper around the kernels, and every intermediate stored rather than recomputed where
# it is read: otherwise a norm feeding an int8 product (a sum over the input: model/quant.py) is inlined
# into that loop and recomputed for each of its rows, 3x slower (measured: 4.46 ms against 1.92 ms for 30
# 3072x576 products); at one row the intermediates are a few KB
CPU_COMPILE = {"cpp_wrapper": True, "realize_reads_threshold": 1, "realize_opcount_threshold": 1}


def _decode_step(model: Transformer) -> torch.nn.Module:
    """The model compiled for one-token steps over a StaticKVCache: compiled on first use (a minute or
    two on 2 CPU cores; PyTorch's on-disk inductor cache makes later processes' compiles seconds), then
    one call per token with no Python in between: on CPU the wrapper around the kernels is C++ as well
    (inductor's cpp_wrapper), which is where eager decoding of a small model spends most of its time.
    Kept on the model itself, outside its submodules (so not in its state_dict), and so never confused
    with another model's."""
    if "_decode_step" not in model.__dict__:
        row_blocks_pay()  # measured eagerly: the compiled graph reads the answer
        options = CPU_COMPILE if next(model.parameters()).is_cpu else {}
        object.__setattr__(model, "_decode_step", torch.compile(model, fullgraph=True, dynamic=False, options=options))
    return model.__dict__["_decode_step"]


# --max-tokens from which `kiln generate` compiles by default: a compile from PyTorch's disk cache takes
# 7-9 s on 2 cores (the first ever, 1-2 minutes), and compiled steps save 8-13 ms a token on SmolLM2
# (bench/decode_vs_llamacpp.py, eager against compiled at each precision), so from here it pays in one run
COMPILE_PAYS_TOKENS = 1024


def cache_bucket(tokens: int, limit: int) -> int:
    """The static cache length for `tokens`: a power of two from 256 up (at most the context), so a
    compiled step serves every request of its bucket and attends over at most twice what it needs."""
    return min(limit, max(256, 1 << (tokens - 1).bit_length()))


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # Keep the smallest set whose mass reaches top_p (the first token always stays).
        drop = sorted_p.cumsum(0) - sorted_p >= top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    # one uniform draw through the cumulative distribution (the first token whose running mass exceeds
    # it: never one of mass 0): the same distribution as torch.multinomial, which on CPU takes ~1.2 ms
    # over a 50k vocabulary (it draws a number per token), this ~50 us
    cdf = probs.cumsum(0)
    u = torch.rand(1, generator=generator, device=probs.device) * cdf[-1]
    return min(int(torch.searchsorted(cdf, u, right=True)), probs.numel() - 1)


@torch.no_grad()
def stream(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: list[int] | None = None,
    seed: int | None = None,
    compile: bool = False,
) -> Iterator[int]:
    """Yield new token ids one at a time; stops at a stop id (not yielded) or the length limits.
    `compile`: decode steps run the compiled model over a whole-context static cache (same tokens)."""
    model.eval()
    device = next(model.parameters()).device
    limit = model.args.max_seq_len
    prompt = prompt[-limit:]
    max_new_tokens = min(max_new_tokens, limit - len(prompt))
    if max_new_tokens <= 0:
        return
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    dtype = next(model.parameters()).dtype  # fp32 for a quantized model too (its norms)
    compiling = False  # this call's first step compiles: it is timed and reported
    if compile:  # one cache length per bucket, so the step compiles once per bucket and model
        length = cache_bucket(len(prompt) + max_new_tokens, limit)
        buckets = model.__dict__.setdefault("_compiled_buckets", set())
        compiling = length not in buckets
        buckets.add(length)
        cache, step = StaticKVCache(model.args, 1, length, device, dtype), _decode_step(model)
    else:
        cache, step = KVCache(model.args, 1, len(prompt) + max_new_tokens, device, dtype), model
    logits = model(torch.tensor([prompt], device=device), cache=cache, last_only=True)[0, -1]
    stops = set(stop_ids or [])
    for i in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if token in stops:
            return
        yield token
        if i + 1 < max_new_tokens:
            start = time.perf_counter()
            logits = step(torch.tensor([[token]], device=device), cache=cache)[0, -1]
            if compiling:
                console.print(
                    f"compiled the decode step for up to {length} tokens in {time.perf_counter() - start:.1f} s "
                    "(PyTorch keeps it on disk: the next run's compile takes seconds)"
                )
                compiling = False


class TextStream:
    """Generated token ids to text as it grows, whole UTF-8 characters at a time: a byte-level token can
    end inside a character, and its half would print as U+FFFD."""

    def __init__(self, tok) -> None:
        self.tok, self.ids, self.shown = tok, [], ""

    def push(self, token: int) -> str:
        """Add a token; the new text it completes ('' while a character is unfinished)."""
        self.ids.append(token)
        decoded = self.tok.decode(self.ids)
        if decoded.endswith("\ufffd"):
            return ""
        delta, self.shown = decoded[len(self.shown) :], decoded
        return delta

    @property
    def text(self) -> str:
        return self.tok.decode(self.ids)


def generate(model: Transformer, prompt: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    return list(stream(model, prompt, max_new_tokens, **kwargs))


def generate_greedy_batch(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: list[int] | None = None,
    batch: int = 16,
) -> list[list[int]]:
    """Greedy continuations of many prompts, `batch` decoded together: the same tokens as `generate` one
    at a time (sample_batch at temperature 0)."""
    return sample_batch(model, prompts, max_new_tokens, stop_ids, temperature=0.0, batch=batch)


@torch.no_grad()
def sample_batch(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: list[int] | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    copies: int = 1,
    batch: int = 16,
    keep_stop: bool = False,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """`copies` continuations of each prompt (prompt-major: prompt 0's copies first), about `batch`
    sequences decoded together (one read of the weights serves them all). Each prompt is prefilled once
    into a slot of a SlotCache and its keys and values copied into its other copies' slots; then every
    unfinished slot takes a step at once, each sampled on its own. With `keep_stop`, a continuation
    ends with the stop token that ended it (what GRPO trains the model to emit)."""
    training = model.training
    model.eval()
    limit, per = model.args.max_seq_len, max(1, batch // copies)
    sampling = (temperature, top_k, top_p, generator)
    out: list[list[int]] = []
    for b in range(0, len(prompts), per):
        group = [p[-limit:] for p in prompts[b : b + per]]
        out += _sample_group(model, group, max_new_tokens, copies, set(stop_ids or []), keep_stop, sampling)
    model.train(training)
    return out


def _sample_group(
    model: Transformer,
    group: list[list[int]],
    max_new_tokens: int,
    copies: int,
    stops: set[int],
    keep_stop: bool,
    sampling: tuple,
) -> list[list[int]]:
    """sample_batch's continuations of one group of prompts, decoded together in one SlotCache."""
    device = next(model.parameters()).device
    budget = [min(max_new_tokens, model.args.max_seq_len - len(p)) for p in group for _ in range(copies)]
    size = max(len(group[s // copies]) + budget[s] for s in range(len(budget)))
    cache = SlotCache(model.args, len(budget), size, device, stored_dtype(model), initial=size)
    out: list[list[int]] = [[] for _ in budget]
    last: dict[int, int] = {}

    def take(slot: int, logits: torch.Tensor) -> None:
        token = sample_next(logits, *sampling)
        if token not in stops or keep_stop:
            out[slot].append(token)
        if token not in stops and len(out[slot]) < budget[slot]:
            last[slot] = token

    for j, prompt in enumerate(group):
        first = j * copies
        if budget[first] <= 0:
            continue
        cache.rows = [first]
        logits = model(torch.tensor([prompt], device=device), cache=cache, last_only=True)[0, -1]
        for layer in range(len(cache.k)):  # the prompt's keys and values, computed once, in every copy
            cache.k[layer][first + 1 : first + copies, :, : len(prompt)] = cache.k[layer][first, :, : len(prompt)]
            cache.v[layer][first + 1 : first + copies, :, : len(prompt)] = cache.v[layer][first, :, : len(prompt)]
        for slot in range(first, first + copies):
            cache.lengths[slot] = len(prompt)
            take(slot, logits)
    while last:
        live = sorted(last)
        cache.rows = live
        tokens = torch.tensor([[last.pop(s)] for s in live], device=device)
        for s, row in zip(live, model(tokens, cache=cache)[:, -1]):
            take(s, row)
    return out


def check_sampling(temperature: float, top_p: float, max_tokens: int, top_k: int = 0) -> None:
    """Sampling settings (of `kiln generate` and `kiln chat`), before any model loads."""
    if temperature < 0:
        raise UserError(f"--temperature {temperature}: expected 0 (greedy) or more")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p {top_p}: expected a probability mass above 0 and at most 1")
    if top_k < 0:
        raise UserError(f"--top-k {top_k}: expected 0 (all tokens) or more")
    if max_tokens < 1:
        raise UserError(f"--max-tokens {max_tokens}: expected 1 or more")


def print_continuation(
    model_dir: Path,
    prompt: str,
    chat: bool = False,
    max_tokens: int = 128,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 0.95,
    seed: int | None = None,
    device: str = "auto",
    compile: bool | None = None,
    out: TextIO | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
) -> None:
    """`kiln generate`: stream a continuation of `prompt` (with `chat`, a reply to it as a user turn in
    the model's own template) to `out` as it is decoded, stopping at the model's stop ids. `compile`
    None: compiled when `max_tokens` reaches COMPILE_PAYS_TOKENS. An encoder-decoder (T5) writes its
    output for the prompt as its input, by greedy, sampling or beam search."""
    from lmkiln.device import pick_device
    from lmkiln.model.inference.load import check_model_dir, load_for_inference
    from lmkiln.model.io.hub import family_of_dir

    out = out or sys.stdout  # looked up at call time: a caller may have replaced it
    check_sampling(temperature, top_p, max_tokens, top_k)
    check_model_dir(model_dir)
    if num_beams < 1:
        raise UserError(f"--num-beams {num_beams}: expected 1 or more")
    if family_of_dir(Path(model_dir)).is_seq2seq:
        from lmkiln.model.inference.t5_generate import print_output

        text = f"user: {prompt}" if chat else prompt
        seed_gen = torch.Generator().manual_seed(seed) if seed is not None else None
        sampling = dict(temperature=temperature, top_p=top_p, generator=seed_gen)
        print_output(model_dir, text, max_tokens, num_beams, length_penalty, sampling, pick_device(device), out)
        return
    if num_beams > 1:
        raise UserError("--num-beams: beam search runs on encoder-decoders (T5); a decoder samples or decodes greedily")
    if compile is None:
        compile = max_tokens >= COMPILE_PAYS_TOKENS
        if compile:
            console.print(
                f"--max-tokens {max_tokens}: compiling the decode step, which pays for replies of "
                f"{COMPILE_PAYS_TOKENS} tokens or more (--no-compile decodes eagerly)"
            )
    lm = load_for_inference(model_dir, pick_device(device))
    text = lm.chat.render([{"role": "user", "content": prompt}], add_generation_prompt=True) if chat else prompt
    ids = lm.tok.encode(text, add_special_tokens=False).ids
    pieces = TextStream(lm.tok)
    if not chat:
        out.write(prompt)
    for token in stream(
        lm.model,
        ids,
        max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_ids=sorted(lm.chat.stop_ids),
        seed=seed,
        compile=compile,
    ):
        out.write(pieces.push(token))
        out.flush()
    out.write("\n")
