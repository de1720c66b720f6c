"""The search space of `gentrain sweep`: `--param KEY=DIST`, parsed without eval.

    --param train.optimizer.lr=loguniform(1e-4,1e-2)   # log-uniform float in [a, b)
    --param job.config.beta=uniform(0.5,4)             # uniform float in [a, b)
    --param job.config.latent_dim=randint(4,16)        # integer in [a, b], both ends included
    --param train.optimizer.name=choice(adamw,sgd)     # one of the values, drawn per trial
    --param train.batch_size=grid(16,32,64)            # every value, each in its own trials

Numbers are read with float()/int() (finite only); choice/grid values with the same
strict YAML scalar reading as `key=value` overrides (`true`, `3e-4`, `adamw`, `"a,b"`).
KEY is a spec path as in overrides; whether the values suit the field is for the spec's
validation to say (gentrain.sweep.run checks every value before a trial starts).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from gentrain.redaction import describe
from gentrain.specfile import YAMLProblem, load_yaml

KINDS = ("loguniform", "uniform", "randint", "choice", "grid")
_EXAMPLES = {
    "loguniform": "loguniform(1e-4,1e-2)",
    "uniform": "uniform(0.5,4)",
    "randint": "randint(4,16)",
    "choice": "choice(adamw,sgd)",
    "grid": "grid(16,32,64)",
}
_FORM = re.compile(r"^\s*([A-Za-z_]+)\s*\((.*)\)\s*$", re.S)
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")
MAX_VALUES = 1000  # choice/grid values of one param


class ParamError(ValueError):
    """A --param that cannot be read; the message names the param and the fix."""


@dataclass(frozen=True)
class SweepParam:
    key: str  # the spec path, e.g. train.optimizer.lr
    kind: str  # one of KINDS
    values: tuple  # (low, high) for the ranges, the values for choice/grid
    text: str  # as written: logged to the parent MLflow run

    def to_tune(self):
        """Ray Tune's domain for this param."""
        from ray import tune

        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "randint":
            return tune.randint(self.values[0], self.values[1] + 1)  # Tune's upper end is excluded
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return tune.grid_search(list(self.values))

    def edge_values(self) -> list:
        """The values validation tries before any trial: both ends of a range, every listed value."""
        return list(dict.fromkeys(self.values))


def parse_param(text: str) -> SweepParam:
    """`KEY=DIST` -> SweepParam; ParamError naming the param and the fix."""
    key, sep, dist = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ParamError(f"--param {describe(text)}: expected KEY=DIST, e.g. "
                         f"--param train.optimizer.lr={_EXAMPLES['loguniform']}")
    if not _KEY.match(key):
        raise ParamError(f"--param {describe(key)}: not a spec path; write the field as in "
                         "overrides, e.g. train.optimizer.lr or job.config.beta")
    match = _FORM.match(dist)
    if not match:
        raise ParamError(f"--param {key}: {describe(dist)} is not a distribution; write one of "
                         f"{', '.join(_EXAMPLES.values())} (a fixed value is an override: {key}=VALUE)")
    kind, body = match.group(1), match.group(2)
    if kind not in KINDS:
        raise ParamError(f"--param {key}: unknown distribution {kind!r}; known: {', '.join(KINDS)}, "
                         f"e.g. {_EXAMPLES['loguniform']}")
    items = _split(body, key)
    if kind in ("choice", "grid"):
        return SweepParam(key, kind, _listed(items, key, kind), f"{kind}({body})")
    if len(items) != 2:
        raise ParamError(f"--param {key}: {kind} takes two bounds (low,high), got {len(items)}; "
                         f"e.g. {_EXAMPLES[kind]}")
    if kind == "randint":
        low, high = (_integer(item, key, kind) for item in items)
        if low > high:
            raise ParamError(f"--param {key}: randint({low},{high}) has low > high; write "
                             f"randint({high},{low})")
    else:
        low, high = (_number(item, key, kind) for item in items)
        if not low < high:
            raise ParamError(f"--param {key}: {kind}({items[0]},{items[1]}) needs low < high; "
                             f"write {kind}({min(low, high)!r},{max(low, high)!r}), or an override "
                             f"{key}={low!r} for one value")
        if kind == "loguniform" and low <= 0:
            raise ParamError(f"--param {key}: loguniform bounds must be > 0 (got {low!r}); use "
                             f"uniform({low!r},{high!r}) for a range that includes 0 or negatives")
    return SweepParam(key, kind, (low, high), f"{kind}({body})")


def parse_params(texts: list[str]) -> list[SweepParam]:
    """Every --param, all problems at once (ParamError); a key given twice is an error."""
    params, problems, seen = [], [], set()
    for text in texts:
        try:
            param = parse_param(text)
        except ParamError as exc:
            problems.append(str(exc))
            continue
        if param.key in seen:
            problems.append(f"--param {param.key}: given twice; keep one")
            continue
        seen.add(param.key)
        params.append(param)
    if problems:
        raise ParamError("\n".join(problems))
    return params


def _split(body: str, key: str) -> list[str]:
    """Comma-separated items; commas inside quotes or brackets stay in their item."""
    items, current, depth, quote = [], [], 0, None
    for char in body:
        if quote:
            current.append(char)
            if char == quote:
                quote = None
        elif char in "\"'":
            quote = char
            current.append(char)
        elif char in "[{":
            depth += 1
            current.append(char)
        elif char in "]}":
            depth -= 1
            current.append(char)
        elif char == "," and depth == 0:
            items.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    if quote or depth:
        raise ParamError(f"--param {key}: unbalanced quote or bracket in {describe(body)}")
    items.append("".join(current).strip())
    if any(not item for item in items):
        raise ParamError(f"--param {key}: an empty value in ({body}); separate values with single commas")
    return items


def _number(item: str, key: str, kind: str) -> float:
    try:
        value = float(item)
    except ValueError:
        raise ParamError(f"--param {key}: {kind} bound {describe(item)} is not a number; "
                         f"e.g. {_EXAMPLES[kind]}") from None
    if not math.isfinite(value):
        raise ParamError(f"--param {key}: {kind} bound {item!r} is not finite; give finite bounds")
    return value


def _integer(item: str, key: str, kind: str) -> int:
    try:
        return int(item)
    except ValueError:
        raise ParamError(f"--param {key}: randint bound {describe(item)} is not an integer; "
                         f"e.g. {_EXAMPLES['randint']}") from None


def _listed(items: list[str], key: str, kind: str) -> tuple:
    if len(items) > MAX_VALUES:
        raise ParamError(f"--param {key}: {len(items)} values; at most {MAX_VALUES}")
    values: list[Any] = []
    for item in items:
        try:
            value = load_yaml(item)
        except YAMLProblem as exc:
            raise ParamError(f"--param {key}: value {describe(item)}: {exc.problem}; quote a string "
                             "value, e.g. choice(\"a b\",c)") from None
        if isinstance(value, str) and item[:1] not in "\"'" and _NUMBER.match(item):
            value = float(item)  # YAML 1.1 reads 1e-4 as a string; a number is meant
        if isinstance(value, float) and not math.isfinite(value):
            raise ParamError(f"--param {key}: value {item!r} is not finite")
        values.append(value)
    if len({repr(value) for value in values}) != len(values):
        raise ParamError(f"--param {key}: {kind}({', '.join(items)}) lists a value twice; list each once")
    return tuple(values)
