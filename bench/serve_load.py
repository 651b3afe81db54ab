"""Serving under load, and single-stream decode speed against transformers, in one run.

1. Decode: the same model directory, greedy, batch 1, `--decode-tokens` new tokens from the same prompt:
   lmkiln's KV-cache `generate`, eager and with `compile=True` (compiled in the warm-up), against
   transformers' `generate` (best of 3 each after a warm-up; the tokens must agree).
2. Load: `kiln serve` in its own process on loopback, driven by the official `openai` client (async) at
   1, 4 and 16 concurrent streams, `--requests-per-stream` streamed requests per stream of `--max-tokens`
   tokens each. Prints time to first token p50/p95, aggregate tokens/s, errors and lost requests (a
   request lost is one that neither finished nor failed), and the 16-stream / 1-stream throughput ratio.
3. `--swap` (instead of 1 and 2): 16 streams, twice: once as they are, once with a new model version
   loaded through `POST /admin/models` when half the requests are done. Prints errors, lost requests,
   replies that mix versions (each chunk names the version that wrote it), the replies of each version,
   and the swapped run's throughput and TTFT p95 against the plain run's (a ratio).

4. `--shared-prefix N` (instead of 1 and 2): time to first token for chat requests that share an N-token
   system prompt, each with its own question, on two servers side by side: one with the prefix cache
   (the default) and one with `--prefix-cache-mb 0`, requests interleaved one at a time. Prints TTFT
   p50 of each, the server's prefix-cache hit rate from /metrics, and last `prefix_ttft_ratio=R`
   (without / with).

The model is a random-init Llama of the reference shape in shared/DEPENDENCY-NOTES.md (16.9M
parameters: vocab 8192, hidden 384, intermediate 1024, 6 layers, 6 heads) with a BPE tokenizer
trained on the Bitext sample, unless --model names a directory.

    python bench/serve_load.py            # about 3 minutes on 2 cores
    python bench/serve_load.py --swap --requests-per-stream 8   # about 30 seconds
    python bench/serve_load.py --shared-prefix 512 --model DIR   # about a minute on SmolLM2-135M
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import csv
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = (
    ROOT.parent / "shared" / "data" / "bitext-customer-support" / "Bitext_Sample_Customer_Support_Training_Dataset.csv"
)
SHAPE = dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_layers=6, num_heads=6, num_kv_heads=6)
WEIGHT_MB = 0.0
KEY = "bench-key"
PROMPT = "I want to cancel my order and get a refund, how do I do that?"


def make_model(out: Path, seed: int = 0) -> Path:
    import torch

    from lmkiln.model.families.transformer import ModelArgs, Transformer
    from lmkiln.model.io.checks import consistency_checks
    from lmkiln.model.io.hub import save_model
    from lmkiln.tokenizer.train import save_tokenizer, train_bpe

    with open(DATA, newline="") as fh:
        rows = list(csv.DictReader(fh))
    tok = train_bpe((r["instruction"] + "\n" + r["response"] for r in rows), SHAPE["vocab_size"])
    args = ModelArgs(
        max_seq_len=1024,
        tie_embeddings=True,
        bos_token_id=tok.token_to_id("<|bos|>"),
        eos_token_id=tok.token_to_id("<|eos|>"),
        pad_token_id=tok.token_to_id("<|pad|>"),
        **SHAPE,
    )
    model = Transformer(args)
    model.init_weights(torch.Generator().manual_seed(seed))
    save_tokenizer(tok, out)
    save_model(model, out)
    consistency_checks(out, fix=True)  # the end-of-turn token a stop id, as kiln finetune leaves a model
    return out


def decode_speed(model_dir: Path, n: int, hf_static: bool = False) -> tuple[float, float, float, bool]:
    """(lmkiln eager tokens/s, lmkiln compiled tokens/s, transformers tokens/s, same tokens all three).
    `hf_static`: transformers with its own fast path, a static cache and its forward compiled."""
    import torch
    import transformers

    from lmkiln.model.inference.generate import generate
    from lmkiln.model.io.hub import load_model
    from lmkiln.tokenizer.train import load_tokenizer

    tok = load_tokenizer(model_dir)
    prompt = tok.encode(PROMPT, add_special_tokens=False).ids
    ours = load_model(model_dir)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()

    def best(fn) -> tuple[float, list[int]]:
        fn()  # warm-up
        times, out = [], None
        for _ in range(3):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        return n / min(times), out

    # Batch-1 decode reads every weight once per token: bytes/token x tokens/s is the memory bandwidth used.
    global WEIGHT_MB
    WEIGHT_MB = sum(p.numel() * p.element_size() for p in ours.parameters()) / 1e6
    ours_tps, ours_ids = best(lambda: generate(ours, prompt, n))
    compiled_tps, compiled_ids = best(lambda: generate(ours, prompt, n, compile=True))  # warm-up compiles
    ids = torch.tensor([prompt])
    extra = {"cache_implementation": "static"} if hf_static else {}
    if hf_static:
        theirs.forward = torch.compile(theirs.forward, fullgraph=True)
    with torch.no_grad():
        hf_tps, hf_out = best(
            lambda: theirs.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **extra)[
                0, len(prompt) :
            ].tolist()
        )
    return ours_tps, compiled_tps, hf_tps, ours_ids == compiled_ids == hf_out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_request(client, max_tokens: int) -> tuple[float | None, int, str | None, set[str]]:
    """(time to first token, completion tokens, error, the models its chunks name: one version each)."""
    began, first, tokens, finished, models = time.perf_counter(), None, 0, False, set()
    try:
        stream = await client.chat.completions.create(
            model="bench",
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=max_tokens,
            temperature=0.8,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},  # every reply max_tokens long: the runs compare like for like
        )
        async for chunk in stream:
            models.add(chunk.model)
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter() - began
            if chunk.choices and chunk.choices[0].finish_reason:
                finished = True
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
    except Exception as exc:  # counted, not raised: the table reports errors
        return None, 0, f"{type(exc).__name__}: {exc}", models
    return first, tokens, None if finished else "lost: no finish_reason", models


async def load_level(url: str, streams: int, per_stream: int, max_tokens: int, swap_to: Path | None = None) -> dict:
    """`streams` concurrent streams of `per_stream` requests; with `swap_to`, that model directory is
    loaded as a new version when half the requests are done."""
    import httpx
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=600)
    done, half, swap = [0], streams * per_stream // 2, {}

    async def worker() -> list:
        out = []
        for _ in range(per_stream):
            out.append(await one_request(client, max_tokens))
            done[0] += 1
        return out

    async def swapper() -> None:
        while done[0] < half:
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(timeout=600) as admin:
            t = time.perf_counter()
            r = await admin.post(
                url + "/admin/models", json={"model": str(swap_to)}, headers={"Authorization": f"Bearer {KEY}"}
            )
            swap.update(status=r.status_code, seconds=time.perf_counter() - t, reply=r.json())

    began = time.perf_counter()
    jobs = [worker() for _ in range(streams)] + ([swapper()] if swap_to else [])
    results = [r for rs in await asyncio.gather(*jobs) if rs for r in rs]
    wall = time.perf_counter() - began
    await client.close()
    ttft = sorted(r[0] for r in results if r[0] is not None)
    errors = [r[2] for r in results if r[2] and not r[2].startswith("lost")]
    lost = [r for r in results if r[2] and r[2].startswith("lost")]
    q = statistics.quantiles(ttft, n=20) if len(ttft) > 1 else ttft * 19
    versions = collections.Counter(next(iter(r[3])) for r in results if len(r[3]) == 1)
    return {
        "streams": streams,
        "requests": len(results),
        "tokens": sum(r[1] for r in results),
        "wall": wall,
        "ttft_p50": statistics.median(ttft) if ttft else float("nan"),
        "ttft_p95": q[18] if q else float("nan"),
        "errors": len(errors),
        "lost": len(lost),
        "mixed": sum(len(r[3]) > 1 for r in results),
        "versions": dict(sorted(versions.items())),
        "swap": swap,
        "first_error": errors[0] if errors else None,
    }


def server_memory_mb(pid: int) -> dict[str, float]:
    """The server process's resident memory now (VmRSS) and at its peak (VmHWM), from /proc (Linux)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {"VmRSS": float("nan"), "VmHWM": float("nan")}
    return {ln.split(":")[0]: int(ln.split()[1]) / 1024 for ln in lines if ln.startswith(("VmRSS", "VmHWM"))}


