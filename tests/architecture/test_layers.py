"""The project's layers, read from the source with ``ast`` (nothing is imported):

    surgeon_core (pure torch) <- surgeon (the library) <- tasks, flows (Prefect, MLflow) <- surgeon_cli (commands)

Each layer imports only the ones below it, at module level and inside functions, and the modules import no
circle."""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("surgeon_core", "surgeon", "surgeon_cli", "tasks", "flows")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


SOURCES = _sources()


def _imports(module: str, path: Path) -> list[tuple[str, bool]]:
    """(imported module, inside a function) for every import statement of a module. ``from X import a`` names the
    module ``X.a`` when that is one of the project's modules, else ``X``; relative imports are resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    source = ".".join(base + ([child.module] if child.module else []))
                else:
                    source = child.module
                for alias in child.names:
                    sub = f"{source}.{alias.name}"
                    found.append((sub if sub in SOURCES else source, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


IMPORTS = {module: _imports(module, path) for module, path in SOURCES.items()}


def _top(name: str) -> str:
    return name.split(".")[0]


def _violations(layer: str, forbidden: set[str], *, module_level_only: bool = False) -> list[str]:
    return [f"{module} imports {name}{' (in a function)' if lazy else ''}"
            for module, imports in IMPORTS.items() if _top(module) == layer
            for name, lazy in imports if _top(name) in forbidden and not (module_level_only and lazy)]


def test_the_sources_are_found():
    assert {"surgeon_core.shot", "surgeon.config", "surgeon_cli.main", "tasks.steps", "flows.prune"} <= set(SOURCES)


def test_surgeon_core_imports_only_torch_and_itself():
    assert _violations("surgeon_core", {"surgeon", "surgeon_cli", "flows", "tasks", "transformers", "datasets",
                                        "prefect", "mlflow", "lm_eval"}) == []


def test_the_library_imports_no_command_line_flow_or_tracking():
    assert _violations("surgeon", {"surgeon_cli", "flows", "tasks"}) == []
    assert _violations("surgeon", {"prefect", "mlflow"}, module_level_only=True) == []


def test_tasks_and_flows_never_import_the_command_line():
    assert _violations("tasks", {"surgeon_cli"}) + _violations("flows", {"surgeon_cli"}) == []


def test_only_the_command_line_imports_the_flows():
    importers = {_top(module) for module, imports in IMPORTS.items() for name, _ in imports if _top(name) == "flows"}
    assert importers <= {"flows", "surgeon_cli"}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_module_import_graph_has_no_cycle():
    """Module-level and function-level imports alike: an import hidden in a function is still a dependency."""
    graph = {module: {name for name, _ in imports if name in SOURCES and name != module}
             for module, imports in IMPORTS.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_core_function_is_longer_than_80_lines():
    """surgeon_core reads as the paper's steps: a longer function is split into phases (docstring included)."""
    long = []
    for module, path in SOURCES.items():
        if not module.startswith("surgeon_core"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long
