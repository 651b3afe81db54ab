"""Train/serve consistency checks, the most common silent failure of fine-tuning tools: a chat template
that does not render, an end-of-turn token the server does not stop on, padding that hides the end
token from the loss, an exported model that does not generate what the trained one did."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lmkiln.io import read_json
from lmkiln.model.families import is_encoder_config
from lmkiln.model.io.chat_format import PROBE, chat_template, end_of_turn, render_chat


@dataclass
class Check:
    name: str
    status: str  # ok | fixed | warning | failed
    detail: str


def _eos_ids(model_dir: Path) -> list[int]:
    path = model_dir / "generation_config.json"
    eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    return [eos] if isinstance(eos, int) else list(eos or [])


def consistency_checks(model_dir: Path, fix: bool = False) -> list[Check]:
    """Check the chat template, the end-of-turn stop token and padding; with `fix`, add a missing
    end-of-turn token to generation_config.json's eos_token_id."""
    model_dir = Path(model_dir)
    if is_encoder_config(read_json(model_dir / "config.json")):
        return [Check("encoder", "ok", "reads text whole: no chat template, end-of-turn or stop ids to check")]
    checks: list[Check] = []
    if chat_template(model_dir) is None:
        return [Check("chat template", "warning", "none: chat fine-tuning and /v1/chat/completions need one")]
    try:
        render_chat(model_dir, PROBE)
        render_chat(model_dir, PROBE[:2], add_generation_prompt=True)
        checks.append(Check("chat template", "ok", "renders system, user and assistant turns"))
    except Exception as exc:  # a template can raise anything: its own raise_exception, undefined names
        return [Check("chat template", "failed", f"does not render: {type(exc).__name__}: {exc}")]
    eot = end_of_turn(model_dir)
    eos = _eos_ids(model_dir)
    if eot is None:
        checks.append(Check("end-of-turn token", "warning", "the template ends replies with no special token"))
    elif eot[1] in eos:
        checks.append(Check("end-of-turn token", "ok", f"{eot[0]} (id {eot[1]}) is a stop token in generation_config"))
    elif fix:
        path = model_dir / "generation_config.json"
        gen = json.loads(path.read_text()) if path.is_file() else {}
        gen["eos_token_id"] = eos + [eot[1]]
        path.write_text(json.dumps(gen, indent=2) + "\n")
        checks.append(
            Check("end-of-turn token", "fixed", f"added {eot[0]} (id {eot[1]}) to generation_config eos_token_id")
        )
    else:
        checks.append(
            Check(
                "end-of-turn token",
                "failed",
                f"{eot[0]} (id {eot[1]}) is not in generation_config "
                f"eos_token_id {eos}: generation would run past replies",
            )
        )
    config = json.loads((model_dir / "config.json").read_text())
    pad = config.get("pad_token_id")
    ends = set(eos) | ({eot[1]} if eot else set())
    detail = (
        f"pad id {pad} is also an end token; lmkiln builds loss masks from lengths, not from the pad id, "
        f"so the end token is still trained (tools that mask by pad id would not train it)"
        if pad in ends
        else f"pad id {pad}; loss masks come from lengths, so padding never hides a token"
    )
    checks.append(Check("padding", "ok", detail))
    return checks


def require_same_format(trained: Path, written: Path) -> None:
    """Refuse to finish writing a model whose chat template, stop ids or bos/eos differ from those it was
    trained with: a tuned model served in another format answers in garbage, and nothing else would say
    why. Raised as a bug (RuntimeError): the writer, not the user, dropped them."""
    from lmkiln.model.io.chat_format import ChatFormat

    a, b = ChatFormat(trained), ChatFormat(written)
    differences = [
        name
        for name, x, y in (
            ("chat template", chat_template(Path(trained)), chat_template(Path(written))),
            ("bos id", a.bos, b.bos),
            ("eos id", a.eos, b.eos),
            ("end-of-turn id", a.end_of_turn, b.end_of_turn),
        )
        if x != y
    ]
    if not a.stop_ids <= b.stop_ids:
        differences.append(f"stop ids ({sorted(b.stop_ids)} lacks {sorted(a.stop_ids - b.stop_ids)})")
    if differences:
        raise RuntimeError(
            f"{written}: the model written differs from the one trained ({trained}) in its {', '.join(differences)}"
        )


def print_checks(checks: list[Check]) -> None:
    from lmkiln.log import console

    colour = {"ok": "green", "fixed": "yellow", "warning": "yellow", "failed": "red"}
    for c in checks:
        console.print(f"  [{colour[c.status]}]{c.status:>7}[/] {c.name}: {c.detail}")