def start_server(model_dir: Path, port: int, extra: list[str] = ()) -> subprocess.Popen:
    """`kiln serve` in its own process, healthy (or SystemExit with its stderr)."""
    import httpx

    cmd = [sys.executable, "-m", "lmkiln", "serve", str(model_dir), "--name", "bench", "--port", str(port)]
    cmd += ["--device", "cpu", "--max-batch", "16", "--max-queue", "256", "--api-key", KEY, *extra]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.time() > deadline or server.poll() is not None:
            server.kill()
            raise SystemExit(f"the server did not start: {server.stderr.read().decode()[-2000:]}")
        time.sleep(0.2)


def swap_bench(model_dir: Path, second: Path, per_stream: int, max_tokens: int) -> None:
    """16 streams without a swap, then 16 streams with one, each on a fresh server."""
    runs = {}
    for label, swap_to in (("plain", None), ("swap", second)):
        port = free_port()
        server = start_server(model_dir, port)
        try:
            runs[label] = asyncio.run(load_level(f"http://127.0.0.1:{port}", 16, per_stream, max_tokens, swap_to))
        finally:
            server.terminate()
            server.wait(timeout=30)
    plain, swapped = runs["plain"], runs["swap"]
    print(
        f"swap under load: 16 streams x {per_stream} streamed chat requests of {max_tokens} tokens, kiln serve on CPU"
    )
    for label, r in runs.items():
        print(
            f"  {label:>5}: {r['requests']} requests, {r['errors']} errors, {r['lost']} lost, {r['mixed']} replies "
            f"mixing versions; replies per version {r['versions']}; {r['tokens'] / r['wall']:.1f} tok/s, "
            f"TTFT p95 {r['ttft_p95'] * 1000:.0f} ms"
        )
        if r["first_error"]:
            print(f"    first error: {r['first_error']}")
    s = swapped["swap"]
    print(f"  the swap: HTTP {s.get('status')} in {s.get('seconds', float('nan')):.2f} s: {s.get('reply')}")
    print(
        f"  swapped / plain: throughput ratio={swapped['tokens'] / swapped['wall'] / (plain['tokens'] / plain['wall']):.3f}, "
        f"TTFT p95 ratio {swapped['ttft_p95'] / plain['ttft_p95']:.2f}"
    )


