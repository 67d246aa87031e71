"""The import structure of src/segscale: one direction, no cycle.

Every import counts, those inside functions too (an import moved into a function still ties the
two modules); only `if TYPE_CHECKING:` blocks, which never run, are left out. An AST walk: nothing
is imported to read the graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "segscale"

# Top to bottom: a module may import its own layer (without a cycle) or any layer below it.
LAYERS: list[set[str]] = [
    {"cli"},
    {"demo", "tune", "repeat", "compare", "methods", "launch", "_forked_worker"},
    {"worker"},
    {"engine", "predict", "export", "report", "zoo"},
    {
        "train",
        "tasks",
        "evaluation",
        "data",
        "checkpoint",
        "tracking",
        "monitor",
        "schedules",
        "optim",
        "losses",
        "models",
        "parallel",
        "repro",
        "guideline",
        "stats",
        "hub",
        "transfer",
    },
    {"config", "registry", "xmlconfig", "imgmed", "segeval"},
    {"errors", "_files", "_progress", "_memory", "__init__"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__") or "__init__"


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path) -> set[str]:
    """The segscale modules that a file imports, as module names relative to the package."""
    found: set[str] = set()
    known = {module_name(p) for p in SRC.rglob("*.py")}

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from segscale.parallel import ghost_batchnorm` names a module or a package's member
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for name in names:
            if name == "segscale" or not name.startswith("segscale."):
                continue
            rel = name.removeprefix("segscale.")
            while rel and rel not in known:
                rel = rel.rpartition(".")[0]
            if rel:
                found.add(rel)
                if isinstance(node, ast.ImportFrom) and rel != node.module.removeprefix(
                    "segscale."
                ):
                    break  # the member is a submodule: the package itself is not needed
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(module_name(path))
    return found


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in SRC.rglob("*.py")}


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"segscale.{module} is in no layer of tests/test_layers.py: place it")


def test_every_module_has_a_layer():
    for module in import_graph():
        layer_of(module)


def test_imports_point_down_or_sideways_never_up():
    upward = [
        f"segscale.{a} → segscale.{b}"
        for a, targets in sorted(import_graph().items())
        for b in sorted(targets)
        if layer_of(b) < layer_of(a) and a.split(".")[0] != b.split(".")[0]
    ]
    assert not upward, "imports from a lower layer up:\n" + "\n".join(upward)


def test_no_import_cycle():
    """Between packages and top-level modules (inside a package, its __init__ gathers members)."""
    graph = import_graph()
    unit = {m: m.split(".")[0] for m in graph}
    edges: dict[str, set[str]] = {}
    for a, targets in graph.items():
        for b in targets:
            if unit[a] != unit[b]:
                edges.setdefault(unit[a], set()).add(unit[b])
    done: set[str] = set()

    def walk(node: str, path: list[str]) -> None:
        if node in path:
            cycle = [*path[path.index(node) :], node]
            pytest.fail("import cycle: " + " → ".join(f"segscale.{m}" for m in cycle))
        if node in done:
            return
        for nxt in sorted(edges.get(node, ())):
            walk(nxt, [*path, node])
        done.add(node)

    for start in sorted(edges):
        walk(start, [])


def test_the_check_sees_function_level_imports(tmp_path, monkeypatch):
    """The walk must not be blind to the imports that once hid the cycle: inside functions."""
    fake = tmp_path / "segscale"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "errors.py").write_text("def f():\n    from segscale.cli import app\n")
    (fake / "cli.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from segscale import engine\n"
    )
    (fake / "engine.py").write_text("")
    monkeypatch.setattr(f"{__name__}.SRC", fake)
    graph = import_graph()
    assert graph["errors"] == {"cli"} and graph["cli"] == set()
    with pytest.raises(AssertionError, match=r"segscale\.errors → segscale\.cli"):
        test_imports_point_down_or_sideways_never_up()
