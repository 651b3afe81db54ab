"""A real server on loopback (uvicorn on a thread, port chosen by the OS) for the openai client."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest

uvicorn = pytest.importorskip("uvicorn")


@contextmanager
def serving(app):
    # log_config=None: no handler bound to the sys.stderr of the moment (a test's capture, closed after it)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        app.state.server.close()


@pytest.fixture(scope="module")
def tiny_model(trained_run):
    _, run_dir, _ = trained_run
    return run_dir / "finetune" / "final"
