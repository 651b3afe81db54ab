"""report.md in the run directory: data stats, training curves, base against tuned, sample generations."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from lmkiln.config import STAGES
from lmkiln.io import MANIFEST, read_manifest, write_text
from lmkiln.runs import model_dir_of, stage_dir


def _data_section(run_dir: Path) -> list[str]:
    stats_path = stage_dir(run_dir, "data") / "stats.json"
    if not stats_path.exists():
        return []
    s = json.loads(stats_path.read_text())
    out = [
        "## Data",
        "",
        "| | documents | bytes |",
        "|---|---:|---:|",
        f"| in | {s['docs_in']:,} | {s['bytes_in']:,} |",
    ]
    out += [f"| removed: {k} | {v['docs']:,} | {v['bytes']:,} |" for k, v in s["removed"].items()]
    out += [
        f"| out (train) | {s['train_docs']:,} | {s['train_bytes']:,} |",
        f"| out (val) | {s['val_docs']:,} | {s['val_bytes']:,} |",
        "",
    ]
    out += (
        [f"Redacted: {', '.join(f'{n:,} {k}' for k, n in s['pii_redacted'].items())}.", ""]
        if s.get("pii_redacted")
        else []
    )
    if len(s.get("per_source", {})) > 1:
        out += ["| source | in | kept | removed |", "|---|---:|---:|---|"]
        out += [
            f"| {src} | {p['docs_in']:,} | {p['docs_out']:,} | "
            f"{', '.join(f'{r} {n:,}' for r, n in sorted(p['removed'].items(), key=lambda kv: -kv[1]))} |"
            for src, p in s["per_source"].items()
        ] + [""]
    if s.get("counterfactual"):
        out += [_counterfactual_line(s["counterfactual"], "training documents", "training documents written"), ""]
    if (stage_dir(run_dir, "data") / "removals.png").exists():
        out += ["![documents and bytes kept and removed per reason and source](data/removals.png)", ""]
    tok = read_manifest(stage_dir(run_dir, "tokenizer"))
    if tok:
        m = tok["metrics"]
        out += [
            f"Tokenizer: vocabulary {m['vocab_size']:,}; {m['train_tokens']:,} training tokens, "
            f"{m['val_tokens']:,} validation tokens ({m.get('train_bytes_per_token', '?')} bytes/token).",
            "",
        ]
    return out


def _training_section(run_dir: Path, stage: str, title: str) -> list[str]:
    manifest = read_manifest(run_dir / stage)
    if not manifest:
        return []
    m = manifest["metrics"]
    out = [f"## {title}", ""]
    if stage == "pretrain":
        out.append(
            f"{m['parameters'] / 1e6:.2f}M parameters, {m['steps']} steps, {m['tokens_seen']:,} tokens, "
            f"{m['tokens_per_s']:,.0f} tokens/s on {m['device']}"
            + (f" (MFU {m['mfu']:.0%})" if m.get("mfu") else "")
            + f", {manifest['wall_time_s']:.0f} s. "
            f"Final train loss {m['final_loss']:.4f}, validation loss {_f4(m['val_loss'])}."
        )
    else:
        out += _finetune_lines(m, manifest)
    if (run_dir / stage / "loss.png").exists():
        curves = "loss and rewards" if m.get("task") == "grpo" else "loss"
        out += ["", f"![{title} {curves}]({stage}/loss.png)"]
    return out + [""]


def _finetune_lines(m: dict, manifest: dict) -> list[str]:
    """Base against tuned on validation, in the task's own measures."""
    task, method = m.get("task", "generate"), m["method"] + (" (DoRA)" if m.get("dora") else "")
    kind = {"dpo": "DPO ", "classify": "classification ", "tag": "token classification ", "grpo": "GRPO "}.get(task, "")
    head = f"{method} {kind}fine-tuning"
    if task == "grpo":
        what = f"{m['prompts']:,} prompts ({m['generations']} completions sampled for each)"
    else:
        what = f"{m['examples']:,} {'pairs' if task == 'dpo' else 'examples'}"
    out = [
        f"{head} on {what}"
        + (f", {len(m['labels'])} labels" if task in ("classify", "tag") else "")
        + f", {m['steps']} steps, {manifest['wall_time_s']:.0f} s. Best: step {m.get('best_step', '?')}"
        + (", stopped early" if m.get("stopped_early") else "")
        + ".",
        "",
    ]
    base, best = m["base_val_loss"], m["best_val_loss"]
    if task == "classify":
        out += [
            "| validation | accuracy | macro-F1 | loss |",
            "|---|---:|---:|---:|",
            f"| majority class | {m['majority_accuracy']:.1%} | | |",
            f"| base model + untrained head | {m['base_val_accuracy']:.1%} | | {base:.4f} |",
            f"| tuned | {m['val_accuracy']:.1%} | {m['val_macro_f1']:.4f} | {best:.4f} |",
        ]
    elif task == "tag":
        out += [
            "| validation | entity precision | entity recall | entity F1 | loss |",
            "|---|---:|---:|---:|---:|",
            f"| base model + untrained head | | | {m['base_val_entity_f1']:.4f} | {base:.4f} |",
            f"| tuned | {m['val_entity_precision']:.4f} | {m['val_entity_recall']:.4f} | {m['val_entity_f1']:.4f} "
            f"| {best:.4f} |",
        ]
    elif task == "grpo":
        names = [k.partition("/")[2] for k in m["val_rewards"]]
        out += [
            "| validation (greedy replies) | reward | " + " | ".join(names) + " |",
            "|---|---:|" + "---:|" * len(names),
            f"| base | {m['base_val_reward']:.4f} | "
            + " | ".join(f"{v:.4f}" for v in m["base_val_rewards"].values())
            + " |",
            f"| tuned | {m['val_reward']:.4f} | " + " | ".join(f"{v:.4f}" for v in m["val_rewards"].values()) + " |",
        ]
    elif task == "dpo":
        out += [
            "| validation | DPO loss | reward accuracy | reward margin |",
            "|---|---:|---:|---:|",
            f"| base (the reference) | {base:.4f} | {m['base_val_reward_accuracy']:.1%} | {0:.4f} |",
            f"| tuned | {best:.4f} | {m['val_reward_accuracy']:.1%} | {m['val_reward_margin']:.4f} |",
        ]
    else:
        out += [
            "| validation | reply loss | perplexity |",
            "|---|---:|---:|",
            f"| base | {base:.4f} | {math.exp(base):,.1f} |",
            f"| tuned | {best:.4f} | {math.exp(best):,.1f} |",
        ]
    if m.get("overfit_warning"):
        out += ["", "Warning: validation loss rose while training loss fell (overfitting)."]
    if m.get("skipped_rows"):
        out += ["", f"{m['skipped_rows']} bad rows skipped (finetune.on_bad_rows=skip)."]
    if m.get("counterfactual"):
        out += ["", _counterfactual_line(m["counterfactual"], "training rows", "rows trained on")]
    return out


