"""The package's imports run one way: no module imports one that (directly or not) imports it back, and no room
(a top-level module or subpackage of slimcnn) imports a room that imports it back. Every import counts: module
level, inside a function (lazy), and under ``TYPE_CHECKING``.

Why: a circle means neither side can be read, tested or replaced alone, and a lazy import that runs back up hides
it until some call path trips over a half-initialised module.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "slimcnn"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom, known: dict[str, Path]) -> set[str]:
    """The slimcnn modules an import statement loads (``from .pkg import name`` loads ``pkg.name`` when that is a
    module, else ``pkg``)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
            if node.level else (node.module or "")
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    out = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name.startswith("slimcnn") and name != module:
            out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    known = _modules()
    graph = {}
    for module, path in known.items():
        tree = ast.parse(path.read_text())
        graph[module] = set().union(*(_targets(module, path, n, known) for n in ast.walk(tree)
                                      if isinstance(n, (ast.Import, ast.ImportFrom))))
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def room(module: str) -> str | None:
    """``slimcnn.graph.groups`` -> ``graph``; the package's own ``__init__`` (the public API, on top) -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    found = circles(graph)
    why = ["; ".join(f"{a} -> {b}" for a in c for b in sorted(graph[a]) if b in c) for c in found]
    assert not found, "import circles: " + " | ".join(why)


#: the package's rooms from the bottom up; a room imports only rooms on lower floors (written once, here)
FLOORS: list[set[str]] = [
    {"inputs", "outputs"},  # what a model takes and returns: torch only
    {"backends", "layer_specs", "metrics", "profile", "progress", "quantize"},  # leaves: torch only
    {"data", "distill", "graph", "report"},
    {"importance", "layers"},
    {"models"},
    {"gating", "io"},
    {"engine"},
    {"methods"},
    {"compress", "latency_fit"},
    {"bench"},
    {"bench_latency"},
    {"commands"},
    {"cli"},
    {"__main__"},
]


def test_every_import_runs_down_the_floors():
    floor = {r: i for i, rooms in enumerate(FLOORS) for r in rooms}
    graph = import_graph()
    rooms = {room(m) for m in graph} - {None}
    assert rooms <= set(floor), f"rooms on no floor (add them to FLOORS): {sorted(rooms - set(floor))}"
    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                    if room(a) and room(b) and room(a) != room(b) and floor[room(b)] >= floor[room(a)])
    assert not upward, "imports that do not run down the floors: " + "; ".join(upward)


def test_no_room_imports_a_room_that_imports_it_back():
    rooms: dict[str, set[str]] = {}
    edges: dict[tuple[str, str], list[str]] = {}
    for a, targets in import_graph().items():
        ra = room(a)
        if ra is None:
            continue
        rooms.setdefault(ra, set())
        for b in targets:
            rb = room(b)
            if rb is not None and rb != ra:
                rooms[ra].add(rb)
                edges.setdefault((ra, rb), []).append(f"{a} -> {b}")
    found = circles(rooms)
    why = [", ".join(e for (x, y), es in sorted(edges.items()) if x in c and y in c for e in es) for c in found]
    assert not found, "rooms importing each other: " + " | ".join(why)


def test_the_check_sees_a_lazy_import_and_a_circle():
    """The checker itself: a lazy import counts, and a two-module circle is found."""
    assert circles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    graph = import_graph()
    assert "slimcnn.graph.latency" in graph["slimcnn.latency_fit"]  # a module-level import
    assert "slimcnn.compress" in graph["slimcnn.commands.compress"]  # imported inside run()
