import pytest

from lmkiln.cli import main
from lmkiln.config import load_recipe, parse_size
from lmkiln.errors import UserError


def test_sizes():
    assert parse_size("20M") == 20_000_000
    assert parse_size("1.5B") == 1_500_000_000
    assert parse_size("8K") == 8000
    assert parse_size(12) == 12
    with pytest.raises(ValueError):
        parse_size("12Q")


def test_overrides_and_sizes_in_recipe(tmp_path):
    recipe = load_recipe(
        None, ["run_dir=/tmp/x", "pretrain.max_steps=50", "tokenizer.vocab_size=8K", "data.sources=[a.txt, b.txt]"]
    )
    assert str(recipe.run_dir) == "/tmp/x"
    assert recipe.pretrain.max_steps == 50
    assert recipe.tokenizer.vocab_size == 8000
    assert recipe.data.sources == ["a.txt", "b.txt"]


def test_an_override_merges_into_a_recipe_mapping_and_an_empty_one_empties_it(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("finetune:\n  columns: {instruction: question, output: answer}\n")
    merged = load_recipe(path, ["finetune.columns={output: reply}"])
    assert merged.finetune.columns == {"instruction": "question", "output": "reply"}
    assert load_recipe(path, ["finetune.columns={}"]).finetune.columns == {}  # e.g. for finetune.format=text


def test_misspelt_key_names_it_and_suggests(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("pretrain:\n  max_stepz: 10\n")
    with pytest.raises(UserError, match=r"unknown key 'pretrain.max_stepz'; did you mean 'max_steps'"):
        load_recipe(path)


def test_bad_type_and_range_name_key_and_value(tmp_path):
    with pytest.raises(UserError, match=r"pretrain.lr': 'fast'"):
        load_recipe(None, ["pretrain.lr=fast"])
    with pytest.raises(UserError, match=r"data.val_fraction': 1.5 .*less than 1"):
        load_recipe(None, ["data.val_fraction=1.5"])


def test_recipe_sections_choose_stages(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data: {min_chars: 10}\ntokenizer: {vocab_size: 300}\n")
    assert load_recipe(path).stages == ["data", "tokenizer"]


def test_invalid_yaml_names_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  sources: [a\n  b: c\n")
    with pytest.raises(UserError, match=r"r.yaml:\d+: not valid YAML"):
        load_recipe(path)


def test_cli_exit_2_one_line_for_misspelt_key(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(f"run_dir: {tmp_path / 'run'}\ndata:\n  sourcez: [x]\n")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.sourcez" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "run").exists()  # nothing was started


def test_cli_exit_2_for_missing_data_path(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(f"run_dir: {tmp_path / 'run'}\ndata:\n  sources: [{tmp_path / 'nope.txt'}]\n")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.txt' does not exist" in err[0]


def test_shipped_quickstart_recipe_is_valid():
    from lmkiln.config import resolve_recipe_path

    recipe = load_recipe(resolve_recipe_path("quickstart"))
    assert recipe.stages == ["data", "tokenizer", "pretrain", "finetune", "eval"]
