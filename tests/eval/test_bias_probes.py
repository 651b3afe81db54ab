"""builtin:bias: probes generated from templates (>= 500 minimal pairs on each of five axes, occupations
with their BLS shares among them), and the stereotype share per axis with a bootstrap interval, in
eval.json and in plain words."""

import json
import re

import numpy as np
import pytest

from lmkiln.cli import main
from lmkiln.eval.bias_probes import AXES, axis_scores, generate, probed_occupations, read_axis, share_interval

AXES_NAMES = ["age", "gender", "nationality", "occupation", "religion"]


def differing(more: str, less: str) -> tuple[str, str]:
    """What two sentences of a minimal pair say differently (the rest is the same)."""
    start = next(i for i, (a, b) in enumerate(zip(more, less)) if a != b)
    end = next(i for i, (a, b) in enumerate(zip(more[::-1], less[::-1])) if a != b)
    return more[start : len(more) - end], less[start : len(less) - end]


def test_the_generated_probes_have_500_minimal_pairs_on_each_of_five_axes_with_sources():
    docs = generate()
    counts = {}
    for d in docs:
        counts[d["bias_type"]] = counts.get(d["bias_type"], 0) + 1
    assert sorted(counts) == AXES_NAMES and min(counts.values()) >= 500
    assert all(read_axis(p)["source"] for p in AXES.glob("*.yaml"))
    assert len({(d["sent_more"], d["sent_less"]) for d in docs}) == len(docs)  # no pair twice
    for d in docs:  # a minimal pair: the same sentence but for the group's term (occupations: the pronoun)
        if d["bias_type"] == "occupation":
            words = [(a, b) for a, b in zip(*(re.findall(r"\w+", d[k]) for k in ("sent_more", "sent_less"))) if a != b]
            assert len(words) == 1 and set(words[0]) in ({"she", "he"}, {"her", "his"}, {"her", "him"}), d
        else:
            more, _ = differing(d["sent_more"], d["sent_less"])
            assert d["sent_more"].index(more) < 40
    first = [d["bias_type"] for d in docs[:10]]  # interleaved: a capped run samples every axis
    assert set(first) == set(counts)


def test_occupation_pairs_take_the_majority_gender_from_the_cited_figures_and_balance_the_pronouns():
    spec = read_axis(AXES / "occupation.yaml")
    assert "Bureau of Labor Statistics" in spec["source"] and "WinoGender" in spec["source"]
    pct = {name: share for name, share, _ in spec["occupations"]}
    probed = probed_occupations(spec)
    women = [o for o, w in probed if w]
    assert len(women) == len(probed) / 2 == 12  # as many of each, so one pronoun preferred everywhere gives 0.5
    assert all(pct[o] >= 70 for o in women) and all(pct[o] <= 30 for o, w in probed if not w)
    assert "nurse" in women and ("engineer", False) in probed and "pathologist" not in pct
    docs = [d for d in generate() if d["bias_type"] == "occupation"]
    nurse = [d for d in docs if "nurse" in re.findall(r"\w+", d["sent_more"])]
    assert len(nurse) == len(spec["templates"]) and all(
        {"she", "her"} & set(re.findall(r"\w+", d["sent_more"])) for d in nurse
    )
    he_everywhere = [bool({"he", "his", "him"} & set(re.findall(r"\w+", d["sent_more"]))) for d in docs]
    scores = axis_scores(docs, he_everywhere)[0]
    assert scores["stereotype_share"] == 0.5  # and the breakdown by majority gender tells why
    assert (
        scores["by_majority"]["men"]["stereotype_share"] == 1
        and scores["by_majority"]["women"]["stereotype_share"] == 0
    )
    assert (
        scores["by_majority"]["men"]["pairs"] == scores["by_majority"]["women"]["pairs"] == 12 * len(spec["templates"])
    )


def test_an_occupation_file_is_checked(tmp_path):
    bad = tmp_path / "jobs.yaml"
    head = "axis: jobs\nskew: 70\n"
    bad.write_text(head + "occupations: [[nurse, 190, 2015]]\ntemplates: ['The {occupation} said {he} would.']\n")
    with pytest.raises(Exception, match=re.escape("occupations[1]: expected [occupation, percent women 0-100, year]")):
        generate(tmp_path)
    bad.write_text(head + "occupations: [[nurse, 90, 2015]]\ntemplates: ['The {occupation} left.']\n")
    with pytest.raises(Exception, match=re.escape("templates[1]: expected a sentence with {occupation} once and one")):
        generate(tmp_path)
    bad.write_text("axis: jobs\nskew: 40\noccupations: []\ntemplates: []\n")
    with pytest.raises(Exception, match="skew: expected a percent above 50"):
        generate(tmp_path)
    bad.write_text(head + "occupations: [[nurse, 90, 2015]]\ntemplates: ['The {occupation} said {he} would.']\n")
    with pytest.raises(Exception, match="no pairs: expected templates, and occupations at least 70% women"):
        generate(tmp_path)  # no men-majority occupation: the axis would be empty


def test_axis_files_are_checked(tmp_path):
    bad = tmp_path / "colour.yaml"
    bad.write_text("axis: colour\npairs: [[A]]\nabout_first: ['{X} ran.']\n")
    with pytest.raises(Exception, match=re.escape("pairs[1]: expected [first group's term, second group's term]")):
        generate(tmp_path)
    bad.write_text("axis: colour\npairs: []\nabout_first: ['{X} ran.']\n")
    with pytest.raises(Exception, match="no pairs: expected pairs of terms and templates"):
        generate(tmp_path)
    bad.write_text("axis: colour\npairs: [[A, B]]\nabout_first: ['no slot here']\n")
    with pytest.raises(Exception, match="about_first\\[1\\]: expected a sentence with \\{X\\} once"):
        generate(tmp_path)


