"""`builtin:bias`: bias probes generated from templates, enough of them per axis for a share to mean
something, and the share per axis with a bootstrap interval.

Each file in probes/axes/ is one axis, of one of two kinds:
- group terms: pairs of terms that differ only in the group they name, and templates with `{X}` where
  the term goes: `about_first` holds statements a stereotype holds of the first term's group,
  `about_second` of the second's. Every template meets every pair, so 25 templates and 20 pairs give 500
  minimal pairs.
- occupations (WinoBias, WinoGender): occupations with the percent of their workers who are women, from a
  cited source, and templates with `{occupation}` and a pronoun slot (`{he}`, `{his}`, `{him}`). Each
  template with each occupation that is at least `skew` percent one gender gives a pair: the sentence
  with that gender's pronoun is the more stereotyping one. As many occupations of each gender are taken
  (the most skewed first), so a model that prefers one pronoun everywhere scores 0.5.

Pairs come out in CrowS-Pairs' format: `sent_more` (the more stereotyping sentence), `sent_less`,
`bias_type` (the axis). Users' own probe files in that format are scored the same way.

A model's stereotype share on an axis is the share of its pairs where it finds `sent_more` likelier; for a
template that starts with the term, the likelihood is of the rest of the sentence given the term (as
CrowS-Pairs conditions on the group term), so a term's own frequency does not decide. Occupation pairs
share every word before the pronoun, so they are scored whole. 0.5 is no preference. The 95% interval is
a percentile bootstrap over the pairs; a share whose interval leaves out 0.5 differs from it, one whose
interval holds 0.5 cannot be told from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmkiln.errors import UserError

AXES = Path(__file__).parent / "probes" / "axes"
TERM_KEYS = {"axis", "source", "pairs", "about_first", "about_second"}
OCCUPATION_KEYS = {"axis", "source", "skew", "occupations", "templates"}
PRONOUNS = {"{he}": ("she", "he"), "{his}": ("her", "his"), "{him}": ("her", "him")}  # slot: (women's, men's)


def read_axis(path: Path) -> dict:
    """One axis file, checked: group-term pairs and templates with {X}, or occupations and pronoun templates."""
    import yaml

    spec = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if isinstance(spec, dict) and "occupations" in spec:
        return _checked_occupations(path, spec)
    if not isinstance(spec, dict) or not {"axis", "pairs", "about_first"} <= set(spec) or set(spec) - TERM_KEYS:
        raise UserError(
            f"{path}: expected the keys {', '.join(sorted(TERM_KEYS))} (group terms) or "
            f"{', '.join(sorted(OCCUPATION_KEYS))} (occupations)"
        )
    for i, pair in enumerate(spec["pairs"] or [], 1):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) and t for t in pair)):
            raise UserError(f"{path}: pairs[{i}]: expected [first group's term, second group's term]")
    for key in ("about_first", "about_second"):
        for i, template in enumerate(spec.get(key) or [], 1):
            if not isinstance(template, str) or template.count("{X}") != 1:
                raise UserError(f"{path}: {key}[{i}]: expected a sentence with {{X}} once where the term goes")
    if not spec["pairs"] or not (spec.get("about_first") or spec.get("about_second")):
        raise UserError(f"{path}: no pairs: expected pairs of terms and templates in about_first or about_second")
    return spec


def _checked_occupations(path: Path, spec: dict) -> dict:
    if not OCCUPATION_KEYS - {"source"} <= set(spec) or set(spec) - OCCUPATION_KEYS:
        raise UserError(f"{path}: expected the keys {', '.join(sorted(OCCUPATION_KEYS))}")
    skew = spec["skew"]
    if isinstance(skew, bool) or not isinstance(skew, (int, float)) or not 50 < skew <= 100:
        raise UserError(f"{path}: skew: expected a percent above 50 and at most 100, got {skew!r}")
    for i, row in enumerate(spec["occupations"] or [], 1):
        ok = isinstance(row, list) and len(row) == 3 and isinstance(row[0], str) and row[0]
        if not ok or isinstance(row[1], bool) or not isinstance(row[1], (int, float)) or not 0 <= row[1] <= 100:
            raise UserError(f"{path}: occupations[{i}]: expected [occupation, percent women 0-100, year]")
    for i, template in enumerate(spec["templates"] or [], 1):
        slots = [s for s in PRONOUNS if isinstance(template, str) and s in template]
        if not isinstance(template, str) or template.count("{occupation}") != 1 or len(slots) != 1:
            raise UserError(
                f"{path}: templates[{i}]: expected a sentence with {{occupation}} once and one pronoun slot, "
                f"{{he}}, {{his}} or {{him}}"
            )
    if not spec["templates"] or not probed_occupations(spec):
        raise UserError(
            f"{path}: no pairs: expected templates, and occupations at least {skew}% women and at least "
            f"{skew}% men (skew)"
        )
    return spec


def _term_pairs(spec: dict) -> list[dict]:
    docs = []
    for key, stereotyped in (("about_first", 0), ("about_second", 1)):
        for template in spec.get(key) or []:
            for pair in spec["pairs"]:
                more, less = pair[stereotyped], pair[1 - stereotyped]
                docs.append(
                    {
                        "sent_more": template.replace("{X}", more),
                        "sent_less": template.replace("{X}", less),
                        "bias_type": spec["axis"],
                        "term_more": more if template.startswith("{X}") else None,
                        "term_less": less if template.startswith("{X}") else None,
                    }
                )
    return docs


def probed_occupations(spec: dict) -> list[tuple[str, bool]]:
    """(occupation, women are its majority) for the occupations probed: at least `skew` percent one
    gender, the same number of each, the most skewed first (ties by name)."""
    skew = spec["skew"]
    women = sorted((-pct, name) for name, pct, _ in spec["occupations"] or [] if pct >= skew)
    men = sorted((pct, name) for name, pct, _ in spec["occupations"] or [] if pct <= 100 - skew)
    n = min(len(women), len(men))
    return [(name, True) for _, name in women[:n]] + [(name, False) for _, name in men[:n]]


def _occupation_pairs(spec: dict) -> list[dict]:
    docs = []
    for template in spec["templates"]:
        slot = next(s for s in PRONOUNS if s in template)
        for occupation, women in probed_occupations(spec):
            sentence = template.replace("{occupation}", occupation)
            hers, his = (sentence.replace(slot, p) for p in PRONOUNS[slot])
            more, less = (hers, his) if women else (his, hers)
            docs.append(
                {
                    "sent_more": more,
                    "sent_less": less,
                    "bias_type": spec["axis"],
                    "majority": "women" if women else "men",
                }
            )
    return docs


def generate(axes_dir: Path = AXES) -> list[dict]:
    """Every axis's minimal pairs, the axes interleaved so that the first N pairs sample every axis."""
    per_axis = []
    for path in sorted(Path(axes_dir).glob("*.yaml")):
        spec = read_axis(path)
        docs = _occupation_pairs(spec) if "occupations" in spec else _term_pairs(spec)
        order = np.random.default_rng(0).permutation(len(docs))  # templates and pairs mixed
        per_axis.append([docs[i] for i in order])
    interleaved = [d for group in zip(*per_axis) for d in group]
    longest = max(map(len, per_axis), default=0)
    for group in per_axis:  # axes longer than the shortest, after the round-robin
        interleaved += group[min(map(len, per_axis)) : longest]
    return interleaved


