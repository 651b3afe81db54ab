import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmkiln.cli import main
from lmkiln.eval.generative import rouge_l
from lmkiln.eval.perplexity import perplexity, tokens_of
from lmkiln.model.io.chat_format import ChatFormat
from lmkiln.model.io.hub import load_model
from lmkiln.tokenizer.train import load_tokenizer, token_byte_lengths


def test_perplexity_equals_hand_computation(trained_run):
    _, run_dir, _ = trained_run
    model_dir = run_dir / "pretrain" / "final"
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    tokens = tokens_of(
        tok, ChatFormat(model_dir), ["def f(x):\n    return x * 2\n", "Another text to score here."], 200
    )
    res = perplexity(model, tok, tokens, seq_len=16)
    n = (len(tokens) - 1) // 16
    nats, nbytes = 0.0, 0
    lengths = token_byte_lengths(tok)
    for w in range(n):
        x = torch.tensor(tokens[w * 16 : w * 16 + 16])[None]
        y = torch.tensor(tokens[w * 16 + 1 : w * 16 + 17])
        with torch.no_grad():
            logp = F.log_softmax(model(x)[0], -1)
        nats -= logp[torch.arange(16), y].sum().item()
        nbytes += sum(lengths[i] for i in y.tolist())
    assert res["tokens"] == 16 * n
    assert res["loss"] == pytest.approx(nats / (16 * n), abs=1e-4)
    assert res["bits_per_byte"] == pytest.approx(nats / math.log(2) / nbytes, abs=1e-4)
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]), rel=1e-3)


def test_rouge_l():
    assert rouge_l("Return the sum of two numbers.", "Return the sum of two numbers.") == pytest.approx(1.0)
    assert rouge_l("completely different words", "Return the sum") == 0.0
    assert 0 < rouge_l("Return the total", "Return the sum of two numbers.") < 1


def test_eval_stage_table_and_files(trained_run):
    recipe, run_dir, results = trained_run
    out = run_dir / "eval"
    data = json.loads((out / "eval.json").read_text())
    assert set(data) == {"pretrain", "finetune"}
    for r in data.values():
        assert r["perplexity"]["tokens"] > 0 and np.isfinite(r["perplexity"]["bits_per_byte"])
        assert len(r["docstrings"]["samples"]) == 3 and 0 <= r["docstrings"]["rouge_l"] <= 1
    md = (out / "eval.md").read_text()
    assert "| pretrain |" in md and "| finetune |" in md and "ROUGE-L" in md


def test_report_has_every_section(trained_run):
    _, run_dir, _ = trained_run
    report = (run_dir / "report.md").read_text()
    for heading in ("## Data", "## Pretraining", "## Fine-tuning", "## Evaluation", "## Sample generations"):
        assert heading in report
    assert "(pretrain/loss.png)" in report and (run_dir / "pretrain" / "loss.png").exists()


def test_eval_models_cli_compares_directories(trained_run, tmp_path, capsys):
    recipe, run_dir, _ = trained_run
    a, b = run_dir / "pretrain" / "final", run_dir / "finetune" / "final"
    code = main(
        [
            "eval",
            f"run_dir={run_dir}",
            "eval.tasks=[perplexity]",
            "eval.max_tokens=512",
            "eval.seq_len=64",
            "--models",
            str(a),
            str(b),
            "--out",
            str(tmp_path / "cmp"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "bits/byte" in printed and "final" in printed
    assert len(json.loads((tmp_path / "cmp" / "eval.json").read_text())) == 2


def test_eval_without_data_stage_is_a_user_error(trained_run, tmp_path, capsys):
    _, run_dir, _ = trained_run
    code = main(
        [
            "eval",
            f"run_dir={tmp_path / 'empty'}",
            "eval.tasks=[perplexity]",
            "--models",
            str(run_dir / "pretrain" / "final"),
        ]
    )
    assert code == 2 and "stage 'data' has not finished" in capsys.readouterr().err


def test_eval_on_too_short_text_file_is_a_user_error(trained_run, tmp_path, capsys):
    _, run_dir, _ = trained_run
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    code = main(
        ["eval", f"eval.text={short}", "eval.tasks=[perplexity]", "--models", str(run_dir / "pretrain" / "final")]
    )
    assert code == 2 and "short.txt' has" in capsys.readouterr().err


def test_sliding_window_scores_each_token_once_with_its_window_context(trained_run):
    _, run_dir, _ = trained_run
    model_dir = run_dir / "pretrain" / "final"
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    tokens = tokens_of(tok, ChatFormat(model_dir), ["def f(x):\n    return x * 2\n" * 6], 120)
    seq, stride = 32, 8
    res = perplexity(model, tok, tokens, seq_len=seq, stride=stride, batch_size=3)
    nats, count, s = 0.0, 0, 0
    while s + seq + 1 <= len(tokens):
        x = torch.tensor(tokens[s : s + seq])[None]
        with torch.no_grad():
            logp = F.log_softmax(model(x)[0], -1)
        first = 0 if s == 0 else seq - stride
        for j in range(first, seq):
            nats -= logp[j, tokens[s + j + 1]].item()
            count += 1
        s += stride
    assert res["tokens"] == count and res["loss"] == pytest.approx(nats / count, abs=1e-4)


def test_models_are_named_by_stage_label_or_path_and_two_names_never_collide(tmp_path):
    from lmkiln.errors import UserError
    from lmkiln.eval.stage import display_names
    from lmkiln.runs import model_dir_of, model_label

    a, b = str(tmp_path / "a" / "finetune" / "final"), str(tmp_path / "b" / "finetune" / "final")
    assert model_label(f"without-cda={a}") == ("without-cda", a) and model_label(a) == (None, a)
    assert model_dir_of(tmp_path, "cda=finetune") == tmp_path / "finetune" / "final"
    assert display_names(["import", f"without={a}", "cda=finetune"]) == {
        "import": "import",
        f"without={a}": "without",
        "cda=finetune": "cda",
    }
    assert display_names([a, b]) == {a: a, b: b}  # the same last two parts: whole paths
    with pytest.raises(UserError, match="two models would share a name"):
        display_names(["finetune", f"finetune={a}"])


def test_kiln_eval_models_take_labels_beside_overrides(trained_run, tmp_path, capsys):
    _, run_dir, _ = trained_run
    final = run_dir / "pretrain" / "final"
    out = tmp_path / "out"
    argv = ["eval", "--models", f"base={final}", f"again={final}", "eval.icl_max_examples=4"]
    assert main([*argv, "--tasks", "builtin:bias-small", "--out", str(out)]) == 0  # the override still applies
    results = json.loads((out / "eval.json").read_text())
    assert list(results) == ["base", "again"] and results["base"]["bias-small"]["n"] == 4
    capsys.readouterr()
    assert main(["-q", "eval", "--models", f"x={tmp_path / 'nope'}", "--tasks", "builtin:bias-small"]) == 2
    err = capsys.readouterr().err
    assert f"eval.models: 'x={tmp_path / 'nope'}' is neither a stage name nor a model directory" in err
