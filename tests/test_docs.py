"""The docs must stay true: every recipe key is documented, and the README names the test command."""

from pathlib import Path

from pydantic import BaseModel

from lmkiln.config import Recipe

ROOT = Path(__file__).resolve().parents[1]


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
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
