"""Continuous batching: sequences that join and leave a running batch give the greedy tokens of
one-at-a-time generation; a client that hangs up frees its slot; LoRA adapters by name, mixed in one
batch, give what their merged models give."""

import asyncio
import queue
import time

import httpx
import openai
import pytest
import torch

from lmkiln.model.convert.export import merged_adapter
from lmkiln.model.inference.generate import generate
from lmkiln.model.io.hub import load_model
from lmkiln.model.lora import apply_lora, save_adapter
from lmkiln.serve.app import create_app
from lmkiln.serve.batching import Engine, Sampling, Sequence, Token
from lmkiln.tokenizer.train import load_tokenizer
from tests.serve.conftest import serving

PROMPTS = [
    "def add(a, b):",
    "import os\n",
    "class Config:\n    def __init__(self",
    "x = [",
    "# read the file\nwith open(",
]


def _run(
    engine: Engine, prompt: list[int], max_tokens: int, adapter: int = -1, logprobs: int | None = None
) -> tuple[queue.Queue, Sequence]:
    events: queue.Queue = queue.Queue()
    seq = Sequence(
        prompt, Sampling(max_tokens=max_tokens, temperature=0, logprobs=logprobs), events.put, adapter=adapter
    )
    engine.submit(seq)
    return events, seq


def _events(events: queue.Queue) -> tuple[list[Token], str]:
    """The tokens a sequence produced, and how it ended."""
    out = []
    while True:
        event = events.get(timeout=60)
        if not isinstance(event, Token):
            return out, event
        out.append(event)


def _tokens(events: queue.Queue) -> tuple[list[int], str]:
    tokens, end = _events(events)
    return [t.id for t in tokens], end


def test_batched_greedy_equals_one_at_a_time(tiny_model):
    model, tok = load_model(tiny_model), load_tokenizer(tiny_model)
    prompts = [tok.encode(p, add_special_tokens=False).ids for p in PROMPTS]
    lengths = [5, 17, 9, 24, 12]  # sequences leave at different steps while others wait to join
    alone = [generate(model, p, n) for p, n in zip(prompts, lengths)]
    engine = Engine(model, max_batch=3, max_queue=8)
    try:
        runs = [_run(engine, p, n) for p, n in zip(prompts, lengths)]
        got = [_tokens(events) for events, _ in runs]
    finally:
        engine.close()
    assert [g[0] for g in got] == alone
    assert [g[1] for g in got] == ["length"] * 5
    assert next(engine.steps) < sum(lengths)  # decode steps were shared


def test_prompts_admitted_together_padded_to_the_longest_decode_as_alone(tiny_model):
    """Waiting prompts of different lengths are prefilled in one forward (right-padded): each row's
    greedy tokens equal its own generation, and its cache length is its prompt's, not the padded one."""
    model, tok = load_model(tiny_model), load_tokenizer(tiny_model)
    prompts = [tok.encode(p, add_special_tokens=False).ids for p in PROMPTS[:4]]
    assert len({len(p) for p in prompts}) > 1
    engine = Engine(model, max_batch=4)
    engine.close()  # its loop stopped: this test steps the engine itself
    queues = [queue.Queue() for _ in prompts]
    seqs = [Sequence(p, Sampling(max_tokens=8, temperature=0), q.put) for p, q in zip(prompts, queues)]
    engine.waiting.extend(seqs)
    with torch.no_grad():
        engine._admit()
        assert [engine.cache.lengths[s.slot] for s in seqs] == [len(p) for p in prompts]
        while engine.running:
            engine._decode()
    assert [_tokens(q)[0] for q in queues] == [generate(model, p, 8) for p in prompts]


