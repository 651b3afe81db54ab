"""The chat page at / in headless Chromium (Debian's chromium driven by Playwright): a message streams a
reply, the conversation is kept (sent whole on the next turn), tokens/s are shown. A screenshot goes
to build/test-artifacts/chat_page.png."""

import os
import shutil
from pathlib import Path

import pytest

from lmkiln.serve.app import create_app
from tests.serve.conftest import serving

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "test-artifacts"


def _browser_or_skip():
    sync_api = pytest.importorskip("playwright.sync_api")
    if CHROMIUM is None:
        if os.environ.get("LMKILN_REQUIRE_BROWSER"):  # CI installs chromium: a missing one is a failure there
            pytest.fail("LMKILN_REQUIRE_BROWSER is set but no chromium is installed")
        pytest.skip("no chromium (apt-get install chromium)")
    return sync_api


def test_chat_page_streams_and_keeps_the_conversation(tiny_model):
    sync_api = _browser_or_skip()
    app = create_app(tiny_model, device="cpu", name="tiny")
    with serving(app) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page()
            bodies = []
            page.on(
                "request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/chat/completions") else None
            )
            page.goto(url + "/")
            page.wait_for_selector("#model option[value='tiny']", state="attached")
            page.fill("#max_tokens", "12")
            for i, text in enumerate(["What sound does a cat make?", "And a dog?"]):
                page.fill("#input", text)
                page.keyboard.press("Enter")
                page.wait_for_selector(f".assistant >> nth={i}")
                page.wait_for_function(f"document.querySelectorAll('.assistant')[{i}].dataset.state === 'done'")
            assert page.locator(".error").count() == 0
            assert page.locator(".user").all_inner_texts() == ["What sound does a cat make?", "And a dog?"]
            assert "tokens/s" in page.inner_text("#stats")
            # the second turn sent the whole conversation: user, assistant, user
            assert [m["role"] for m in bodies[-1]["messages"]] == ["user", "assistant", "user"]
            assert bodies[-1]["stream"] is True
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "chat_page.png"))
            page.reload()  # the conversation survives a reload (localStorage)
            page.wait_for_selector(".assistant >> nth=1")
            assert page.locator(".user").count() == 2
        finally:
            browser.close()