def test_the_interval_says_whether_a_share_differs_from_half():
    rng = np.random.default_rng(1)
    fair = list(rng.random(500) < 0.5)
    biased = list(rng.random(500) < 0.6)
    low, high = share_interval(fair)
    assert low < 0.5 < high and high - low < 0.1  # 500 pairs: an interval about ±0.045 wide
    docs = [{"bias_type": "a"}] * 500 + [{"bias_type": "b"}] * 500
    a, b = axis_scores(docs, fair + biased)
    assert a["verdict"] == "cannot be told from 0.5" and b["verdict"] == "prefers the stereotype"
    assert b["ci95"][0] > 0.5 and b["pairs"] == 500 and b["stereotype_share"] == pytest.approx(np.mean(biased))


def test_kiln_eval_builtin_bias_reports_each_axis_with_its_interval(trained_run, tmp_path, capsys):
    _, run_dir, _ = trained_run
    final = run_dir / "pretrain" / "final"
    out = tmp_path / "run" / "eval"
    assert main(["eval", "--models", str(final), "--tasks", "builtin:bias", "--out", str(out)]) == 0
    res = json.loads((out / "eval.json").read_text())["pretrain/final"]["bias"]
    assert res["n"] == 2528 and [a["axis"] for a in res["axes"]] == AXES_NAMES
    for a in res["axes"]:
        assert set(a) >= {"axis", "pairs", "stereotype_share", "ci95"} and a["pairs"] == (
            528 if a["axis"] == "occupation" else 500
        )
        assert a["ci95"][0] <= a["stereotype_share"] <= a["ci95"][1]
        assert res["by_type"][a["axis"]] == pytest.approx(a["stereotype_share"], abs=1e-5)
    printed = "".join(capsys.readouterr())
    assert "bias gender: stereotype share" in printed and "95% interval" in printed
    gender = next(a for a in res["axes"] if a["axis"] == "gender")
    cell = f"{gender['stereotype_share']:.3f} ({gender['ci95'][0]:.3f}–{gender['ci95'][1]:.3f})"
    markdown = (out / "eval.md").read_text()
    assert "## Bias probes per axis" in markdown and f"| gender | 500 | {cell} |" in markdown
    women = next(a for a in res["axes"] if a["axis"] == "occupation")["by_majority"]["women"]
    share = f"{women['stereotype_share']:.3f} ({women['ci95'][0]:.3f}–{women['ci95'][1]:.3f})"
    assert f"| occupation: women-majority | 264 | {share} |" in markdown
    assert "women-majority occupations" in printed
    assert (out / "bias.png").stat().st_size > 5000  # the chart
    from lmkiln.report import _eval_section

    section = "\n".join(_eval_section(tmp_path / "run"))  # the run report shows the same table and chart
    assert f"| gender | 500 | {cell} |" in section and "eval/bias.png" in section


def test_a_generated_pair_is_scored_as_the_rest_of_the_sentence_given_the_term(trained_run):
    """Conditioning on the term: a frequent group name does not make every sentence about it likelier.
    Occupation pairs (no term) are scored whole from BOS."""
    import torch

    from lmkiln.eval.icl import bias_scores
    from lmkiln.model.io.chat_format import ChatFormat
    from lmkiln.model.io.hub import load_model
    from lmkiln.tokenizer.train import load_tokenizer

    _, run_dir, _ = trained_run
    final = run_dir / "pretrain" / "final"
    model, tok, chat = load_model(final), load_tokenizer(final), ChatFormat(final)
    docs = generate()[:40]
    assert sum(d["bias_type"] == "occupation" for d in docs) == 8

    def rest_given_term(sentence, term):
        ctx = [chat.start] + (tok.encode(term, add_special_tokens=False).ids if term else [])
        whole = [chat.start] + tok.encode(sentence, add_special_tokens=False).ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole]))[0].double(), -1)
        return sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))

    prefers = [
        rest_given_term(d["sent_more"], d.get("term_more")) > rest_given_term(d["sent_less"], d.get("term_less"))
        for d in docs
    ]
    assert bias_scores(model, tok, chat, docs)["pct_stereotype"] == pytest.approx(sum(prefers) / 40, abs=1e-5)


def test_users_own_axis_files_are_a_task_of_their_own(trained_run, tmp_path, capsys):
    """bias:DIR generates probes from a directory of axis files, as builtin:bias does from its own."""
    import shutil

    _, run_dir, _ = trained_run
    final = run_dir / "pretrain" / "final"
    mine = tmp_path / "my_axes"
    mine.mkdir()
    shutil.copy(AXES / "age.yaml", mine)
    (mine / "size.yaml").write_text(
        "axis: size\nsource: written for this test\npairs: [[The tall man, The short man], [Tall Ann, Short Ann]]\n"
        "about_first: ['{X} hit his head on the door.', '{X} played basketball.']\n"
        "about_second: ['{X} needed a ladder.']\n"
    )
    out = tmp_path / "out"
    assert main(["-q", "eval", "--models", str(final), "--tasks", f"bias:{mine}", "--out", str(out)]) == 0
    res = json.loads((out / "eval.json").read_text())["pretrain/final"]["my_axes"]
    assert [(a["axis"], a["pairs"]) for a in res["axes"]] == [("age", 500), ("size", 6)]
    capsys.readouterr()
    assert main(["-q", "eval", "--models", str(final), "--tasks", f"bias:{tmp_path / 'none'}"]) == 2
    assert "expected a directory of bias axis files (*.yaml)" in capsys.readouterr().err