def shared_prompt(model_dir: Path, tokens: int) -> str:
    """A system prompt of `tokens` tokens of the model's tokenizer: support replies from the Bitext data."""
    from lmkiln.tokenizer.train import load_tokenizer

    tok = load_tokenizer(model_dir)
    with open(DATA, newline="") as fh:
        text = "You are a support agent. Answer as in these examples.\n" + "\n".join(
            r["response"] for _, r in zip(range(200), csv.DictReader(fh))
        )
    return tok.decode(tok.encode(text, add_special_tokens=False).ids[:tokens])


def questions(n: int) -> list[str]:
    with open(DATA, newline="") as fh:
        return [r["instruction"] for _, r in zip(range(n), csv.DictReader(fh))]


async def first_token_time(url: str, system: str, question: str) -> float:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=600)
    began = time.perf_counter()
    stream = await client.chat.completions.create(
        model="bench",
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
        max_tokens=4,
        temperature=0,
        stream=True,
    )
    first = None
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - began
    await client.close()
    return first if first is not None else time.perf_counter() - began


def prefix_bench(model_dir: Path, tokens: int, requests: int) -> None:
    """TTFT with and without the prefix cache, two servers side by side, requests interleaved."""
    import httpx

    system, asks = shared_prompt(model_dir, tokens), questions(requests)
    ports = {"cached": free_port(), "uncached": free_port()}
    servers = {
        "cached": start_server(model_dir, ports["cached"]),
        "uncached": start_server(model_dir, ports["uncached"], ["--prefix-cache-mb", "0"]),
    }
    ttft = {label: [] for label in servers}
    try:
        for port in ports.values():  # warm-up: the first request of each pays one-time costs
            asyncio.run(first_token_time(f"http://127.0.0.1:{port}", "Hello.", "Hi"))
        for ask in asks:
            for label, port in ports.items():
                ttft[label].append(asyncio.run(first_token_time(f"http://127.0.0.1:{port}", system, ask)))
        metrics = httpx.get(
            f"http://127.0.0.1:{ports['cached']}/metrics", headers={"Authorization": f"Bearer {KEY}"}
        ).text
    finally:
        for server in servers.values():
            server.terminate()
            server.wait(timeout=30)
    rate = next(float(ln.split()[1]) for ln in metrics.splitlines() if ln.startswith("lmkiln_prefix_cache_hit_rate "))
    p50 = {label: statistics.median(t) for label, t in ttft.items()}
    print(
        f"shared prefix: {requests} chat requests, one at a time, each a {tokens}-token system prompt and its own "
        f"question, interleaved between two kiln serve processes on this machine's CPU"
    )
    for label, t in ttft.items():
        print(
            f"  {label:>8}: TTFT p50 {p50[label] * 1000:,.0f} ms (first {t[0] * 1000:,.0f} ms, max {max(t) * 1000:,.0f} ms)"
        )
    print(f"  prefix cache hit rate (tokens, from /metrics): {rate:.2f}")
    print(f"prefix_ttft_ratio={p50['uncached'] / p50['cached']:.2f}")


