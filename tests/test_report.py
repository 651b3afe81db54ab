"""report.md reads cleanly: generations in fenced blocks, the same decimals down each column, every
chart linked, an honest note on what small models' samples show; eval.png labelled and valued."""

import json
import re

from lmkiln.eval.results import results_figure
from lmkiln.report import fenced, write_report


def _tables(report: str) -> list[list[list[str]]]:
    """Each Markdown table as rows of cells (header and rule dropped)."""
    tables, rows = [], []
    for line in report.splitlines() + [""]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
        elif rows:
            tables.append(rows[2:])
            rows = []
    return tables


def _outside_fences(report: str) -> str:
    return re.sub(r"(?ms)^(`{3,})[^\n]*\n.*?^\1$", "", report)


def test_every_numeric_column_has_one_number_of_decimals(trained_run):
    _, run_dir, _ = trained_run
    report = write_report(run_dir, skip_if_current=False).read_text()
    assert _tables(report)
    for rows in _tables(report):
        for col in range(1, len(rows[0])):
            decimals = {len(m.group(1)) for r in rows if (m := re.fullmatch(r"-?[\d,]*\.(\d+)%?\*?", r[col]))}
            assert len(decimals) <= 1, (rows, col)
    assert not re.search(r"\d\.\d{5,}", _outside_fences(report))  # no raw 5-decimal floats in the prose


def test_every_chart_in_the_run_is_linked(trained_run):
    _, run_dir, _ = trained_run
    report = write_report(run_dir, skip_if_current=False).read_text()
    charts = [str(p.relative_to(run_dir)) for p in run_dir.rglob("*.png") if "compare" not in p.parts]
    assert "eval/eval.png" in charts and all(f"]({c})" in report for c in charts), charts


def test_generations_are_fenced_so_markdown_in_them_stays_text(tmp_path):
    generated = "# not a heading\n\n- not a list\n```\nnested fence"
    sample = {
        "id": "mod.func",
        "input": "def f():\n    return 1",
        "reference": "Return one.",
        "generated": generated,
        "rouge_l": 0.123456,
    }
    results = {
        name: {"docstrings": {"reply_loss": 2.0, "rouge_l": 0.1, "samples": [sample]}}
        for name in ("pretrain", "finetune")
    }
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval.json").write_text(json.dumps(results))
    report = write_report(tmp_path, skip_if_current=False).read_text()
    outside = _outside_fences(report)
    assert "# not a heading" not in outside and "- not a list" not in outside and "Return one." not in outside
    assert report.count(fenced(generated)) == 2 and fenced(generated).startswith("````text\n")
    assert "(ROUGE-L 0.1235)" in report


def test_small_models_samples_are_explained(trained_run):
    _, run_dir, _ = trained_run
    report = write_report(run_dir, skip_if_current=False).read_text()
    samples = report.split("## Sample generations", 1)[1]
    assert "M parameters" in samples.split("###", 1)[0] and "the losses above, not the samples" in samples


def test_eval_png_has_labelled_axes_and_values_on_its_bars(trained_run):
    _, run_dir, _ = trained_run
    results = json.loads((run_dir / "eval" / "eval.json").read_text())
    fig = results_figure(results)
    panels = [ax for ax in fig.axes if ax.patches]
    assert panels
    for ax in panels:
        assert ax.get_ylabel() and ax.get_xlabel() == "model" and ax.get_title()
        values = [t.get_text() for t in ax.texts]
        assert len(values) == len(ax.patches) and all(re.fullmatch(r"-?\d+\.\d{4}|–", v) for v in values), values
