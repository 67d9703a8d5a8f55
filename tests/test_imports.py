"""The package's import graph has no cycle, and no project import hides inside a function to dodge one.

Read from the source with `ast` (nothing is imported): module-level imports between the project's packages form
the graph; a cycle in it fails the test with the modules on it. Imports inside functions are allowed only for
optional third-party packages (heavy or not always installed), never for the project's own modules."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("bench", "samplers", "estimators", "objectives")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for root in ROOTS for p in (REPO / root).rglob("*.py")}


class ImportVisitor(ast.NodeVisitor):
    """Project modules imported at module level and inside functions, resolved against the known modules."""

    def __init__(self, known: set[str], here: str):
        self.known, self.here, self.depth = known, here, 0
        self.top: set[str] = set()
        self.inner: set[str] = set()

    def _targets(self, node: ast.Import | ast.ImportFrom) -> set[str]:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative import
                pkg = self.here.split(".")[: -node.level] if not self.here.endswith("__init__") else self.here.split(".")
                base = ".".join([*pkg, base] if base else pkg)
            names = [base, *(f"{base}.{a.name}" for a in node.names)]
        return {n for n in names if n in self.known and n != self.here}

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node: ast.Import) -> None:
        (self.inner if self.depth else self.top).update(self._targets(node))

    visit_ImportFrom = visit_Import


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    mods = project_modules()
    top, inner = {}, {}
    for name, path in mods.items():
        v = ImportVisitor(set(mods), name)
        v.visit(ast.parse(path.read_text()))
        top[name], inner[name] = v.top, v.inner
    return top, inner


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle() -> None:
    top, _ = import_graph()
    assert len(top) > 50
    assert cycles(top) == []


def test_no_project_import_inside_a_function() -> None:
    _, inner = import_graph()
    hidden = {m: sorted(t) for m, t in inner.items() if t}
    assert hidden == {}, f"project modules imported inside functions (a dodged cycle?): {hidden}"
