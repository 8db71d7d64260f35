"""The project's rooms: no import circle between its modules, and no core module over 400 lines.

The graph is read from the source with ast (nothing is imported): every ``import`` and
``from ... import`` of a project module, at module level or inside a function, is an edge. An
import inside a function runs later than one at the top, but a circle of them still means two
modules that each need the other, which is what this guards against.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fngd_plugin", "slurm", "analysis", "timm_ext", "fairseq_ext")
MAX_CORE_LINES = 400


def project_modules(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the packages (a package is its __init__)."""
    modules = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that ``name`` (at ``path``) imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # "from pkg import mod" imports the module pkg.mod; "from mod import name" imports mod
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                       for alias in node.names]
        else:
            continue
        for target in targets:
            # "import a.b.c" of a project module a.b.c; of a name outside the project, its nearest
            # project ancestor (none for torch, os, ...)
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if not target or target == name:
                continue
            found.add(target)
            # importing a.b.c runs a/__init__ and a/b/__init__ first, unless the importer is
            # inside them (then they are already running)
            parts = target.split(".")
            for i in range(1, len(parts)):
                ancestor = ".".join(parts[:i])
                if ancestor in modules and not (name == ancestor or name.startswith(ancestor + ".")):
                    found.add(ancestor)
    return found


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    modules = project_modules(root, packages)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path [a, b, ..., a], or None (depth-first search, in name order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_circle():
    graph = import_graph()
    assert "fngd_plugin.gram" in graph and "slurm.sweep" in graph, sorted(graph)  # the walk found the tree
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_core_module_over_400_lines():
    sizes = {name: len(path.read_text().splitlines())
             for name, path in project_modules(packages=("fngd_plugin",)).items()}
    assert len(sizes) > 5, sizes
    big = {name: n for name, n in sizes.items() if n > MAX_CORE_LINES}
    assert not big, f"fngd_plugin modules over {MAX_CORE_LINES} lines (split them by idea): {big}"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A small package whose imports take every form the graph must resolve."""
    files = {
        "pkg/__init__.py": "from .a import A\n",
        "pkg/a.py": "A = 1\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/b.py": "import os\nfrom ..a import A\nfrom . import c\n",
        "pkg/sub/c.py": "def f():\n    from pkg.sub.b import g\n",
        "pkg/d.py": "import pkg.sub.b\nfrom pkg import a\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_graph_resolves_every_import_form_and_reports_the_circle(tree: Path):
    graph = import_graph(tree, ("pkg",))
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": set(),
        "pkg.sub": set(),
        "pkg.sub.b": {"pkg.a", "pkg.sub.c"},
        "pkg.sub.c": {"pkg.sub.b"},  # a function-level import counts
        "pkg.d": {"pkg.sub.b", "pkg.sub", "pkg.a"},  # importing pkg.sub.b runs pkg.sub's __init__
    }
    assert find_cycle(graph) == ["pkg.sub.b", "pkg.sub.c", "pkg.sub.b"]
    (tree / "pkg/sub/c.py").write_text("def f():\n    return 1\n")
    assert find_cycle(import_graph(tree, ("pkg",))) is None
