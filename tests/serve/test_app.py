import json

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from lmkiln.serve.app import create_app  # noqa: E402


@pytest.fixture(scope="module")
def client(trained_run):
    _, run_dir, _ = trained_run
    return TestClient(create_app(run_dir / "finetune" / "final", device="cpu", name="tiny"))


def test_models(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and body["data"][0]["id"] == "tiny"


def test_completion_greedy_is_deterministic_with_usage(client):
    req = {"model": "tiny", "prompt": "def add(a, b):", "max_tokens": 6, "temperature": 0}
    a, b = client.post("/v1/completions", json=req).json(), client.post("/v1/completions", json=req).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["usage"]["completion_tokens"] <= 6 and a["usage"]["prompt_tokens"] > 0
    assert a["choices"][0]["finish_reason"] in ("length", "stop")


def test_streaming_matches_non_streaming(client):
    req = {"prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0}
    body = client.post("/v1/completions", json=req).json()
    whole = body["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={**req, "stream": True}) as resp:
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["usage"] == body["usage"]
    assert chunks[-1]["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]


def test_errors_use_openai_shape(client):
    bad = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
    wrong = client.post("/v1/completions", json={"model": "other", "prompt": "x"})
    assert wrong.status_code == 404 and "not served" in wrong.json()["error"]["message"]
    long = client.post("/v1/completions", json={"prompt": "word " * 400})
    assert long.status_code == 413
