"""Model versions in `kiln serve`: a new version loaded through the admin API (behind the API key) takes
new requests while running ones finish on the old; replies name their version; a version that fails its
load checks is refused while the old one keeps serving; rollback; SIGHUP with --models-file."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from lmkiln.serve.app import create_app
from tests.serve.conftest import serving

KEY = {"Authorization": "Bearer s3cret"}


def model_copy(src, dst, change=None):
    """A copy of a model directory, its weights passed through `change` (name, tensor) -> tensor."""
    shutil.copytree(src, dst)
    if change is not None:
        path = dst / "model.safetensors"
        weights = load_file(path)
        save_file({k: change(k, v) for k, v in weights.items()}, path, metadata={"format": "pt"})
    return dst


def degraded(tiny_model, dst):
    """The same model with its weights buried in noise: it loads, generates, and answers badly."""
    g = torch.Generator().manual_seed(0)
    return model_copy(tiny_model, dst, lambda k, v: v + torch.randn(v.shape, generator=g) * 0.5)


def ask(url, model="tiny", **extra):
    body = {"model": model, "prompt": "What sound does a cat make?", "max_tokens": 4, "temperature": 0, **extra}
    return httpx.post(url + "/v1/completions", json=body, headers=KEY, timeout=60)


def test_the_admin_api_needs_the_key(tiny_model, tmp_path):
    with serving(create_app(tiny_model, device="cpu", name="tiny")) as url:
        refused = httpx.post(url + "/admin/models", json={"model": str(tiny_model)})
        assert refused.status_code == 403 and "--api-key" in refused.json()["error"]["message"]
    with serving(create_app(tiny_model, device="cpu", name="tiny", api_key="s3cret")) as url:
        assert httpx.get(url + "/admin/models").status_code == 401
        assert httpx.get(url + "/admin/models", headers=KEY).json()["active"] == "v1"


def test_a_new_version_serves_new_requests_and_rollback_is_one_call(tiny_model, tmp_path):
    second = degraded(tiny_model, tmp_path / "v2")
    with serving(create_app(tiny_model, device="cpu", name="tiny", api_key="s3cret")) as url:
        before = ask(url).json()["choices"][0]["text"]
        loaded = httpx.post(url + "/admin/models", json={"model": str(second)}, headers=KEY, timeout=120)
        assert loaded.status_code == 200 and loaded.json() == {"version": "v2", "model": "tiny@v2", "previous": "v1"}
        reply = ask(url)
        assert reply.headers["x-lmkiln-version"] == "v2" and reply.json()["model"] == "tiny@v2"
        assert reply.json()["choices"][0]["text"] != before  # the noisy weights answer differently
        pinned = ask(url, model="tiny@v1")  # the previous version stays loaded, and can be asked by name
        assert pinned.headers["x-lmkiln-version"] == "v1" and pinned.json()["choices"][0]["text"] == before
        listed = {m["id"]: m["state"] for m in httpx.get(url + "/v1/models", headers=KEY).json()["data"]}
        assert listed == {"tiny": "active", "tiny@v2": "active", "tiny@v1": "previous"}

        back = httpx.post(url + "/admin/models/rollback", headers=KEY)
        assert back.json() == {"version": "v1", "model": "tiny@v1"}
        assert ask(url).json()["choices"][0]["text"] == before
        state = httpx.get(url + "/admin/models", headers=KEY).json()
        assert [h["event"] for h in state["history"]] == ["load", "load", "rollback"]
        kept = [(v["version"], v["state"]) for v in state["versions"] if v["state"] != "draining"]
        assert kept == [("v1", "active")]  # the version rolled back is not kept
        assert httpx.post(url + "/admin/models/rollback", headers=KEY).status_code == 409  # nothing before v1 now
        metrics = httpx.get(url + "/metrics", headers=KEY).text
        assert 'lmkiln_model_version_info{version="v1"} 1.0' in metrics
        assert 'lmkiln_model_swaps_total{result="loaded"} 1.0' in metrics


def test_a_version_that_fails_its_load_checks_is_refused_and_the_old_one_serves(tiny_model, tmp_path):
    nan = model_copy(tiny_model, tmp_path / "nan", lambda k, v: v * float("nan") if "embed" in k else v)
    broken = model_copy(tiny_model, tmp_path / "template")
    config = json.loads((broken / "tokenizer_config.json").read_text())
    (broken / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": "{{ raise_exception('no') }}"})
    )
    with serving(create_app(tiny_model, device="cpu", name="tiny", api_key="s3cret")) as url:
        cases = [
            ({"model": str(nan)}, "not finite"),
            ({"model": str(broken)}, "chat template"),
            ({"model": str(tmp_path / "missing")}, "not a model directory"),
            ({"model": str(tiny_model), "version": "v1"}, "loaded already"),
            ({"model": str(tiny_model), "adapters": {"x": str(tmp_path)}}, "adapter_config.json"),
        ]
        for body, reason in cases:
            refused = httpx.post(url + "/admin/models", json=body, headers=KEY, timeout=120)
            message = refused.json()["error"]["message"]
            assert refused.status_code == 422 and reason in message and "v1 keeps serving" in message, message
        assert ask(url).headers["x-lmkiln-version"] == "v1"
        assert httpx.get(url + "/admin/models", headers=KEY).json()["versions"][0]["state"] == "active"
        assert 'lmkiln_model_swaps_total{result="refused"} 5.0' in httpx.get(url + "/metrics", headers=KEY).text


@pytest.mark.slow
def test_a_running_request_finishes_on_its_version_and_a_replaced_one_closes(tiny_model, tmp_path):
    second, third = degraded(tiny_model, tmp_path / "v2"), model_copy(tiny_model, tmp_path / "v3")
    app = create_app(tiny_model, device="cpu", name="tiny", api_key="s3cret")
    model = app.state.server.engine.model
    step = model.forward
    model.forward = lambda *a, **k: (time.sleep(0.03), step(*a, **k))[1]  # v1 slowed: the swap lands mid-reply
    with serving(app) as url:
        body = {"model": "tiny", "prompt": "A", "max_tokens": 100, "temperature": 0, "stream": True}
        body["ignore_eos"] = True
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=KEY, timeout=120) as stream:
            assert stream.headers["x-lmkiln-version"] == "v1"
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: {"))
            swapped = httpx.post(url + "/admin/models", json={"model": str(second)}, headers=KEY, timeout=120)
            assert swapped.json()["version"] == "v2" and ask(url).headers["x-lmkiln-version"] == "v2"
            assert app.state.server.versions.previous.engine.batch_size == 1  # still generating on v1
            rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        chunks = [json.loads(first[6:])] + rest
        assert {c["model"] for c in chunks} == {"tiny@v1"} and chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert len("".join(c["choices"][0]["text"] for c in chunks)) > 0
        v1 = app.state.server.versions.previous
        assert (
            httpx.post(url + "/admin/models", json={"model": str(third)}, headers=KEY, timeout=120).status_code == 200
        )
        deadline = time.time() + 10  # v1 is neither active nor previous now: it drains, then closes
        while app.state.server.versions.draining and time.time() < deadline:
            time.sleep(0.05)
        assert v1.label == "v1" and not v1.engine.thread.is_alive()
        assert [v["version"] for v in httpx.get(url + "/admin/models", headers=KEY).json()["versions"]] == ["v3", "v2"]


@pytest.mark.slow
def test_sighup_loads_the_version_the_models_file_names(tiny_model, tmp_path):
    second = degraded(tiny_model, tmp_path / "v2")
    models = tmp_path / "models.yaml"
    models.write_text(f"model: {tiny_model}\nversion: stable\n")
    cmd = [sys.executable, "-m", "lmkiln", "serve", "--models-file", str(models), "--port", "0", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        url = line.split(" at ")[1].split("/v1")[0]
        assert _wait(lambda: httpx.get(url + "/health").json().get("version") == "stable")
        models.write_text("model: v2\nversion: noisy\n")  # relative to the file's folder
        os.kill(proc.pid, signal.SIGHUP)
        assert _wait(lambda: httpx.get(url + "/health").json().get("version") == "noisy")
        models.write_text("model: nowhere\n")
        os.kill(proc.pid, signal.SIGHUP)  # refused with a line; the running version keeps serving
        assert _wait(lambda: "not a model directory" in proc.stdout.readline())
        assert httpx.get(url + "/health").json()["version"] == "noisy" and second.exists()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _wait(check, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if check():
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False
