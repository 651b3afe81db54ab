"""The OpenAI-compatible API through the official `openai` client against a server on loopback:
completions and chat, whole and streamed, sampling parameters, logprobs, stop strings, usage, and
OpenAI's error shapes and status codes."""

import json
import math
import time

import httpx
import openai
import pytest
import torch

from lmkiln.model.inference.generate import generate
from lmkiln.model.io.chat_format import ChatFormat
from lmkiln.model.io.hub import generation_eos, load_model
from lmkiln.serve.app import create_app
from lmkiln.tokenizer.train import load_tokenizer
from tests.serve.conftest import serving

PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def server(tiny_model):
    app = create_app(tiny_model, device="cpu", name="tiny", max_batch=4, max_queue=8)
    with serving(app) as url:
        yield url, openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference(tiny_model):
    model, tok = load_model(tiny_model), load_tokenizer(tiny_model)

    def greedy(text: str, n: int, stops: list[int]) -> list[int]:
        return generate(model, tok.encode(text, add_special_tokens=False).ids, n, stop_ids=stops)

    return model, tok, greedy


def test_models_lists_the_served_model_and_its_version(server):
    _, client = server
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny", "tiny@v1"]  # the name, and the version it stands for
    assert {m.version for m in models} == {"v1"} and {m.state for m in models} == {"active"}


def test_each_reply_names_the_version_that_answered(server):
    url, client = server
    raw = client.completions.with_raw_response.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0)
    assert raw.headers["x-lmkiln-version"] == "v1" and raw.parse().model == "tiny@v1"
    pinned = client.completions.create(model="tiny@v1", prompt=PROMPT, max_tokens=2, temperature=0)
    assert pinned.model == "tiny@v1"
    with pytest.raises(openai.NotFoundError, match="tiny@v9"):
        client.completions.create(model="tiny@v9", prompt=PROMPT, max_tokens=2)


def test_greedy_completion_equals_generate_with_usage(server, reference, tiny_model):
    _, client = server
    _, tok, greedy = reference
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    ids = greedy(PROMPT, 12, generation_eos(tiny_model))
    assert out.choices[0].text == tok.decode(ids)
    assert out.usage.prompt_tokens == len(tok.encode(PROMPT, add_special_tokens=False).ids)
    assert out.usage.completion_tokens == len(ids) and out.usage.total_tokens == out.usage.prompt_tokens + len(ids)
    assert out.choices[0].finish_reason == ("length" if len(ids) == 12 else "stop")


def test_streamed_completion_equals_the_whole_one(server):
    _, client = server
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0)
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason
    ]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_uses_the_chat_template_whole_and_streamed(server, reference, tiny_model):
    _, client = server
    model, tok, _ = reference
    messages = [{"role": "user", "content": "What sound does a cat make?"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    chat = ChatFormat(tiny_model)
    prompt = tok.encode(chat.render(messages, add_generation_prompt=True), add_special_tokens=False).ids
    ids = generate(model, prompt, 12, stop_ids=sorted(set(generation_eos(tiny_model)) | {chat.eos}))
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == tok.decode(ids)
    assert out.usage.prompt_tokens == len(prompt)
    streamed = list(
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True)
    )
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == out.choices[0].message.content
    assert streamed[-1].choices[0].finish_reason == out.choices[0].finish_reason


def test_n_choices_and_seeds_reproduce(server):
    _, client = server
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=8, temperature=1.0, n=3, seed=7)
    a = client.completions.create(**kw, extra_body={"top_k": 20})
    b = client.completions.create(**kw, extra_body={"top_k": 20})
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    streamed = list(client.completions.create(**kw, stream=True, extra_body={"top_k": 20}))
    texts = ["".join(c.choices[0].text for c in streamed if c.choices and c.choices[0].index == i) for i in range(3)]
    assert texts == [c.text for c in a.choices]


def test_logprobs_equal_the_model_distribution(server, reference):
    _, client = server
    model, tok, _ = reference
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == out.usage.completion_tokens and all(len(t) <= 3 for t in lp.top_logprobs)
    ids = tok.encode(PROMPT, add_special_tokens=False).ids
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids]))[0, -1].double(), -1).max().item()
    assert lp.token_logprobs[0] == pytest.approx(expected, abs=1e-4)
    assert max(lp.top_logprobs[0].values()) == pytest.approx(lp.token_logprobs[0], abs=1e-6)
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob <= 0 and not math.isnan(c.logprob) for c in content)


def test_stop_strings_cut_the_text(server):
    _, client = server
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    stop = full[3:6]
    assert stop and stop in full
    cut = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = list(
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, stop=stop, stream=True)
    )
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_bad_requests_get_openai_errors(server):
    url, client = server
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="x", max_tokens=0)
    assert err.value.status_code == 400 and err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=5)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="other", prompt="x")
    assert "not served" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:  # over the context: 400 naming the limit
        client.completions.create(model="tiny", prompt="word " * 400)
    assert "the context is" in err.value.message and err.value.body["param"] == "prompt"
    big = httpx.post(
        url + "/v1/completions",
        content=json.dumps({"prompt": "x" * (2 << 20)}),
        headers={"content-type": "application/json"},
    )
    assert big.status_code == 413 and big.json()["error"]["type"] == "invalid_request_error"


