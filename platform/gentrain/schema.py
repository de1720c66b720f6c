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
import enum
import math
import pathlib
import re
import types
import typing
from typing import Any, Literal, Union

from gentrain.redaction import describe, redact

MAX_INT = 2**63 - 1  # what every consumer (torch, numpy, JSON readers, MLflow) still holds
MAX_PROBLEMS_SHOWN = 50
SUPPORTED_TYPES = ("bool, int, float, str, Any, pathlib.Path, an Enum, Literal[...], X | None, "
                   "list[X], tuple[X, Y], tuple[X, ...], dict[str, X] and nested dataclasses")
_SEXAGESIMAL = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")


class SpecError(ValueError):
    """A spec (or job config) is invalid. `problems` holds one line per problem.

    Every line is redacted (`gentrain.redaction`), so no message shows a URL's credentials.
    """

    def __init__(self, problems: list[str], source: str = "spec"):
        self.problems = [_cut(redact(p)) for p in problems]
        self.source = redact(source)
        shown = self.problems[:MAX_PROBLEMS_SHOWN]
        lines = "\n".join(f"  - {p}" for p in shown)
        if len(self.problems) > len(shown):
            lines += f"\n  ... and {len(self.problems) - len(shown)} more"
        noun = "problem" if len(self.problems) == 1 else "problems"
        super().__init__(f"{self.source} has {len(self.problems)} {noun}:\n{lines}")


def _cut(problem: str, limit: int = 2000) -> str:
    # Values are cut where messages are written; this bounds a job type's own messages too.
    return problem if len(problem) <= limit else f"{problem[:limit]}... ({len(problem)} chars)"


def bounds(ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None, help: str = "", evaluation: bool = False) -> dict:
    """Field metadata for numeric bounds; `help` is appended to the error text. `evaluation`:
    a job.config field that changes only how a trained model is evaluated, never the
    network or its training (`gentrain eval --config KEY=VALUE` may change it)."""
    return {"ge": ge, "gt": gt, "le": le, "lt": lt, "help": help, **({"evaluation": True} if evaluation else {})}


def required(help: str) -> dict:
    """Field metadata for a field without a default: `help` says what to write."""
    return {"required": help}


