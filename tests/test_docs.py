"""The docs must stay true: every recipe key is documented, and the README names the test command."""

from pathlib import Path

from pydantic import BaseModel

from lmkiln.config import Recipe

ROOT = Path(__file__).resolve().parents[1]


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        name = field.alias or name  # as a recipe spells it
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _keys(ann, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def test_every_recipe_key_is_documented():
    doc = (ROOT / "docs" / "recipes.md").read_text()
    missing = [k for k in _keys(Recipe) if f"`{k}`" not in doc]
    assert not missing, f"docs/recipes.md lacks {missing}"


def test_readme_names_the_test_command():
    assert "python -m pytest" in (ROOT / "README.md").read_text()


def _readme_quickstart_table(readme: str) -> dict[str, dict[str, str]]:
    """{model: {score: value}} from the table after the README's quickstart marker (scores as rows)."""
    block = readme.split("<!-- quickstart table: recipes/quickstart.expected.json -->", 1)[1].split("```")[1]
    lines = [line for line in block.splitlines() if "┃" in line or "│" in line]
    models = [c.strip() for c in lines[0].split("┃")[1:]]
    table: dict[str, dict[str, str]] = {m: {} for m in models}
    for line in lines[1:]:
        label, *values = [c.strip() for c in line.split("│")]
        for model, value in zip(models, values):
            table[model][label] = value
    return table


def test_readme_quickstart_figures_match_the_expected_values_file():
    import json

    expected = json.loads((ROOT / "recipes" / "quickstart.expected.json").read_text())
    readme = (ROOT / "README.md").read_text()
    assert _readme_quickstart_table(readme) == expected["table"]
    assert f"about {expected['quickstart_minutes']:g} minutes on 2 CPU cores" in readme
    assert f"Run the tests (about {expected['test_minutes']:g} minutes on 2 cores" in readme