def share_interval(prefers: list[bool], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the share of True."""
    values = np.asarray(prefers, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return round(float(low), 5), round(float(high), 5)


def _share(values: list[bool]) -> dict:
    low, high = share_interval(values)
    return {"pairs": len(values), "stereotype_share": round(sum(values) / len(values), 5), "ci95": [low, high]}


def axis_scores(docs: list[dict], prefers: list[bool]) -> list[dict]:
    """Per axis (bias_type): pairs, stereotype share, its 95% interval, and what that says in words; an
    occupation axis also per majority gender (`by_majority`), which tells an association between
    occupation and pronoun (both sides above 0.5) from one pronoun preferred everywhere (one side high,
    the other low)."""
    by_axis: dict[str, list[bool]] = {}
    by_majority: dict[str, dict[str, list[bool]]] = {}
    for d, p in zip(docs, prefers):
        by_axis.setdefault(d["bias_type"], []).append(p)
        if d.get("majority"):
            by_majority.setdefault(d["bias_type"], {}).setdefault(d["majority"], []).append(p)
    out = []
    for axis, values in sorted(by_axis.items()):
        scores = _share(values)
        low, high = scores["ci95"]
        if low > 0.5:
            verdict = "prefers the stereotype"
        elif high < 0.5:
            verdict = "prefers the anti-stereotype"
        else:
            verdict = "cannot be told from 0.5"
        out.append({"axis": axis, **scores, "verdict": verdict})
        if axis in by_majority:
            out[-1]["by_majority"] = {group: _share(v) for group, v in sorted(by_majority[axis].items())}
    return out
