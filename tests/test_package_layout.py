"""The package's structure, read from its source (nothing is imported): no import cycles among smile_cli's modules
(imports inside functions counted too), and no private name imported from another module."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_imports() -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """(module -> the smile_cli modules it imports, [(module, imported module, private name)])."""
    modules = {}
    for path in (ROOT / "smile_cli").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph, private = {name: set() for name in modules}, []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("smile_cli"):
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    graph[name].add(submodule if submodule in modules else node.module)
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.append((name, node.module, alias.name))
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in modules)
    return {name: targets & modules.keys() - {name} for name, targets in graph.items()}, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                found.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_no_import_cycles_and_no_private_names_across_modules():
    graph, private = module_imports()
    assert "smile_cli.inputs.experts" in graph and graph["smile_cli.upscale"], sorted(graph)  # the walk found them
    assert cycles(graph) == []
    assert private == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