def test_concurrent_http_requests_equal_sequential_ones(tiny_model):
    app = create_app(tiny_model, device="cpu", name="tiny", max_batch=4)
    with serving(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        sequential = [
            client.completions.create(model="tiny", prompt=p, max_tokens=10 + i, temperature=0).choices[0].text
            for i, p in enumerate(PROMPTS)
        ]

        async def together():
            aclient = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            outs = await asyncio.gather(
                *[
                    aclient.completions.create(model="tiny", prompt=p, max_tokens=10 + i, temperature=0)
                    for i, p in enumerate(PROMPTS)
                ]
            )
            return [o.choices[0].text for o in outs]

        assert asyncio.run(together()) == sequential


def test_a_client_that_hangs_up_frees_its_slot(tiny_model):
    app = create_app(tiny_model, device="cpu", name="tiny", max_batch=2, context=128)
    engine = app.state.server.engine
    with serving(app) as url:
        with httpx.stream(
            "POST",
            url + "/v1/completions",
            json={"prompt": "def", "max_tokens": 100000, "stream": True, "temperature": 1.0},
        ) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")
            assert engine.batch_size == 1
        deadline = time.time() + 10
        while engine.batch_size and time.time() < deadline:
            time.sleep(0.02)
        assert engine.batch_size == 0
        metrics = httpx.get(url + "/metrics").text
        assert (
            'lmkiln_sequences_finished_total{reason="cancelled"} 1.0' in metrics
            or 'lmkiln_sequences_finished_total{reason="length"} 1.0' in metrics
        )  # 128 tokens of context may run out first


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    """A LoRA adapter with non-zero B on the tiny model, in PEFT's layout."""
    out = tmp_path_factory.mktemp("adapter")
    model = load_model(tiny_model)
    apply_lora(model, ["q_proj", "v_proj", "down_proj"], 4, 8.0, 0.0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 2.0)
    save_adapter(model, out, str(tiny_model), 4, 8.0, 0.0, ["q_proj", "v_proj", "down_proj"])
    return out


def test_adapters_by_name_in_one_batch_equal_their_merged_models(tiny_model, adapter):
    tok = load_tokenizer(tiny_model)
    merged, _ = merged_adapter(adapter, tiny_model)
    base = load_model(tiny_model)
    prompt = tok.encode(PROMPTS[0], add_special_tokens=False).ids
    want_adapter, want_base = generate(merged, prompt, 12), generate(base, prompt, 12)
    with torch.no_grad():  # the adapter changes the model (its greedy tokens may still agree on a tiny model)
        assert (merged(torch.tensor([prompt])) - base(torch.tensor([prompt]))).abs().max() > 1e-2
    app = create_app(tiny_model, device="cpu", name="tiny", adapters={"sounds": adapter}, max_batch=4)
    engine = app.state.server.engine
    runs = [_run(engine, prompt, 12, adapter=a, logprobs=0) for a in (0, -1, 0, -1)]  # mixed rows in one batch
    events = [_events(q)[0] for q, _ in runs]
    assert [[e.id for e in ev] for ev in events] == [want_adapter, want_base, want_adapter, want_base]
    with torch.no_grad():  # and each row's probabilities are its own model's
        for ev, reference in zip(events, (merged, base, merged, base)):
            ids = prompt + [e.id for e in ev]
            logp = torch.log_softmax(reference(torch.tensor([ids[:-1]]))[0].double(), -1)
            want = [logp[len(prompt) - 1 + k, e.id].item() for k, e in enumerate(ev)]
            assert [e.logprob for e in ev] == pytest.approx(want, abs=1e-4)
    with serving(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny", "tiny+sounds", "tiny@v1"]
        text = (
            client.completions.create(model="tiny+sounds", prompt=PROMPTS[0], max_tokens=12, temperature=0)
            .choices[0]
            .text
        )
        assert text == tok.decode(want_adapter)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="tiny+other", prompt="x")


def test_kiln_chat_keeps_the_conversation(tiny_model):
    import io

    from lmkiln.serve.terminal import chat_loop

    out = io.StringIO()
    turns = chat_loop(
        tiny_model, "cpu", temperature=0, max_tokens=8, stdin=io.StringIO("hello\nand again\n/reset\nhi\n"), stdout=out
    )
    text = out.getvalue()
    assert turns == 3 and text.count("tokens/s]") == 3 and "(new conversation)" in text


def test_engine_reports_errors_to_every_waiting_client(tiny_model):
    model = load_model(tiny_model)
    engine = Engine(model, max_batch=2)
    try:
        events, _ = _run(engine, [10**6], 4)  # a token id beyond the vocabulary
        assert _tokens(events)[1].startswith("error")
        events, _ = _run(engine, [5, 6, 7], 3)  # and the engine goes on
        assert _tokens(events)[1] == "length"
    finally:
        engine.close()


def test_kv_cache_grows_with_the_longest_sequence_and_shrinks_when_idle(tiny_model):
    model, tok = load_model(tiny_model), load_tokenizer(tiny_model)
    prompts = [tok.encode(p, add_special_tokens=False).ids for p in PROMPTS]
    short, long = (prompts[0], 6), (prompts[2], 40)  # the long one outgrows a 16-token cache twice over
    alone = [generate(model, p, n) for p, n in (short, long)]
    engine = Engine(model, max_batch=2, max_queue=4, cache_start=16)
    per_slot = engine.token_bytes * 2  # two slots
    assert engine.cache.capacity == 16 and engine.cache.nbytes == 16 * per_slot
    try:
        runs = [_run(engine, p, n) for p, n in (short, long)]
        got = [_tokens(events)[0] for events, _ in runs]
        time.sleep(0.2)  # the engine goes idle and lets the memory go
    finally:
        engine.close()
    assert got == alone  # growing the cache mid-batch changes no token
    assert len(prompts[2]) + 40 - 1 <= engine.cache.peak <= engine.context
    assert engine.cache.capacity == 16 and engine.cache.nbytes == 16 * per_slot


def test_prefix_cache_reuses_a_shared_prompt_and_replies_as_without_it(tiny_model):
    """Prompts sharing a long prefix: after the first, each restores the prefix's whole blocks from the
    cache and prefills only its own end; every reply equals plain generation (with and without the
    cache), and past its byte budget the cache evicts down to it."""
    from lmkiln.serve.prefix_cache import BLOCK

    model, tok = load_model(tiny_model), load_tokenizer(tiny_model)
    shared = tok.encode(
        "# a long shared system prompt\n" + "def f(x):\n    return x\n" * 6, add_special_tokens=False
    ).ids
    prompts = [shared + tok.encode(p, add_special_tokens=False).ids for p in PROMPTS]
    assert len(shared) > 2 * BLOCK and max(map(len, prompts)) + 10 < model.args.max_seq_len
    alone = [generate(model, p, 10) for p in prompts]
    for budget, expect_hits in ((64 << 20, True), (0, False)):
        engine = Engine(model, max_batch=2, max_queue=8, prefix_cache_bytes=budget)
        try:
            got = []
            for p in prompts:  # one after another: each finds what the ones before stored
                events, seq = _run(engine, p, 10)
                got.append(_tokens(events)[0])
                assert (seq.cached >= (len(shared) // BLOCK) * BLOCK) == (expect_hits and p is not prompts[0])
        finally:
            engine.close()
        assert got == alone
    engine = Engine(model, max_batch=2, prefix_cache_bytes=1)  # smaller than one block
    try:
        _tokens(_run(engine, prompts[0], 2)[0])
        assert engine.prefix.nbytes <= 1 and not engine.prefix.blocks
    finally:
        engine.close()
    assert engine.prefix.queried == len(prompts[0])


def test_prefix_cache_hit_rate_is_in_metrics(tiny_model):
    from lmkiln.serve.prefix_cache import BLOCK

    app = create_app(tiny_model, device="cpu", name="tiny", max_batch=2)
    prompt = "# shared\n" + "x = 1\n" * 20
    with serving(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        for _ in range(3):
            n = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0).usage.prompt_tokens
        text = httpx.get(url + "/metrics").text
    gauges = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("lmkiln_prefix")}
    whole = (n - 1) // BLOCK * BLOCK  # the whole blocks before the last token, found by the second and third
    hit, queried = gauges["lmkiln_prefix_cache_hit_tokens"], gauges["lmkiln_prefix_cache_queried_tokens"]
    assert hit == 2 * whole and queried >= 3 * n  # (and the load's warm-up request)
    assert gauges["lmkiln_prefix_cache_hit_rate"] == pytest.approx(hit / queried)
