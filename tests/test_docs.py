"""The docs must stay true: every recipe key is documented, and the README names the test command."""

import re
import subprocess
from pathlib import Path

import pytest
from pydantic import BaseModel

from lmkiln.config import AlignConfig, Recipe

ROOT = Path(__file__).resolve().parents[1]


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        name = field.alias or name  # as a recipe spells it
        ann = field.annotation
        if ann is AlignConfig:  # the finetune section's keys again: documented once, with its own two
            out += ["align.task", "align.base"]
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
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


# The pages the README's verbs link to; each holds its verbs' figures, as the README held them
VERB_PAGES = [
    "data.md",
    "pretraining.md",
    "finetuning.md",
    "evaluation.md",
    "bias.md",
    "serving.md",
    "real-models.md",
    "monitoring.md",
    "encoders.md",
]
FIGURE = re.compile(r"(?<![\d.])\d+\.\d+(?![\d.])|\d,\d{3}")  # 0.9424, 4,045; not 127.0.0.1
MARKER = re.compile(r"^<!-- (?:figures: ([0-9a-f]{7,40})|quickstart table: \S+) -->$")
COMMAND = re.compile(r"^\$ |`(?:kiln|python|pip) [^`]+`", re.M)


def _blocks(lines: list[str]) -> list[tuple[int, int]]:
    """(first, last) line index of every fenced block and every Markdown table."""
    out, i = [], 0
    while i < len(lines):
        if lines[i].startswith("```"):
            j = next(k for k in range(i + 1, len(lines)) if lines[k].startswith("```"))
            out.append((i, j))
            i = j + 1
        elif lines[i].startswith("|"):
            j = i
            while j + 1 < len(lines) and lines[j + 1].startswith("|"):
                j += 1
            out.append((i, j))
            i = j + 1
        else:
            i += 1
    return out


def _figure_blocks(path: Path) -> list[tuple[int, str | None, str]]:
    """Each block holding a measured figure: (its line number, the commit its marker names or None when it
    has no marker, the text from the block before it to its end, where its reproducing command stands)."""
    lines = path.read_text().splitlines()
    found, previous = [], 0
    for first, last in _blocks(lines):
        code = lines[first].startswith("```") and lines[first] != "```"  # ```bash, ```python: code, not output
        if code or not any(FIGURE.search(x) for x in lines[first : last + 1]):
            continue
        marker = MARKER.match(lines[first - 1]) if first else None
        commit = (marker.group(1) or "expected-values file") if marker else None
        # the command stands in the block, the prose before it, or the figure block before (a table of its results)
        found.append((first + 1, commit, "\n".join(lines[previous : last + 1])))
        previous = first
    return found


def _known_commit(sha: str) -> bool:
    if not (ROOT / ".git").exists() or (ROOT / ".git" / "shallow").exists():
        return True  # an archive or a shallow clone cannot tell; a full clone (CI's) checks
    git = subprocess.run(["git", "cat-file", "-e", f"{sha}^{{commit}}"], cwd=ROOT, capture_output=True)
    return git.returncode == 0


@pytest.mark.parametrize("page", ["../README.md", *VERB_PAGES])
def test_every_figure_names_the_commit_it_came_from_and_its_command(page):
    path = ROOT / "docs" / page
    for line, commit, text in _figure_blocks(path):
        where = f"{path.name}:{line}"
        assert commit is not None, f"{where}: a figure without a '<!-- figures: COMMIT -->' line before it"
        assert commit == "expected-values file" or _known_commit(commit), f"{where}: no commit {commit}"
        assert COMMAND.search(text), f"{where}: no command that reproduces it (a '$ ' line or `kiln ...`)"


def test_readme_is_a_front_door_that_links_every_verb_to_its_page():
    from lmkiln.cli import VERBS

    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    linked = set(re.findall(r"\]\(docs/([a-z-]+\.md)", readme))
    assert set(VERB_PAGES) <= linked, f"README links no {sorted(set(VERB_PAGES) - linked)}"
    pages = {name: (ROOT / "docs" / name).read_text() for name in VERB_PAGES + ["recipes.md"]}
    for verb in {v.split()[0] for v in VERBS}:
        assert f"kiln {verb}" in readme, f"the README shows no `kiln {verb}`"
        assert any(f"kiln {verb}" in text for text in pages.values()), f"no docs page for `kiln {verb}`"


def test_recipes_doc_lists_every_family_preset():
    from lmkiln.model.families import presets_table

    assert presets_table() in (ROOT / "docs" / "recipes.md").read_text()


def test_every_relative_link_in_the_readme_and_docs_resolves():
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.name}: {target}")
    assert not broken, broken
