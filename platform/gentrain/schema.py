"""Turn plain dicts (parsed YAML) into validated dataclasses, collecting every error.

The spec and each job type's config are small dataclasses. This module walks their
fields and type hints, so a spec with five mistakes reports five errors at once, each
naming its YAML path, the bad value and what is allowed:

    scaling.num_workers: -1 must be >= 1
    train.optimzer: unknown key; did you mean 'optimizer'?

Constraints live in field metadata, next to the field they constrain:

    steps: int = field(default=1000, metadata=bounds(ge=1))
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union


class SpecError(ValueError):
    """A spec (or job config) is invalid. `problems` holds one line per problem."""

    def __init__(self, problems: list[str], source: str = "spec"):
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        noun = "problem" if len(self.problems) == 1 else "problems"
        super().__init__(f"{source} has {len(self.problems)} {noun}:\n{lines}")


def bounds(ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None, help: str = "") -> dict:
    """Field metadata for numeric bounds; `help` is appended to the error text."""
    return {"ge": ge, "gt": gt, "le": le, "lt": lt, "help": help}


def _describe(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(_describe(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin in (list, dict):
        return f"a {origin.__name__}"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def _check_bounds(value: Any, meta: dict, path: str, errors: list[str]) -> None:
    help_text = f" ({meta['help']})" if meta.get("help") else ""
    checks = [("ge", ">=", lambda a, b: a >= b), ("gt", ">", lambda a, b: a > b),
              ("le", "<=", lambda a, b: a <= b), ("lt", "<", lambda a, b: a < b)]
    for key, symbol, ok in checks:
        limit = meta.get(key)
        if limit is not None and not ok(value, limit):
            errors.append(f"{path}: {_describe(value)} must be {symbol} {limit}{help_text}")
            return


def convert(hint: Any, value: Any, path: str, errors: list[str]) -> Any:
    """Convert `value` to `hint`, appending problems to `errors` (returns None on failure)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            trial: list[str] = []
            result = convert(arg, value, path, trial)
            if not trial:
                return result
        errors.append(f"{path}: {_describe(value)} is not {_type_name(hint)}")
        return None
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            choices = ", ".join(_describe(a) for a in allowed)
            errors.append(f"{path}: {_describe(value)} is not one of {choices}")
            return None
        return value
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path, errors)
    if origin is list:
        (item_hint,) = typing.get_args(hint) or (Any,)
        if not isinstance(value, (list, tuple)):
            errors.append(f"{path}: {_describe(value)} is not a list")
            return None
        return [convert(item_hint, v, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        key_hint, value_hint = typing.get_args(hint) or (str, Any)
        if not isinstance(value, dict):
            errors.append(f"{path}: {_describe(value)} is not a mapping")
            return None
        return {k: convert(value_hint, v, f"{path}.{k}", errors) for k, v in value.items()}
    return _convert_scalar(hint, value, path, errors)


def _convert_scalar(hint: Any, value: Any, path: str, errors: list[str]) -> Any:
    # bool is an int subclass in Python: `steps: true` must not pass as 1.
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads `1e-3` as a string; accept numeric strings for floats.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"schema: unsupported type hint {hint!r} at {path}")
    errors.append(f"{path}: {_describe(value)} is not {_type_name(hint)}")
    return None


def build(cls: type, data: Any, path: str, errors: list[str]) -> Any:
    """Build dataclass `cls` from mapping `data`; unknown keys get a "did you mean" hint."""
    prefix = f"{path}." if path else ""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append(f"{path or '<top level>'}: expected a mapping, got {_describe(data)}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            errors.append(f"{prefix}{key}: unknown key{_did_you_mean(str(key), list(fields))}")
    kwargs = {}
    for name, field in fields.items():
        if name not in data:
            continue
        before = len(errors)
        value = convert(hints[name], data[name], prefix + name, errors)
        if len(errors) > before:
            continue  # reported; keep the default so later checks still run
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            _check_bounds(value, field.metadata, prefix + name, errors)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        errors.append(f"{path or cls.__name__}: {exc}")
        return None


def _did_you_mean(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return "; known keys: " + ", ".join(sorted(known))


def to_dict(obj: Any) -> Any:
    """A dataclass tree back to plain dicts/lists (what YAML and MLflow params take)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