_describe = describe


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(_describe(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
    if origin in (list, dict):
        return f"a {origin.__name__}"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(_describe(m.value) for m in hint)
    if isinstance(hint, type) and issubclass(hint, pathlib.PurePath):
        return "a path"
    return getattr(hint, "__name__", str(hint))


def unsupported_hint(hint: Any) -> Any:
    """The part of type hint `hint` the schema cannot convert, or None when it all can."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in (Any, bool, int, float, str, list, tuple, dict, type(None)) or origin is Literal:
        return None
    if dataclasses.is_dataclass(hint):
        return None
    if isinstance(hint, type) and issubclass(hint, (enum.Enum, pathlib.PurePath)):
        return None
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return unsupported_hint(args[0])
    if origin is dict and args and args[0] is not str:
        return hint  # YAML keys a user writes are strings
    if origin in (Union, types.UnionType, list, tuple, dict):
        return next((bad for bad in map(unsupported_hint, args) if bad is not None), None)
    return hint


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
            plain_mismatch = [f"{path}: {_describe(value)} is not {_type_name(arg)}"]
            if len(args) <= 2 and trial != plain_mismatch:
                errors.extend(trial)  # X | None: X's own message (range, items) says more
                return None
        errors.append(f"{path}: {_describe(value)} is not {_type_name(hint)}")
        return None
    if origin is Literal:
        allowed = typing.get_args(hint)
        if not _hashable(value) or value not in allowed:
            choices = ", ".join(_describe(a) for a in allowed)
            errors.append(f"{path}: {_describe(value)} is not one of {choices}")
            return None
        return value
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path, errors)
    if origin in (list, tuple) or hint in (list, tuple):
        return _convert_sequence(hint, value, path, errors)
    if origin is dict or hint is dict:
        key_hint, value_hint = typing.get_args(hint) or (str, Any)
        if not isinstance(value, dict):
            errors.append(f"{path}: {_describe(value)} is not a mapping")
            return None
        converted = {}
        for key, item in value.items():
            if not isinstance(key, str):
                errors.append(f"{path}: key {_describe(key)} is not a string; quote it")
                continue
            converted[key] = convert(value_hint, item, f"{path}.{key}", errors)
        return converted
    return _convert_scalar(hint, value, path, errors)


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _convert_sequence(hint: Any, value: Any, path: str, errors: list[str]) -> Any:
    """list[X] -> list; tuple[X, Y] (exact length) and tuple[X, ...] -> tuple, from YAML lists."""
    args = typing.get_args(hint)
    if not isinstance(value, (list, tuple)):
        errors.append(f"{path}: {_describe(value)} is not {_type_name(hint)}")
        return None
    if typing.get_origin(hint) is list or hint is list:
        item_hints = [args[0] if args else Any] * len(value)
    elif not args or (len(args) == 2 and args[1] is Ellipsis):
        item_hints = [args[0] if args else Any] * len(value)
    else:
        if len(value) != len(args):
            errors.append(f"{path}: {_describe(value)} has {len(value)} items; expected "
                          f"{_type_name(hint)}, e.g. {_describe([_example(a) for a in args])}")
            return None
        item_hints = list(args)
    items = [convert(h, v, f"{path}[{i}]", errors) for i, (h, v) in enumerate(zip(item_hints, value))]
    return items if typing.get_origin(hint) is list or hint is list else tuple(items)


def _example(hint: Any) -> Any:
    return {int: 1, float: 1.0, bool: True, str: "a"}.get(hint, "...")


def _convert_scalar(hint: Any, value: Any, path: str, errors: list[str]) -> Any:
    # bool is an int subclass in Python: `steps: true` must not pass as 1.
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > MAX_INT:
                errors.append(f"{path}: {_describe(value)} is out of range; integers in a spec are "
                              f"at most 2**63-1 in size ({MAX_INT:.2e})")
                return None
            return value
    elif hint is float:
        number = _to_float(value)
        if number is not None:
            if not math.isfinite(number):
                errors.append(f"{path}: {_describe(value)} is not a finite number; write a finite "
                              "value (or null where the field allows it)")
                return None
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
    elif isinstance(hint, type) and issubclass(hint, enum.Enum):
        for member in hint:
            if _hashable(value) and value in (member.value, member.name):
                return member
    elif isinstance(hint, type) and issubclass(hint, pathlib.PurePath):
        if isinstance(value, str) and value and "\x00" not in value:
            return hint(value)
    else:
        errors.append(f"{path}: type {_hint_text(hint)} is not supported in a spec; use {SUPPORTED_TYPES}")
        return None
    hint_text = ""
    if hint in (int, float) and isinstance(value, str) and _SEXAGESIMAL.match(value):
        hint_text = " (YAML 1.1 would read it as a base-60 number; gentrain does not: write the number itself)"
    errors.append(f"{path}: {_describe(value)} is not {_type_name(hint)}{hint_text}")
    return None


def _to_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, int):
            return float(value)
        if isinstance(value, float):
            return value
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` as a string
            return float(value)
    except (ValueError, OverflowError):
        return None
    return None


def _hint_text(hint: Any) -> str:
    text = getattr(hint, "__name__", None) if isinstance(hint, type) else None
    return text or str(hint).replace("typing.", "")


def build(cls: type, data: Any, path: str, errors: list[str]) -> Any:
    """Build dataclass `cls` from mapping `data`; unknown keys get a "did you mean" hint."""
    prefix = f"{path}." if path else ""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append(f"{path or '<top level>'}: expected a mapping, got {_describe(data)}")
        return None
    try:
        hints = typing.get_type_hints(cls)
    except Exception as exc:  # noqa: BLE001 - a job type's config class with a broken hint
        errors.append(f"{path or cls.__name__}: cannot read the type hints of {cls.__qualname__} "
                      f"({type(exc).__name__}: {exc}); fix the config class")
        return None
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            errors.append(f"{prefix}{_describe(key) if not isinstance(key, str) else key}: unknown key"
                          f"{_did_you_mean(str(key), list(fields))}")
    kwargs, complete = {}, True
    for name, field in fields.items():
        bad = unsupported_hint(hints[name])
        if bad is not None:
            errors.append(f"{prefix}{name}: type {_hint_text(bad)} (in {cls.__qualname__}) is not "
                          f"supported in a spec; use {SUPPORTED_TYPES}")
            complete = False
            continue
        no_default = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if no_default and data.get(name) is None:
            help_text = field.metadata.get("required", "")
            errors.append(f"{prefix}{name}: missing" + (f"; {help_text}" if help_text else ""))
            complete = False
            continue
        if name not in data:
            continue
        before = len(errors)
        value = convert(hints[name], data[name], prefix + name, errors)
        if len(errors) > before:
            complete = complete and not no_default
            continue  # reported; keep the default so later checks still run
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            _check_bounds(value, field.metadata, prefix + name, errors)
        kwargs[name] = value
    if not complete:
        return None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        errors.append(f"{path or cls.__name__}: {redact(str(exc))[:500]}")
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
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, pathlib.PurePath):
        return str(obj)
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
