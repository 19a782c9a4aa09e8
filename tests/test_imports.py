"""The import graph of ``align`` and ``data_tools`` has no circle.

Every ``import`` statement counts, at module level or inside a function (a function-level import
only postpones a circle to the first call; it does not remove it). Left out: imports under
``if TYPE_CHECKING:`` (never executed) and ``importlib.import_module`` lookups by name, which is
how a registry such as ``data_tools.cli.SOURCES`` binds late on purpose. A package importing its
own submodules is an ordinary edge; the implicit "a submodule's package is imported first" is not
an edge, so ``pkg/__init__.py`` importing ``pkg.a`` is fine while ``pkg.a`` importing ``pkg`` back
is a circle.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("align", "data_tools")


def package_sources(root: Path, packages=PACKAGES) -> dict[str, tuple[str, bool]]:
    """{dotted module name: (source text, is a package __init__)} for every .py under packages."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            out[".".join(parts)] = (path.read_text(encoding="utf-8"), is_pkg)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node in the tree, skipping the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """{module: modules of ``sources`` it imports}; imports of anything else are ignored."""
    def known(name: str) -> str | None:
        while name and name not in sources:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, (text, is_pkg) in sources.items():
        edges = set()
        for node in _imports(ast.parse(text, filename=mod)):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:                       # relative import
                    here = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    here = here[:len(here) - (node.level - 1)]
                    base = ".".join(here + ([base] if base else []))
                # ``from pkg import sub`` imports the submodule pkg.sub when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in sources else base for a in node.names]
            edges.update(t for t in map(known, targets) if t and t != mod)
        graph[mod] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle as [m0, m1, ..., m0], or None when the graph is acyclic."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    for start in sorted(graph):
        if colour[start] != WHITE:
            continue
        path, its = [start], [iter(sorted(graph[start]))]
        colour[start] = GREY
        while path:
            nxt = next(its[-1], None)
            if nxt is None:
                colour[path.pop()] = BLACK
                its.pop()
            elif colour[nxt] == GREY:
                return path[path.index(nxt):] + [nxt]
            elif colour[nxt] == WHITE:
                colour[nxt] = GREY
                path.append(nxt)
                its.append(iter(sorted(graph[nxt])))
    return None


def test_import_graph_is_acyclic():
    sources = package_sources(REPO)
    assert "data_tools.cli" in sources and "align.adapters.base" in sources
    cycle = find_cycle(import_graph(sources))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


# The shape data_tools had before the circle was broken: base's module_main imported the CLI inside
# the function, the CLI imported the importer inside main(), and the importer -> aggregate -> base
# imports were at module level. The check must see that circle although two of its edges are lazy.
OLD_DATA_TOOLS = {
    "data_tools": ("", True),
    "data_tools.canonical": ("import json\n", False),
    "data_tools.base": ("import sys\nfrom data_tools.canonical import iter_raw\n"
                        "def module_main(name):\n    from data_tools.cli import main\n"
                        "    sys.exit(main([name]))\n", False),
    "data_tools.cli": ("import importlib\nfrom data_tools.canonical import RecordError\n"
                       "def main(argv):\n    from data_tools.base import UsageError\n"
                       "    from data_tools.importer import run\n", False),
    "data_tools.importer": ("from data_tools.aggregate import combine\nfrom data_tools.base import Item\n", False),
    "data_tools.aggregate": ("from data_tools.base import GROUP\n", False),
    "data_tools.alpaca": ("from data_tools.base import Source\n", False),
}


def test_cycle_check_sees_lazy_and_relative_imports():
    cycle = find_cycle(import_graph(OLD_DATA_TOOLS))
    assert cycle is not None and cycle[0] == cycle[-1]
    assert set(cycle) <= {"data_tools.base", "data_tools.cli", "data_tools.importer", "data_tools.aggregate"}

    # a package re-importing itself from a submodule, relative form, inside a function
    pkg = {"p": ("from p import a\n", True), "p.a": ("def f():\n    from . import b\n", False),
           "p.b": ("def g():\n    from . import a\n", False)}
    assert find_cycle(import_graph(pkg)) == ["p.a", "p.b", "p.a"]

    # not edges: TYPE_CHECKING-only imports, importlib lookups, outside packages, the implicit parent
    fine = {"q": ("from q import a, b\n", True),
            "q.a": ("import torch\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from q.b import B\n", False),
            "q.b": ("import importlib\nfrom q.a import x\nM = importlib.import_module('q.a')\n", False)}
    assert find_cycle(import_graph(fine)) is None


def test_stages_are_peers_that_import_only_the_shared_bases_and_no_private_names():
    """PPO, GRPO, RLOO, DPO, SFT and reward stand beside each other: a stage imports from
    align.stages only the shared bases (``online``, ``common``), and never a private name."""
    import ast
    from pathlib import Path
    stages = Path(__file__).resolve().parents[1] / "align" / "stages"
    bad = []
    for path in sorted(stages.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("align.stages"):
                base = node.module.rsplit(".", 1)[-1]
                if base not in ("online", "common"):
                    bad.append(f"{path.name} imports align.stages.{base}")
                bad += [f"{path.name} imports the private {a.name} from {node.module}"
                        for a in node.names if a.name.startswith("_")]
    assert not bad, bad
