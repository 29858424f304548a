"""No import circles between the project's modules (issue 18 §4).

The graph is read statically (``ast``), so it sees every import: module level,
function level and under ``if TYPE_CHECKING:`` alike — a circle hidden behind a lazy
import is still two modules that cannot be understood (or moved) one without the other.
An edge ``a -> b`` means module ``a`` imports module ``b`` (or a name from it); importing
``pkg.sub`` also runs the ``__init__`` of every package above ``sub`` that is not above ``a``.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "orchestrator", "analysis")


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the checked packages (``pkg/__init__.py`` -> ``pkg``)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _targets(node: ast.AST, name: str, is_pkg: bool, mods: dict) -> list[str]:
    """Our modules an import statement in module ``name`` names (``from x import y``: ``x.y``
    when that is a module, else ``x``); an outside module gives nothing."""
    if isinstance(node, ast.Import):
        wanted = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative import
            here = name.split(".") if is_pkg else name.split(".")[:-1]
            here = here[: len(here) - (node.level - 1)]
            base = ".".join(here + ([base] if base else []))
        wanted = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    out = []
    for target in wanted:
        parts = target.split(".")
        while parts and ".".join(parts) not in mods:  # `import a.b.c` of a name inside module a.b
            parts.pop()
        if parts:
            out.append(".".join(parts))
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _targets(node, name, path.name == "__init__.py", mods):
                if target != name:
                    graph[name].add(target)
                # the packages above the target that are not above the importer run their __init__
                parts = target.split(".")
                for i in range(1, len(parts)):
                    pkg = ".".join(parts[:i])
                    if pkg in mods and not name.startswith(pkg + "."):
                        graph[name].add(pkg)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """(one shortest circle, all its modules) for each strongly connected component of more than one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    comps: list[list[str]] = []
    for root in sorted(graph):  # Tarjan, iterative (no recursion limit on long chains)
        if root in index:
            continue
        index[root] = low[root] = len(index)
        stack.append(root)
        work = [(root, iter(sorted(graph[root])))]
        while work:
            node, succ = work[-1]
            for w in succ:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in stack:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = stack[stack.index(node):]
                    del stack[stack.index(node):]
                    if len(comp) > 1:
                        comps.append(sorted(comp))
    return [(_shortest_circle(graph, comp), comp) for comp in comps]


def _shortest_circle(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """Breadth-first from the component's first module back to itself, inside the component."""
    members, start = set(comp), comp[0]
    prev: dict[str, str | None] = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            if start in graph[v]:
                path = [v]
                while prev[path[0]] is not None:
                    path.insert(0, prev[path[0]])
                return path + [start]
            for w in sorted(graph[v] & members):
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no circle through {start}")


def _describe(found, witness=None) -> str:
    lines = []
    for path, comp in found:
        via = f"  ({'; '.join(witness[e] for e in zip(path, path[1:]))})" if witness else ""
        rest = f"  [all {len(comp)} modules of this knot: {', '.join(comp)}]" if len(comp) > len(path) - 1 else ""
        lines.append("  " + " -> ".join(path) + via + rest)
    return "\n".join(lines)


def test_the_graph_sees_lazy_and_type_checking_imports():
    graph = import_graph()
    assert "core.config" in graph and "orchestrator.cli" in graph and "analysis" in graph
    # orchestrator.watch imports the cost module inside a function only
    assert "orchestrator.cost" in graph["orchestrator.watch"]
    # a made-up module graph with a circle
    fake = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(fake) == [(["a", "b", "c", "a"], ["a", "b", "c"])]


def test_no_import_circles():
    found = cycles(import_graph())
    assert not found, "import circles:\n" + _describe(found)


def test_no_circles_between_the_top_level_packages():
    # core imports neither of the others; orchestrator and analysis must not import each other both ways
    packages: dict[str, set[str]] = {p: set() for p in PACKAGES}
    witness: dict[tuple[str, str], str] = {}
    for a, targets in import_graph().items():
        for b in targets:
            pa, pb = a.split(".")[0], b.split(".")[0]
            if pa != pb:
                packages[pa].add(pb)
                witness.setdefault((pa, pb), f"{a} -> {b}")
    found = cycles(packages)
    assert not found, "package circles:\n" + _describe(found, witness)
