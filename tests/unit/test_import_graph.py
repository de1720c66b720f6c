"""The core's import graph, read from the source with `ast` (nothing is imported).

The spec is a leaf (plain dataclasses and YAML: it imports only the schema helpers), the
core never names a family (gentrain_jobs), and the modules that validate, train and
evaluate a job import each other in one direction only. Imports inside functions count;
those under `if TYPE_CHECKING:` do not (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

PLATFORM = Path(__file__).resolve().parents[2] / "platform"
PACKAGE = PLATFORM / "gentrain"
SCHEMA_HELPERS = {"gentrain.schema", "gentrain.specfile", "gentrain.redaction"}
CORE = ("spec", "registry", "strategies", "evaluation", "inference", "validation")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PLATFORM).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports at run time (absolute names; `from a import b` gives a.b
    when a.b is a module of the package, else a)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.add(child.module)
                for alias in child.names:
                    name = f"{child.module}.{alias.name}"
                    if (PLATFORM / Path(*name.split("."))).with_suffix(".py").is_file():
                        found.add(name)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}


def _top(module: str) -> str | None:
    """gentrain.strategies.deepspeed -> strategies; None outside gentrain."""
    parts = module.split(".")
    return parts[1] if parts[0] == "gentrain" and len(parts) > 1 else None


def test_the_spec_imports_only_the_schema_helpers():
    graph = _graph()
    gentrain_imports = {name for name in graph["gentrain.spec"] if name.split(".")[0] == "gentrain"}
    assert gentrain_imports <= SCHEMA_HELPERS, gentrain_imports - SCHEMA_HELPERS
    for helper in SCHEMA_HELPERS:  # and the helpers stay leaves themselves
        others = {name for name in graph[helper] if name.split(".")[0] == "gentrain"}
        assert others <= SCHEMA_HELPERS, (helper, others - SCHEMA_HELPERS)


def test_nothing_under_platform_imports_a_family():
    offenders = {path.relative_to(PLATFORM).as_posix(): sorted(n for n in imports_of(path)
                                                              if n.split(".")[0] == "gentrain_jobs")
                 for path in PLATFORM.rglob("*.py")}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_no_import_cycles_among_the_core_modules():
    edges: dict[str, set[str]] = {name: set() for name in CORE}
    for module, imported in _graph().items():
        source = _top(module)
        if source not in edges:
            continue
        edges[source] |= {target for target in map(_top, imported) if target in edges and target != source}
    cycles = []

    def walk(node: str, trail: list[str]) -> None:
        for target in sorted(edges[node]):
            if target in trail:
                cycles.append(trail[trail.index(target):] + [target])
            elif len(trail) < len(edges):
                walk(target, trail + [target])

    for start in CORE:
        walk(start, [start])
    assert cycles == [], " ; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_parser_sees_function_level_imports_and_skips_type_checking(tmp_path):
    source = tmp_path / "example.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import hidden\n"
                      "def f():\n    from gentrain.registry import get_job_type\n")
    assert imports_of(source) == {"typing", "gentrain.registry"}