def _counterfactual_line(c: dict, what: str, result: str) -> str:
    """What counterfactual augmentation changed: rows or documents swapped, and the commonest swaps."""
    swaps = ", ".join(f"{k} {v:,}" for k, v in list(c["swaps"].items())[:8]) or "none"
    return (
        f"Counterfactual augmentation ({c['mode']}, rate {c['rate']}): {c['rows_changed']:,} of {c['rows_in']:,} "
        f"{what} had words swapped; {c['rows_out']:,} {result}. Swaps: {swaps}."
    )


EXPLAINED = {  # what each kind of score means, said once under the table when the run has it
    "perplexity": "Held-out loss: nats per token on the held-out text; bits/byte: the same per UTF-8 byte, "
    "comparable across tokenizers.",
    "docstrings": "Docstring loss: nats per token of the reference docstrings of functions in held-out modules; "
    "ROUGE-L: F1 of the greedy generated docstring against the reference.",
    "mlm": "Held-out MLM loss: an encoder's nats per masked token on the held-out text, masked by BERT's rule "
    "at pretrain.mask_rate (the same positions for every model).",
    "tagging": "Entity precision, recall and F1: a predicted entity counts when its type, start and end match "
    "(seqeval's counting).",
    "gen": "Reply loss: nats per token of the reference replies; exact match and token F1 (SQuAD's normalisation) "
    "and ROUGE-L: the greedy reply against the reference, on rows fine-tuning held out (`@val`).",
    "rewards": "Reward: eval.rewards' weighted sum on each greedy reply, averaged; each function's mean beside it "
    "(a 0/1 reward's mean is the share of replies it accepts).",
}


def _eval_section(run_dir: Path) -> list[str]:
    path = stage_dir(run_dir, "eval") / "eval.json"
    if not path.exists():
        return []
    from lmkiln.eval.results import markdown_table

    results = json.loads(path.read_text())
    first = next(iter(results.values()), {})
    scores = [(t, r) for res in results.values() for t, r in res.items() if isinstance(r, dict)]
    kinds = {
        t if t in ("perplexity", "docstrings", "mlm") else "tagging" if "entity_f1" in r else "gen"
        for t, r in scores
        if "samples" in r or "entity_f1" in r or t in ("perplexity", "mlm")
    }
    kinds |= {"rewards" for _, r in scores if "reward" in r}
    out = [
        "## Evaluation: base against tuned",
        "",
        markdown_table(results),
        " ".join(EXPLAINED[k] for k in EXPLAINED if k in kinds),
        "",
    ]
    if (stage_dir(run_dir, "eval") / "eval.png").exists():
        out += ["![every score, a bar per model](eval/eval.png)", ""]
    from lmkiln.eval.bias_report import bias_table

    table = bias_table(results)
    if table:
        out += ["### Bias probes per axis", "", table]
        if (stage_dir(run_dir, "eval") / "bias.png").exists():
            out += ["![stereotype share per axis, each model](eval/bias.png)", ""]
    for task, r in first.items():
        if isinstance(r, dict) and r.get("by_group"):
            out += _group_lines(task, {name: res[task]["by_group"] for name, res in results.items() if task in res})
    for task, r in first.items():
        if isinstance(r, dict) and r.get("samples"):
            out += _samples(run_dir, task, {name: res[task]["samples"] for name, res in results.items() if task in res})
    return out


