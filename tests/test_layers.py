"""The package's import layers: imports go one way, and no module imports itself around.

Layers, lowest first (a module may import its own layer and those below; the packages of
one tier do not import each other)::

    ir  <-  pipeline | runtime  <-  nn  <-  quant | pruning  <-  passes  <-  backends
        <-  reporting  <-  api  <-  cli  <-  fxcomp (the package itself)

Every import counts, those inside functions and under ``TYPE_CHECKING`` too: an import that
only works because it is deferred is still a dependency the wrong way.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
TIERS = (
    ("ir",),
    ("pipeline", "runtime"),
    ("nn",),
    ("quant", "pruning"),
    ("passes",),
    ("backends",),
    ("reporting",),
    ("api",),
    ("cli",),
)
TOP = len(TIERS)  # fxcomp/__init__.py and __main__.py


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (``passes/`` is ``fxcomp.passes``)."""
    found = {}
    for folder, package in ((ROOT / "fxcomp", "fxcomp"), (ROOT / "passes", "fxcomp.passes")):
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The fxcomp modules ``name`` imports (a package's ``__init__`` when it imports from it)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in MODULES else base)
    return {m for m in found if m == "fxcomp" or m.startswith("fxcomp.")}


def _tier(module: str) -> tuple[int, str] | None:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return TOP, "fxcomp"
    for level, names in enumerate(TIERS):
        if parts[1] in names:
            return level, parts[1]
    return None


def _packages(module: str) -> set[str]:
    """The packages Python imports before ``module``: each of its parents."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _graph() -> nx.DiGraph:
    """Module -> module it imports, and -> each package Python runs on the way to it (the
    importer's own packages are already running)."""
    graph = nx.DiGraph()
    for name, path in MODULES.items():
        graph.add_node(name)
        for target in _imports(name, path):
            for reached in {target} | (_packages(target) - _packages(name) - {name}):
                if reached != name:
                    graph.add_edge(name, reached)
    return graph


def test_every_module_belongs_to_a_layer():
    strays = sorted(name for name in MODULES if _tier(name) is None)
    assert not strays, f"modules outside every layer of {TIERS}: {strays}"


def test_imports_go_down_the_layers():
    wrong = []
    for source, target in _graph().edges:
        (low, package), (high, other) = _tier(target) or (-1, "?"), _tier(source) or (-1, "?")
        if low > high or (low == high and package != other):
            wrong.append(f"{source} -> {target}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    cycles = sorted(" -> ".join([*c, c[0]]) for c in nx.simple_cycles(_graph()))
    assert not cycles, "import cycles:\n" + "\n".join(cycles[:20])


def test_the_check_sees_a_backward_import(tmp_path):
    """The layer check itself: a quant module importing a pass is reported."""
    path = tmp_path / "backwards.py"
    path.write_text("def late():\n    from fxcomp.passes import fuse\n    return fuse\n")
    assert _imports("fxcomp.quant.backwards", path) == {"fxcomp.passes"}
    assert _tier("fxcomp.passes")[0] > _tier("fxcomp.quant.backwards")[0]


@pytest.mark.slow
def test_each_package_imports_on_its_own():
    """``import fxcomp.<package>`` works in a fresh process, without the rest imported first."""
    packages = sorted({n for tier in TIERS for n in tier})

    def run(package: str) -> tuple[str, int, str]:
        done = subprocess.run(
            [sys.executable, "-c", f"import fxcomp.{package}"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        return package, done.returncode, done.stderr[-2000:]

    with ThreadPoolExecutor(2) as pool:
        failed = [r for r in pool.map(run, packages) if r[1] != 0]
    assert not failed, "\n".join(f"fxcomp.{p}:\n{err}" for p, _, err in failed)


def test_every_package_is_installed():
    """pyproject.toml lists the packages by hand (``passes/`` is mapped to ``fxcomp.passes``):
    a package missing there imports in a checkout but not from an install."""
    import tomllib

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    packages = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    assert packages == listed
