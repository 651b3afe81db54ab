"""`kiln monitor report`: the page made from real monitor runs (a score alert after a degraded version is
swapped in, a drift check), rendered in headless Chromium: both charts drawn, the alerts and the prompts
most out of distribution listed. A screenshot goes to build/test-artifacts/monitor_report.png."""

import json
import random

import httpx
import pytest

from lmkiln.cli import main
from lmkiln.serve.app import create_app
from lmkiln.serve.request_log import RequestLog
from tests.serve.conftest import serving
from tests.serve.test_chat_page import ARTIFACTS, CHROMIUM, _browser_or_skip
from tests.serve.test_drift import FOREIGN
from tests.serve.test_monitor import _monitor, golden_rows
from tests.serve.test_versions import degraded


@pytest.fixture(scope="module")
def histories(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    key = {"Authorization": "Bearer s3cret"}
    history, drift = root / "history.jsonl", root / "drift.jsonl"
    animals = ["cat", "dog", "cow", "duck", "sheep", "owl"]
    reference = root / "sft.jsonl"
    reference.write_text(
        "".join(
            json.dumps({"instruction": f"What sound does a {a} make? ({i})", "output": "."}) + "\n"
            for i, a in enumerate(animals * 10)
        )
    )
    log = RequestLog(root / "log")
    app = create_app(tiny_model, device="cpu", name="tiny", api_key="s3cret", request_log=log)
    with serving(app) as url:
        rows = golden_rows(url, root / "golden.jsonl", key)
        assert _monitor(url + "/v1", rows, history, "--api-key", "s3cret") == 0
        prompts = random.Random(0).sample(FOREIGN * 3, 40)
        for p in prompts:
            body = {"messages": [{"role": "user", "content": p}], "max_tokens": 1}
            httpx.post(url + "/v1/chat/completions", json=body, headers=key, timeout=60)
        log.close()
        argv = ["-q", "monitor", url + "/v1", "--drift", "--requests", str(root / "log"), "--reference", str(reference)]
        assert main([*argv, "--drift-history", str(drift), "--drift-sample", "30", "--api-key", "s3cret"]) == 3
        httpx.post(url + "/admin/models", json={"model": str(degraded(tiny_model, root / "noisy"))}, headers=key)
        assert _monitor(url + "/v1", rows, history, "--api-key", "s3cret") == 3
    return root, history, drift


@pytest.mark.slow
def test_the_report_renders_in_chromium_with_charts_alerts_and_prompts(histories):
    sync_api = _browser_or_skip()
    root, history, drift = histories
    out = root / "report.html"
    assert (
        main(["-q", "monitor", "report", "--history", str(history), "--drift-history", str(drift), "--out", str(out)])
        == 0
    )
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(out.as_uri())
            for chart in ("#scores svg", "#drift svg"):
                box = page.locator(chart).bounding_box()
                assert box["width"] > 500 and box["height"] > 150, chart
            alerts = page.locator("#alerts tr").all_inner_texts()[1:]
            assert len(alerts) == 2 and any("score" in a and "golden" in a and "tiny@v2" in a for a in alerts)
            assert any("drift" in a and "language" in a for a in alerts)
            assert page.inner_text("#alert-count").startswith("2")
            prompts = page.locator("#outliers .prompt").all_inner_texts()
            assert all(p in FOREIGN for p in prompts[:5]), prompts  # the foreign ones first
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "monitor_report.png"), full_page=True)
        finally:
            browser.close()


def test_the_report_replaces_its_own_page_but_never_another_file(histories, capsys):
    root, history, drift = histories
    argv = ["-q", "monitor", "report", "--history", str(history), "--drift-history", str(drift), "--out"]
    ours = root / "again.html"
    assert main([*argv, str(ours)]) == 0 and main([*argv, str(ours)]) == 0  # its own page: replaced
    theirs = root / "notes.html"
    theirs.write_text("<html>my notes</html>")
    assert main([*argv, str(theirs)]) == 2
    assert theirs.read_text() == "<html>my notes</html>" and "not a report" in capsys.readouterr().err
    empty = ["-q", "monitor", "report", "--history", str(root / "no.jsonl"), "--drift-history", str(root / "no2.jsonl")]
    assert main([*empty, "--out", str(root / "x.html")]) == 2 and not (root / "x.html").exists()