def _group_lines(task: str, grouped: dict[str, dict]) -> list[str]:
    """A task's main score per group (eval.group_by), each model side by side, then the largest gaps and,
    for classifiers, the demographic parity and equalized odds differences."""
    first = next(iter(grouped.values()))
    metric = "accuracy" if "accuracy" in first["gaps"] else "token_f1"
    names = list(grouped)
    out = [
        f"### {task} by {first['column']}",
        "",
        "| group | rows | " + " | ".join(f"{n} {metric.replace('_', ' ')}" for n in names) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for g, v in first["groups"].items():
        cells = [_f4(grouped[n]["groups"].get(g, {}).get(metric)) for n in names]
        out.append(f"| {g} | {v['n']} | " + " | ".join(cells) + " |")
    rows = [("largest gap", lambda b: b["gaps"][metric])]
    if "demographic_parity_difference" in first:
        rows += [
            ("demographic parity difference", lambda b: b["demographic_parity_difference"]),
            ("equalized odds difference", lambda b: b["equalized_odds_difference"]),
        ]
    for label, get in rows:
        out.append(f"| **{label}** | | " + " | ".join(_f4(get(grouped[n])) for n in names) + " |")
    compared = first.get("compared_groups", len(first["groups"]))
    out += ["", f"Gaps and differences over the {compared} groups of {first.get('min_rows', 1)}+ rows.", ""]
    return out


def _samples(run_dir: Path, task: str, samples: dict[str, list[dict]]) -> list[str]:
    """The first three held-out examples of a generative task: input, reference, each model's reply."""
    title = "held-out modules" if task == "docstrings" else f"{task}, held-out rows"
    out = [f"## Sample generations ({title})", ""] + _size_note(run_dir)
    names = list(samples)
    for i in range(min(3, len(samples[names[0]]))):
        first = samples[names[0]][i]
        out += [
            f"### `{first['id']}`",
            "",
            fenced(first["input"], "python" if task == "docstrings" else "text"),
            "",
            "**reference**",
            "",
            fenced(first["reference"]),
            "",
        ]
        for n in names:
            sample = samples[n][i]
            scored = f"ROUGE-L {sample['rouge_l']:.4f}" + (
                f", reward {sample['reward']:.4f}" if "reward" in sample else ""
            )
            out += [f"**{n}** ({scored})", "", fenced(sample["generated"] or "(empty)"), ""]
    return out


def _import_section(run_dir: Path) -> list[str]:
    manifest = read_manifest(stage_dir(run_dir, "import"))
    if not manifest:
        return []
    from lmkiln.model.convert.importer import describe

    return [
        "## Base model",
        "",
        f"Imported from `{manifest['metrics']['source']}`:",
        "",
        fenced(describe(model_dir_of(run_dir, "import"))),
        "",
    ]


def _size_note(run_dir: Path) -> list[str]:
    """One honest sentence on what samples from a small model can show."""
    manifest = read_manifest(stage_dir(run_dir, "pretrain"))
    if not manifest or manifest["metrics"]["parameters"] >= 100e6:
        return []
    m = manifest["metrics"]
    return [
        f"These models have {m['parameters'] / 1e6:.1f}M parameters and were pretrained on "
        f"{m['tokens_seen']:,} tokens: at that size greedy decoding falls into repeating frequent phrases, so "
        f"the samples show the form fine-tuning taught (one summary sentence in the docstring's voice), and "
        f"the losses above, not the samples, measure how much it learned.",
        "",
    ]


def fenced(text: str, lang: str = "text") -> str:
    """`text` as a fenced code block whose fence is longer than any backtick run inside it, so a line
    starting with # or a blank line in a generation stays text, not Markdown."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text}\n{fence}"


def _f4(value) -> str:
    return "–" if value is None else f"{value:.4f}"


def write_report(run_dir: Path, skip_if_current: bool = True) -> Path:
    path = run_dir / "report.md"
    manifests = [stage_dir(run_dir, s) / MANIFEST for s in STAGES]
    newest = max((m.stat().st_mtime for m in manifests if m.exists()), default=0)
    if skip_if_current and path.exists() and path.stat().st_mtime >= newest:
        return path
    lines = [f"# lmkiln run report: `{run_dir}`", ""]
    lines += _data_section(run_dir)
    lines += _training_section(run_dir, "pretrain", "Pretraining")
    lines += _import_section(run_dir)
    lines += _training_section(run_dir, "finetune", "Fine-tuning")
    lines += _training_section(run_dir, "align", "Alignment")
    lines += _eval_section(run_dir)
    write_text(path, "\n".join(lines) + "\n")
    return path