def test_health_and_metrics(server):
    url, client = server
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0)
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 4
    text = httpx.get(url + "/metrics").text
    assert 'lmkiln_requests_total{route="/v1/completions",status="200"}' in text
    assert "lmkiln_time_to_first_token_seconds_count" in text and "lmkiln_queue_depth 0.0" in text
    assert "lmkiln_completion_tokens_total" in text


def test_api_key_is_required_when_set(tiny_model):
    app = create_app(tiny_model, device="cpu", name="tiny", api_key="sekret")
    with serving(app) as url:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0).models.list()
        assert ok.data[0].id == "tiny"
        assert httpx.get(url + "/health").status_code == 200  # probes need no key


def test_full_queue_is_429_and_loading_is_503(tiny_model, monkeypatch):
    import threading

    from lmkiln.serve.app import Server

    app = create_app(tiny_model, device="cpu", name="tiny", max_batch=1, max_queue=1)
    engine = app.state.server.engine
    with serving(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        engine.max_batch = 0  # hold admissions: the first request waits in the queue
        waiting = {}
        t = threading.Thread(
            target=lambda: waiting.update(out=client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2))
        )
        t.start()
        deadline = time.time() + 30
        while engine.queue_depth == 0:
            assert time.time() < deadline, "the first request never reached the queue"
            time.sleep(0.005)
        with pytest.raises(openai.RateLimitError) as err:
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
        assert "busy" in err.value.message
        engine.max_batch = 1
        with engine.wake:
            engine.wake.notify()
        t.join(timeout=30)
        assert waiting["out"].usage.completion_tokens >= 1  # the queued request was not lost

    gate = threading.Event()
    original = Server.load
    monkeypatch.setattr(Server, "load", lambda self: (gate.wait(30), original(self)))
    app = create_app(tiny_model, device="cpu", name="tiny", background=True)
    with serving(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as err:
            client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
        assert err.value.status_code == 503 and "loading" in err.value.message
        assert httpx.get(url + "/health").status_code == 503
        gate.set()
        deadline = time.time() + 60
        while httpx.get(url + "/health").status_code != 200:
            assert time.time() < deadline, "the model never finished loading"
            time.sleep(0.05)
        assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2).usage.completion_tokens >= 1


def test_serve_refuses_bad_options_with_exit_2(tiny_model, tmp_path, capsys):
    from lmkiln.cli import main

    assert main(["serve", str(tiny_model), "--max-batch", "0"]) == 2
    assert main(["serve", str(tiny_model), "--adapter", f"a={tmp_path}"]) == 2
    assert main(["serve", str(tmp_path)]) == 2
    assert main(["serve", str(tiny_model), "--max-concurrent", "0"]) == 2
    assert main(["serve", str(tiny_model), "--prefix-cache-mb", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--max-batch 0" in err and "no adapter_config.json" in err and "not a model directory" in err
    assert "--max-concurrent 0: expected a positive number" in err and "--prefix-cache-mb -1: expected 0" in err


@pytest.mark.slow
def test_kiln_serve_command_listens_where_told_and_answers(tiny_model, tmp_path):
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as probe:  # a free port, then let go of it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmkiln", "serve", str(tiny_model), "--port", str(port), "--name", "tiny"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline, health = time.time() + 60, None
        while time.time() < deadline and proc.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()
                if health["status"] == "ok":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert health and health["status"] == "ok", proc.stderr.read() if proc.poll() is not None else health
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"] == "tiny"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert f"at http://127.0.0.1:{port}/v1" in err


def test_echo_with_logprobs_scores_the_prompt_as_the_model_does(server, reference):
    """What lm-eval's local-completions and kiln monitor's drift and ICL tasks ask of an endpoint: each
    prompt token's log-probability (max_tokens 0: nothing generated)."""
    _, client = server
    model, tok, _ = reference
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=2, temperature=0)
    ids = tok.encode(PROMPT, add_special_tokens=False).ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    got = out.choices[0].logprobs
    assert got.token_logprobs[0] is None and got.top_logprobs[0] is None
    assert got.token_logprobs[1:] == pytest.approx([float(logp[k, ids[k + 1]]) for k in range(len(ids) - 1)], abs=1e-4)
    assert all(1 <= len(top) <= 2 for top in got.top_logprobs[1:])  # two ids may decode alike
    assert "".join(got.tokens) == PROMPT == out.choices[0].text and out.usage.completion_tokens == 0
    with pytest.raises(openai.BadRequestError, match="needs echo and logprobs"):
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0)
