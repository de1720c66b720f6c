"""Reading spec YAML strictly: safe, bounded, and every surprise an error with its line.

    from gentrain.specfile import read_spec_file
    data = read_spec_file(Path("jobs/gentrain_jobs/vae/specs/debug.yaml"))

On top of `yaml.SafeLoader` (which never constructs Python objects):

- a duplicate key is an error (PyYAML keeps the last one silently);
- `1:30` stays the string '1:30' (YAML 1.1 reads it as 90, base 60);
- a value that cannot be constructed (`!!int notanint`, a 5,000-digit integer) names its line;
- absurd documents are refused before they are built: files over 10 MB, nesting deeper
  than 50 levels, or more than 100,000 values once aliases are expanded (a 449-byte
  "billion laughs" expands to billions).

`key=value` overrides go through the same loader (`load_yaml`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from gentrain.redaction import describe
from gentrain.schema import SpecError

MAX_FILE_BYTES = 10 * 2**20
MAX_DEPTH = 50
MAX_VALUES = 100_000  # nodes once aliases are expanded
MAX_TEXT = 10 * 2**20  # characters of scalars once aliases are expanded

EMPTY_SPEC = ("the spec file is empty; a spec needs at least `job.type`, e.g.\n"
              "      job:\n        type: vae\n"
              "    (`gentrain list` shows the job types; bundled specs such as vae/debug are complete examples)")


class YAMLProblem(Exception):
    """A spec's YAML cannot be used: `problem`, at 1-based `line` and `column` when known."""

    def __init__(self, problem: str, line: int | None = None, column: int | None = None):
        self.problem, self.line, self.column = problem, line, column
        super().__init__(self.where() + problem)

    def where(self) -> str:
        return f"line {self.line}, column {self.column}: " if self.line else ""


class _Refused(yaml.MarkedYAMLError):
    """Valid YAML that gentrain refuses (its message says why, without 'not valid YAML')."""


_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_MERGE = "tag:yaml.org,2002:merge"


class StrictLoader(yaml.SafeLoader):
    """SafeLoader without sexagesimal numbers, duplicate keys or unbounded documents."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._paths: dict[int, str] = {}  # id(node) -> its spec path, for messages

    def compose_node(self, parent, index):
        # The composer recurses once per level: refuse long before Python's recursion limit.
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(None, None, f"nesting deeper than {MAX_DEPTH} levels; a spec is a few "
                               "levels deep (sections, then fields)", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        if node is not None:
            _check_expanded_size(node)
            self._paths = _node_paths(node)
        return node

    def _at(self, node) -> str:
        path = self._paths.get(id(node))
        return f"{path}: " if path else ""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):
            first_seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE:
                    continue  # `<<: *base` overriding keys is what merges are for
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = first_seen.setdefault(key, key_node.start_mark)
                except TypeError:
                    continue  # unhashable: the base class reports it
                if earlier is not key_node.start_mark:
                    parent = self._paths.get(id(node))
                    where = f"{parent}.{key}" if parent else str(key)
                    raise _Refused(None, None, f"{where[:120]}: duplicate key (first at line "
                                   f"{earlier.line + 1}); YAML would silently keep only the last: "
                                   "remove one of them", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, OverflowError) as exc:
            # e.g. `!!int notanint`, or more digits than Python converts (4,300)
            tag = node.tag.rpartition(":")[2]
            reason = str(exc).split(";")[0].split(": value has")[0]
            raise _Refused(None, None, f"{self._at(node)}{describe(node.value)} cannot be read as "
                           f"!!{tag} ({reason}); "
                           "write a plain value a spec field takes, or quote it to make it a string",
                           node.start_mark) from None


def _without_sexagesimal() -> dict:
    resolvers = {first: [(tag, regexp) for tag, regexp in pairs if tag not in (_INT, _FLOAT)]
                 for first, pairs in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    # PyYAML's own patterns, minus the base-60 alternatives (`1:30` -> 90).
    number_resolvers = [
        (_FLOAT, re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
                            |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
                            |[-+]?\.(?:inf|Inf|INF)
                            |\.(?:nan|NaN|NAN))$""", re.X), "-+0123456789."),
        (_INT, re.compile(r"""^(?:[-+]?0b[0-1_]+
                          |[-+]?0[0-7_]+
                          |[-+]?(?:0|[1-9][0-9_]*)
                          |[-+]?0x[0-9a-fA-F_]+)$""", re.X), "-+0123456789"),
    ]
    for tag, regexp, firsts in number_resolvers:
        for first in firsts:
            resolvers.setdefault(first, []).append((tag, regexp))
    return resolvers


