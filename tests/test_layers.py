"""unipers imports one way: each layer may use the layers below it, never one above, and no two modules
import each other (directly or round a loop). Imports inside functions count too: a lazy import is still a
dependency, only a later one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "unipers"

# Lowest first. A module belongs to the longest prefix listed; `unipers.world` is the showcase on top.
LAYERS = [
    ("unipers.version", "unipers.errors", "unipers.paths", "unipers.io", "unipers.safetensors_checks",
     "unipers.runtime", "unipers.schema", "unipers.config"),
    ("unipers.concepts",),
    ("unipers.models",),
    ("unipers.data",),
    ("unipers.training", "unipers.inference"),
    ("unipers.eval",),
    ("unipers.launch",),
    ("unipers.cli", "unipers"),
    ("unipers.world",),
]


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, source: str | None = None) -> set[str]:
    """The unipers modules `path` imports; ``from unipers import __version__`` is the version module."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(source if source is not None else path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "unipers"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "unipers":
                continue
            if target == "unipers" and {a.name for a in node.names} == {"__version__"}:
                target = "unipers.version"
            out.add(target)
    out.discard(name)
    return out


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_module_imports_from_a_layer_above_it():
    upward = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
              for m, targets in graph().items() for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles():
    g = graph()
    modules = set(g)
    # A package's __init__ is imported with any of its modules, so `a.b -> a` is no edge of a loop.
    edges = {m: {t for t in ts if t in modules and not m.startswith(t + ".")} for m, ts in g.items()}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("text,expected", [
    ("from unipers.world.build import build_world\n", "unipers.world.build"),
    ("def f():\n    from ..training import align\n", "unipers.training"),
])
def test_the_walk_sees_top_level_relative_and_function_level_imports(text, expected):
    found = imports_of(PACKAGE / "models" / "x.py", text)
    assert expected in found and layer_of(expected) > layer_of("unipers.models.x")
