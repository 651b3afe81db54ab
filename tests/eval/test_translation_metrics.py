"""BLEU and chrF (`eval.metrics`): the numbers sacrebleu's own command line prints for the same files."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmkiln.cli import main
from lmkiln.eval.generative import corpus_scores

HYPOTHESES = [
    "Die Datei konnte nicht geöffnet werden.",
    "Unbekannte Option: %s",
    "Speicher ist voll",
    "Verbindung zum Server verloren.",
]
REFERENCES = [
    "Datei konnte nicht geöffnet werden.",
    "Unbekannte Option „%s“",
    "Nicht genügend Speicher",
    "Die Verbindung zum Server wurde unterbrochen.",
]


def _cli(tmp_path: Path, hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """sacrebleu's command line on two files, one segment a line: {bleu, chrf}."""
    hyp, ref = tmp_path / "hyp.txt", tmp_path / "ref.txt"
    hyp.write_text("\n".join(hypotheses) + "\n")
    ref.write_text("\n".join(references) + "\n")
    exe = shutil.which("sacrebleu", path=str(Path(sys.executable).parent)) or "sacrebleu"
    out = subprocess.run(
        [exe, str(ref), "-i", str(hyp), "-m", "bleu", "chrf", "-b", "-w", "4", "-f", "text"],
        capture_output=True,
        text=True,
        check=True,
    )
    bleu, chrf = (float(line) for line in out.stdout.split())
    return {"bleu": bleu, "chrf": chrf}


def test_corpus_bleu_and_chrf_equal_the_sacrebleu_command_line(tmp_path):
    ours = corpus_scores(HYPOTHESES, REFERENCES, ["bleu", "chrf"])
    cli = _cli(tmp_path, HYPOTHESES, REFERENCES)
    assert 0 < ours["bleu"] < 100 and 0 < ours["chrf"] < 100
    assert ours["bleu"] == pytest.approx(cli["bleu"], abs=1e-4) and ours["chrf"] == pytest.approx(cli["chrf"], abs=1e-4)
    assert corpus_scores(REFERENCES, REFERENCES, ["bleu"]) == {"bleu": 100.0}


def test_eval_metrics_add_bleu_and_chrf_to_a_gen_task(trained_run, tmp_path, capsys):
    _, run_dir, _ = trained_run
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"instruction": f"Translate: file {i} not found", "output": f"Datei {i} nicht gefunden"} for i in range(6)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    models = ["--models", str(run_dir / "pretrain" / "final")]
    code = main(
        [
            "eval",
            *models,
            "--tasks",
            f"gen:{pairs}",
            "eval.max_new_tokens=8",
            "eval.metrics=[bleu, chrf]",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    res = json.loads((out / "eval.json").read_text())["pretrain/final"]["pairs"]
    samples = res["samples"]
    cli = _cli(tmp_path, [s["generated"] for s in samples], [s["reference"] for s in samples])
    assert res["bleu"] == pytest.approx(cli["bleu"], abs=1e-4) and res["chrf"] == pytest.approx(cli["chrf"], abs=1e-4)
    assert "pairs BLEU" in capsys.readouterr().out
    assert main(["eval", *models, "--tasks", f"gen:{pairs}", "eval.metrics=[bleu, ter]"]) == 2
