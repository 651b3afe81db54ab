"""Verifiable rewards: GRPO's (`finetune.rewards`, `align.rewards`) and eval's (`eval.rewards`, scoring
each greedy reply of a gen: task). Plain Python functions `f(prompt, completion, row, **args) -> float`,
named `module:function` (a module on the path, or a .py file), each with a weight, keyword arguments
and a name for the tables. They are imported and their signatures checked before any model loads; at run time
a reward that raises or returns a non-number stops the step with a one-line error naming the row and
the function, never a silent zero.

The built-ins (`lmkiln.eval.rewards:NAME`):
- `exact_match(field)`: 1 when the completion, stripped, equals the row's `field`;
- `regex_match(pattern, field=None)`: 1 when the pattern matches (with `field`, it must also capture
  the row's value in its first group);
- `json_schema(schema)`: 1 when the completion is JSON that validates against the schema;
- `json_field(field, key=None)`: 1 when the completion is a JSON object whose `key` (default: the same
  name) equals the row's `field`;
- `label_in_set(labels, field=None)`: 1 when the completion is one of `labels` (and, with `field`, the
  row's);
- `length_penalty(target, per_char=0.001)`: minus `per_char` for each character past `target`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmkiln.errors import UserError
from lmkiln.io import sha256_file


@dataclass(frozen=True)
class Reward:
    name: str  # module:function, as the recipe spells it
    fn: Callable[..., float]
    weight: float
    args: dict
    label: str  # its name in metrics and tables
    key: str = "finetune.rewards"  # the recipe key that named it

    def __call__(self, prompt: str, completion: str, row: dict, where: str) -> float:
        try:
            value = self.fn(prompt, completion, row, **self.args)
        except Exception as exc:
            raise UserError(f"{self.key}: {self.name} raised on {where}: {type(exc).__name__}: {exc}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"{self.key}: {self.name} returned {value!r} on {where}; expected a finite number")
        return float(value)


@functools.cache  # the stage's checks and the task both load them: a reward file runs once
def _import(name: str) -> Callable:
    module_name, sep, attr = name.rpartition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"'{name}': expected module:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UserError(f"'{name}': no file {path}")
            spec = importlib.util.spec_from_file_location(f"lmkiln_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"'{name}': cannot import {module_name} ({type(exc).__name__}: {exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"'{name}': {module_name} has no function {attr}")
    return fn


def _specs(specs: list) -> list[tuple[str, float, dict, str | None]]:
    return [(s, 1.0, {}, None) if isinstance(s, str) else (s.fn, s.weight, s.args, s.name) for s in specs]


def load_rewards(specs: list, key: str = "finetune.rewards") -> list[Reward]:
    """The recipe's rewards (at `key`), imported and checked: each `module:function` or {fn, weight, args, name}."""
    if not specs:
        raise UserError(f"{key}: GRPO needs at least one reward (module:function)")
    rewards = []
    for name, weight, args, label in _specs(specs):
        try:
            fn = _import(name)
        except UserError as exc:
            raise UserError(f"{key}: {exc}") from None
        needs = NEEDS.get(fn)
        if needs and importlib.util.find_spec(needs) is None:
            raise UserError(f"{key}: {name} needs the {needs} package: pip install {needs} (or lmkiln[rl])")
        try:
            inspect.signature(fn).bind("prompt", "completion", {}, **args)
        except TypeError as exc:
            raise UserError(f"{key}: {name} cannot be called as f(prompt, completion, row, **{args}): {exc}") from None
        rewards.append(Reward(name, fn, weight, dict(args), label or name.rpartition(":")[2], key))
    labels = [r.label for r in rewards]
    if len(set(labels)) < len(labels):
        raise UserError(f"{key}: two rewards share the name '{max(labels, key=labels.count)}'; give each a name")
    return rewards


def rewards_fingerprint(specs: list) -> dict[str, str]:
    """What the rewards' results depend on beyond the recipe: the content of each reward file."""
    files = {name.rpartition(":")[0] for name, *_ in _specs(specs)}
    return {f: sha256_file(f) for f in sorted(files) if f.endswith(".py") and Path(f).is_file()}


def score_all(rewards: list[Reward], cases: list[tuple[str, str, dict, str]]) -> list[list[float]]:
    """Each function's value on each (prompt, completion, row, where) case; `where` names it in errors."""
    return [[r(prompt, text, row, where) for r in rewards] for prompt, text, row, where in cases]


def weighted(rewards: list[Reward], values: list[float]) -> float:
    """One case's reward: each function's value times its weight, summed."""
    return sum(v * r.weight for v, r in zip(values, rewards))


def mean_rewards(rewards: list[Reward], values: list[list[float]]) -> dict[str, float]:
    """The mean weighted sum (`reward`) and each function's mean (`reward/NAME`) of score_all's values."""
    n = max(len(values), 1)
    total = sum(weighted(rewards, row) for row in values)
    means = {f"reward/{r.label}": round(sum(row[i] for row in values) / n, 5) for i, r in enumerate(rewards)}
    return {"reward": round(total / n, 5), **means}


# The built-in rewards.


def exact_match(prompt: str, completion: str, row: dict, field: str) -> float:
    return float(completion.strip() == str(row[field]).strip())


def regex_match(prompt: str, completion: str, row: dict, pattern: str, field: str | None = None) -> float:
    found = re.search(pattern, completion)
    if found is None:
        return 0.0
    return float(field is None or (found.groups() and found.group(1).strip() == str(row[field]).strip()))


def _parsed(completion: str):
    try:
        return json.loads(completion)
    except json.JSONDecodeError:
        return None


def json_schema(prompt: str, completion: str, row: dict, schema: dict) -> float:
    import jsonschema

    value = _parsed(completion)
    if value is None and completion.strip() != "null":
        return 0.0
    return float(jsonschema.Draft202012Validator(schema).is_valid(value))


def json_field(prompt: str, completion: str, row: dict, field: str, key: str | None = None) -> float:
    value = _parsed(completion)
    return float(isinstance(value, dict) and str(value.get(key or field)) == str(row[field]))


def label_in_set(prompt: str, completion: str, row: dict, labels: list[str], field: str | None = None) -> float:
    answer = completion.strip()
    return float(answer in labels and (field is None or answer == str(row[field])))


def length_penalty(prompt: str, completion: str, row: dict, target: int, per_char: float = 0.001) -> float:
    return -per_char * max(0, len(completion) - target)


NEEDS = {json_schema: "jsonschema"}  # built-ins whose package is an extra (lmkiln[rl])