StrictLoader.yaml_implicit_resolvers = _without_sexagesimal()


def _check_expanded_size(root) -> None:
    """Refuse a document whose aliases expand it beyond MAX_VALUES nodes or MAX_TEXT chars."""
    sizes: dict[int, tuple[int, int]] = {}
    open_nodes: set[int] = set()

    def size(node) -> tuple[int, int]:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise _Refused(None, None, "an alias refers to a collection that contains it (a recursive "
                           "structure); a spec is a tree: repeat the values instead", node.start_mark)
        open_nodes.add(key)
        values, text = 1, len(node.value) if isinstance(node, ScalarNode) else 0
        if isinstance(node, SequenceNode):
            children = node.value
        elif isinstance(node, MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = []
        for child in children:
            child_values, child_text = size(child)
            values, text = values + child_values, text + child_text
            if values > MAX_VALUES or text > MAX_TEXT:
                raise _Refused(None, None, f"the document expands to more than {MAX_VALUES:,} values or "
                               f"{MAX_TEXT // 2**20} MB of text once its aliases (*name) are expanded; a "
                               "spec has a few hundred values: remove the repeated aliases", node.start_mark)
        open_nodes.discard(key)
        sizes[key] = (values, text)
        return sizes[key]

    size(root)


def _node_paths(root) -> dict[int, str]:
    """Spec paths (`train.steps`, `eval.metrics[1]`) of a composed document's nodes."""
    paths: dict[int, str] = {}
    pending = [(root, "")]
    while pending:
        node, path = pending.pop()
        if id(node) in paths:
            continue  # an alias: named by its first path
        paths[id(node)] = path
        if isinstance(node, SequenceNode):
            pending += [(child, f"{path}[{i}]") for i, child in enumerate(node.value)]
        elif isinstance(node, MappingNode):
            for key, child in node.value:
                name = key.value[:60] if isinstance(key, ScalarNode) else "?"
                pending.append((child, f"{path}.{name}" if path else str(name)))
    return paths


def load_yaml(text: str) -> Any:
    """Parse one YAML document with StrictLoader; raise YAMLProblem naming the line."""
    loader = StrictLoader(text)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "not valid YAML"
        if not isinstance(exc, _Refused):
            problem = f"not valid YAML: {problem}"
            if exc.context and exc.problem:
                problem += f" ({exc.context})"
        line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
        raise YAMLProblem(problem, line, column) from None
    except yaml.YAMLError as exc:
        raise YAMLProblem(f"not valid YAML: {exc}") from None
    except RecursionError:  # a guard above should make this unreachable
        raise YAMLProblem(f"nesting deeper than {MAX_DEPTH} levels") from None
    finally:
        loader.dispose()


def read_spec_file(path: Path) -> dict:
    """The top-level mapping of the spec file at `path`; SpecError naming the file otherwise."""
    source = str(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise SpecError([f"cannot read the file: {exc.strerror or exc}"], source) from None
    if len(raw) > MAX_FILE_BYTES:
        raise SpecError([f"the file is over {MAX_FILE_BYTES // 2**20} MB; a spec is a few KB of YAML "
                         "(data goes in data.source, not in the spec)"], source)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError([f"not a UTF-8 text file (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); "
                         "a spec is a YAML text file: save it as UTF-8"], source) from None
    if "\x00" in text:
        raise SpecError([f"contains NUL bytes (first at byte {raw.index(0)}): a binary file, not a "
                         "YAML spec; give the spec's .yaml file"], source)
    try:
        data = load_yaml(text)
    except YAMLProblem as exc:
        raise SpecError([str(exc)], source) from None
    if data is None:
        raise SpecError([EMPTY_SPEC], source)
    if not isinstance(data, dict):
        raise SpecError([f"the top level is {describe(data)}; it must be a mapping of sections "
                         "(name:, job:, train:, ...)"], source)
    return data
