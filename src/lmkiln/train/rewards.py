"""GRPO's rewards (`finetune.rewards`): plain Python functions `f(prompt, completion, row, **args) ->
float`, named `module:function` (a module on the path, or a .py file), each with a weight and
keyword arguments. They are imported and their signatures checked before any model loads; at run time
a reward that raises or returns a non-number stops the step with a one-line error naming the row and
the function, never a silent zero.

The built-ins (`lmkiln.train.rewards:NAME`):
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


@dataclass(frozen=True)
class Reward:
    name: str  # module:function, as the recipe spells it
    fn: Callable[..., float]
    weight: float
    args: dict

    def __call__(self, prompt: str, completion: str, row: dict, where: str) -> float:
        try:
            value = self.fn(prompt, completion, row, **self.args)
        except Exception as exc:
            raise UserError(f"finetune.rewards: {self.name} raised on {where}: {type(exc).__name__}: {exc}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"finetune.rewards: {self.name} returned {value!r} on {where}; expected a finite number")
        return float(value)


@functools.cache  # the stage's checks and the task both load them: a reward file runs once
def _import(name: str) -> Callable:
    module_name, sep, attr = name.rpartition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"finetune.rewards: '{name}': expected module:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UserError(f"finetune.rewards: '{name}': no file {path}")
            spec = importlib.util.spec_from_file_location(f"lmkiln_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"finetune.rewards: '{name}': cannot import {module_name} ({type(exc).__name__}: {exc})"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"finetune.rewards: '{name}': {module_name} has no function {attr}")
    return fn


def load_rewards(specs: list) -> list[Reward]:
    """The recipe's rewards, imported and checked: each `module:function` or {fn, weight, args}."""
    if not specs:
        raise UserError("finetune.rewards: GRPO needs at least one reward (module:function)")
    rewards = []
    for spec in specs:
        name, weight, args = (spec, 1.0, {}) if isinstance(spec, str) else (spec.fn, spec.weight, spec.args)
        fn = _import(name)
        try:
            inspect.signature(fn).bind("prompt", "completion", {}, **args)
        except TypeError as exc:
            raise UserError(
                f"finetune.rewards: {name} cannot be called as f(prompt, completion, row, **{args}): {exc}"
            ) from None
        rewards.append(Reward(name, fn, weight, dict(args)))
    return rewards


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