def print_decode(model_dir: Path, args) -> None:
    ours, compiled, hf, same = decode_speed(model_dir, args.decode_tokens, args.hf_static_compile)
    print(
        f"decode, batch 1, greedy, {args.decode_tokens} tokens: lmkiln {ours:,.1f} tok/s (compiled "
        f"{compiled:,.1f}), transformers{' (static cache, compiled)' if args.hf_static_compile else ''} "
        f"{hf:,.1f} tok/s, ratio {ours / hf:.2f} (compiled {compiled / hf:.2f}); "
        f"same tokens: {same}"
    )
    print(
        f"  each token streams {WEIGHT_MB:.0f} MB of fp32 weights: lmkiln {WEIGHT_MB * ours / 1e3:.1f} GB/s "
        f"(compiled {WEIGHT_MB * compiled / 1e3:.1f}), transformers {WEIGHT_MB * hf / 1e3:.1f} GB/s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", type=Path, default=None, help="a model directory (default: the reference shape, random init)"
    )
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per request in the load test")
    ap.add_argument("--requests-per-stream", type=int, default=4)
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument(
        "--swap", action="store_true", help="instead: 16 streams with a new model version swapped in halfway"
    )
    ap.add_argument(
        "--hf-static-compile",
        action="store_true",
        help="give transformers its fast path too: static cache, forward compiled (about 45 s more)",
    )
    ap.add_argument(
        "--shared-prefix",
        type=int,
        default=0,
        metavar="N",
        help="instead: TTFT with and without the prefix cache for requests sharing an N-token system prompt",
    )
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or make_model(Path(tmp) / "model")
        if args.shared_prefix:
            return prefix_bench(model_dir, args.shared_prefix, max(8, args.requests_per_stream))
        if args.swap:
            second = make_model(Path(tmp) / "second", seed=1)  # the new version: other weights, same shape
            return swap_bench(model_dir, second, args.requests_per_stream, args.max_tokens)
        quantized = "quantization_config" in json.loads((model_dir / "config.json").read_text())
        if quantized:  # transformers cannot read it: bench/decode_vs_llamacpp.py compares its decoding
            print(f"{model_dir}: quantized; the decode comparison is bench/decode_vs_llamacpp.py's")
        else:
            print_decode(model_dir, args)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(model_dir, port)
        try:
            idle = server_memory_mb(server.pid)
            rows = [
                asyncio.run(load_level(url, int(s), args.requests_per_stream, args.max_tokens))
                for s in args.levels.split(",")
            ]
            time.sleep(1)  # the engine, idle again, gives its cache's pages back
            after = server_memory_mb(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(
        f"\nload: {args.requests_per_stream} streamed chat requests per stream, {args.max_tokens} tokens each, "
        f"kiln serve --max-batch 16 on this machine's CPU"
    )
    print(
        f"{'streams':>7} {'requests':>8} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p95':>9} "
        f"{'errors':>6} {'lost':>5}"
    )
    for r in rows:
        print(
            f"{r['streams']:>7} {r['requests']:>8} {r['tokens']:>7} {r['wall']:>8.1f} {r['tokens'] / r['wall']:>8.1f} "
            f"{r['ttft_p50'] * 1000:>7.0f}ms {r['ttft_p95'] * 1000:>7.0f}ms {r['errors']:>6} {r['lost']:>5}"
        )
        if r["first_error"]:
            print(f"  first error: {r['first_error']}")
    print(
        f"server resident memory: {idle['VmRSS']:.0f} MB loaded and idle, {after['VmRSS']:.0f} MB after the load "
        f"(its peak: {after['VmHWM']:.0f} MB)"
    )
    tps = {r["streams"]: r["tokens"] / r["wall"] for r in rows}
    if 1 in tps and max(tps) != 1:
        top = max(tps)
        print(f"aggregate tokens/s at {top} streams / 1 stream: {tps[top] / tps[1]:.2f}")


if __name__ == "__main__":
    main()
