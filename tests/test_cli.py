import subprocess
import sys

import pytest

from lmkiln.cli import main


def test_help_lists_every_verb(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for verb in ("run", "data", "tokenizer", "pretrain", "finetune", "eval", "generate", "serve"):
        assert verb in out


def test_python_dash_m_is_the_cli():
    res = subprocess.run([sys.executable, "-m", "lmkiln", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("lmkiln ")


def test_run_again_skips_every_stage(trained_run, capsys):
    recipe, run_dir, _ = trained_run
    from tests.conftest import TINY

    data = recipe.finetune.data
    assert main(["run", *TINY, f"run_dir={run_dir}", f"finetune.data={data}"]) == 0
    err = capsys.readouterr().err
    for stage in ("data", "tokenizer", "pretrain", "finetune", "eval"):
        assert f"{stage}: up to date, skipped" in err


def test_generate_prints_continuation(trained_run, capsys):
    _, run_dir, _ = trained_run
    model = run_dir / "finetune" / "final"
    assert main(["generate", str(model), "--prompt", "def f(", "--max-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def f(")
    assert (
        main(
            [
                "generate",
                str(model),
                "--prompt",
                "What sound does a cat make?",
                "--chat",
                "--max-tokens",
                "8",
                "--seed",
                "1",
            ]
        )
        == 0
    )


def test_generate_compiles_by_default_where_it_pays(trained_run, capsys, monkeypatch):
    """--max-tokens from COMPILE_PAYS_TOKENS compiles the decode step unless --no-compile; shorter replies
    decode eagerly unless --compile. (The compiled step's tokens: tests/model/test_transformer.py.)"""
    from lmkiln.model.inference import generate as gen

    real, asked = gen.stream, []

    def recording(*args, compile: bool, **kwargs):
        asked.append(compile)
        yield from real(*args[:2], 3, **kwargs)  # three eager tokens: the choice is what is tested

    monkeypatch.setattr(gen, "stream", recording)
    model = str(trained_run[1] / "finetune" / "final")
    long = str(gen.COMPILE_PAYS_TOKENS)
    for flags in (["--max-tokens", long], ["--max-tokens", long, "--no-compile"], ["--max-tokens", "5"]):
        assert main(["generate", model, "--prompt", "def f(", "--temperature", "0", *flags]) == 0
    assert main(["generate", model, "--prompt", "def f(", "--max-tokens", "5", "--compile"]) == 0
    assert asked == [True, False, False, True]
    assert capsys.readouterr().err.count("compiling the decode step") == 1


def test_generate_on_missing_model_exits_2(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "not a model directory" in capsys.readouterr().err


def test_overrides_may_follow_options(capsys):
    assert main(["estimate", "--world", "2", "pretrain.batch_size=4", "pretrain.seq_len=128"]) == 0
    out = capsys.readouterr().out
    assert "tokens per step" in out and "1,024" in out  # 4 sequences x 128 tokens x 2 ranks
    with pytest.raises(SystemExit) as exc:
        main(["estimate", "--world", "2", "--bogus"])
    assert exc.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
