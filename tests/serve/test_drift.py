"""`kiln monitor --drift`: the logged prompts of a live `kiln serve` against the fine-tuning data (the
Bitext support rows). Prompts from the same distribution raise no signal; prompts from another one
(tinyshakespeare, a third of them in German, French or Spanish) raise every signal."""

import csv
import json
import random
from pathlib import Path

import httpx
import numpy as np
import pytest

from lmkiln.cli import main
from lmkiln.monitor.drift import psi
from lmkiln.serve.app import create_app
from lmkiln.serve.request_log import RequestLog
from tests.serve.conftest import serving

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
BITEXT = SHARED / "bitext-customer-support" / "Bitext_Sample_Customer_Support_Training_Dataset.csv"
SHAKESPEARE = SHARED / "tinyshakespeare" / "input.txt"
FOREIGN = [
    "Wie kann ich meine Bestellung stornieren und mein Geld zurückbekommen?",
    "Ich habe mein Passwort vergessen und kann mich nicht mehr anmelden.",
    "Warum wurde meine Lieferung noch nicht verschickt, obwohl ich bezahlt habe?",
    "Können Sie mir bitte die Rechnung für den letzten Monat schicken?",
    "Ich möchte meine Lieferadresse ändern, bevor das Paket versendet wird.",
    "Comment puis-je annuler ma commande et obtenir un remboursement ?",
    "J'ai oublié mon mot de passe et je ne peux plus me connecter à mon compte.",
    "Pourquoi ma livraison n'est-elle toujours pas arrivée après deux semaines ?",
    "Pouvez-vous m'envoyer la facture de mon dernier achat, s'il vous plaît ?",
    "Je voudrais changer l'adresse de livraison de ma commande en cours.",
    "¿Cómo puedo cancelar mi pedido y recibir el reembolso de mi dinero?",
    "Olvidé mi contraseña y ya no puedo entrar en mi cuenta de cliente.",
    "¿Por qué mi paquete todavía no ha llegado si lo pagué hace dos semanas?",
    "¿Me pueden enviar la factura de mi última compra, por favor?",
    "Quisiera cambiar la dirección de envío de mi pedido antes de que salga.",
]


@pytest.fixture(scope="module")
def bitext():
    if not BITEXT.is_file():
        pytest.skip("the shared Bitext data is not beside the repository")
    with open(BITEXT, newline="") as fh:
        return [r["instruction"] for r in csv.DictReader(fh)]


def _log(url, prompts):
    for p in prompts:
        body = {"messages": [{"role": "user", "content": p}], "max_tokens": 1, "temperature": 0}
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code == 200


def _drift(url, log, reference, history, *extra):
    argv = ["-q", "monitor", url + "/v1", "--drift", "--requests", str(log), "--reference", str(reference)]
    return main([*argv, "--drift-history", str(history), "--drift-sample", "300", *extra])


def test_psi_is_zero_for_the_same_sample_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=5000)
    assert psi(ref, ref) == pytest.approx(0, abs=1e-9)
    assert psi(ref, rng.normal(size=5000)) < 0.02
    assert 0.1 < psi(ref, rng.normal(0.5, 1, size=5000)) < psi(ref, rng.normal(1.5, 1, size=5000))


@pytest.mark.slow
def test_drift_alerts_on_every_signal_for_another_distribution_and_not_for_the_same(
    tiny_model, bitext, tmp_path, capsys
):
    rng = random.Random(0)
    rows = rng.sample(bitext, 900)
    reference = tmp_path / "support.jsonl"  # the fine-tuning data, as kiln finetune reads it
    reference.write_text("".join(json.dumps({"instruction": q, "output": "..."}) + "\n" for q in rows[:600]))
    same = rows[600:]
    passages = [p.strip() for p in SHAKESPEARE.read_text().split("\n\n") if 3 < len(p.split()) <= 20]
    other = rng.sample(passages, 200) + [f"{q} ({i})" for i, q in enumerate(FOREIGN * 7)][:100]
    history = tmp_path / "drift.jsonl"
    for name, prompts in (("same", same), ("other", other)):
        log = RequestLog(tmp_path / name)
        app = create_app(tiny_model, device="cpu", name="tiny", request_log=log)
        with serving(app) as url:
            _log(url, prompts)
            log.close()
            code = _drift(url, tmp_path / name, reference, history)
        assert code == (0 if name == "same" else 3), capsys.readouterr()
    quiet, loud = (json.loads(line) for line in history.read_text().splitlines())
    assert quiet["window"]["prompts"] == 300 and quiet["reference"]["prompts"] == 300
    assert not quiet["alert"] and all(v["psi"] < 0.25 for v in quiet["signals"].values()), quiet["signals"]
    assert loud["alert"] and all(v["alert"] for v in loud["signals"].values()), loud["signals"]
    assert loud["drift"] == max(v["psi"] for v in loud["signals"].values())
    assert loud["signals"]["language"]["window_shares"]["other"] > 0.25
    top = loud["outliers"][0]["text"]
    assert top in other and top not in same
    err = capsys.readouterr().err
    assert "kiln monitor: DRIFT ALERT" in err and "out of distribution" in err


def test_the_log_before_the_window_is_the_default_reference(tiny_model, tmp_path):
    """Without --reference, --window splits the log: the hours before it are the reference."""
    log = tmp_path / "log"
    log.mkdir()
    asks = ["cancel my order please", "where is my refund", "change my shipping address", "track the package"]
    old = [{"time": 1000.0 + i, "route": "completions", "input": [asks[i % 4]]} for i in range(40)]
    (log / "requests-1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    with serving(create_app(tmp_path / "none", device="cpu", name="x", background=True)) as url:
        recent = RequestLog(log)
        for i in range(40):
            recent.write({"route": "completions", "input": [asks[i % 4]]})
        recent.close()
        history = tmp_path / "drift.jsonl"
        argv = ["-q", "monitor", url + "/v1", "--drift", "--requests", str(log), "--window", "1"]
        assert main([*argv, "--drift-history", str(history)]) == 0
    record = json.loads(history.read_text())
    assert record["window"]["prompts"] == 40 and record["reference"]["prompts"] == 20  # half names the words
    assert "skipped" in record["signals"]["loss"]  # a server that could not load: no log-probabilities
