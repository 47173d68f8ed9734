"""The package's import graph: no cycles, and no arrow running back up the layers.

Every module of ``med3dqwen`` is parsed with ``ast``; imports at module level and inside functions count (imports
under ``if TYPE_CHECKING:`` do not: they never run), relative imports are resolved against the importing module.
The layers, bottom to top::

    modeling/, processing/      Hub code: only single-dot sibling imports, nothing else of ours
    anatomy/                    nothing outside anatomy/
    io.py                       processing
    segmentation/, data/        anatomy, processing, io
    convert_med3dvlm.py         modeling, io
    training/, evaluation/      data, processing, modeling, io, anatomy (never builders); evaluation/ also training/
                                (it builds model inputs with the training collator)
    inference.py                what evaluation/ may, plus segmentation/ and evaluation/ (one-call prediction reuses
                                the collator and the generation loop; never builders)
    diagnostics/                data, processing, modeling, io, anatomy, training, evaluation (it measures trained
                                models on built datasets with the evaluation's pieces; never builders)
    builders/                   anything but training/, evaluation/, diagnostics/, scripts/
    scripts/                    command-line programs (console scripts): anything but training/, evaluation/
                                (inference.py is allowed: med3dqwen-predict is its command line)
    app/                        the browser viewer: like scripts/ (it reaches the model through inference.py)
    med3dqwen/__init__.py       the API surface: exempt from the layers, not from the cycle check

A failure names the importing file and line and the rule it breaks.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "med3dqwen"

# Layer → the layers it may import (besides itself). None: exempt.
_USER_FACING = frozenset(
    {"modeling", "processing", "anatomy", "io", "segmentation", "data", "convert_med3dvlm", "builders", "inference"}
)
ALLOWED: dict[str, frozenset[str] | None] = {
    "modeling": frozenset(),
    "processing": frozenset(),
    "anatomy": frozenset(),
    "io": frozenset({"processing"}),
    "segmentation": frozenset({"anatomy", "processing", "io"}),
    "data": frozenset({"anatomy", "processing", "io"}),
    "convert_med3dvlm": frozenset({"modeling", "io"}),
    "training": frozenset({"data", "processing", "modeling", "io", "anatomy"}),
    "evaluation": frozenset({"data", "processing", "modeling", "io", "anatomy", "training"}),
    "inference": frozenset(
        {"data", "processing", "modeling", "io", "anatomy", "segmentation", "training", "evaluation"}
    ),
    "diagnostics": frozenset({"data", "processing", "modeling", "io", "anatomy", "training", "evaluation"}),
    "builders": frozenset({"modeling", "processing", "anatomy", "io", "segmentation", "data", "convert_med3dvlm"}),
    # the command-line programs and the viewer: the user-facing top, over everything but each other
    "scripts": _USER_FACING,
    "app": _USER_FACING,
    "api": None,
}
# Hub-copied layers: a file is copied flat under its bare name, so only ``from .sibling import x`` survives.
HUB_LAYERS = frozenset({"modeling", "processing"})


@dataclass(frozen=True)
class Edge:
    """``source`` imports ``target`` at ``where`` (``"med3dqwen/io.py:12"``); ``level`` is the relative-import level
    (0 = absolute)."""

    source: str
    target: str
    where: str
    level: int


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` under ``package_dir`` (a package is its ``__init__``)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


class _Imports(ast.NodeVisitor):
    """Collects ``(node, module, names, level)`` of every import that runs (skips ``if TYPE_CHECKING:`` bodies)."""

    def __init__(self) -> None:
        self.found: list[tuple[ast.stmt, str, list[str], int]] = []

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
        if name != "TYPE_CHECKING":
            self.visit(node.test)
            for child in node.body:
                self.visit(child)
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((node, alias.name, [], 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.found.append((node, node.module or "", [alias.name for alias in node.names], node.level))


def import_edges(package_dir: Path) -> list[Edge]:
    """Every import from one module of the package to another, resolved to the module it loads."""
    modules = module_names(package_dir)
    package = package_dir.name
    edges = []
    for name, path in modules.items():
        visitor = _Imports()
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        is_package = path.name == "__init__.py"
        for node, module, names, level in visitor.found:
            if level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                if level - 1 > len(base) - 1:
                    raise AssertionError(f"{path}:{node.lineno}: relative import beyond the top-level package")
                base = base[: len(base) - (level - 1)]
                module = ".".join(base + ([module] if module else []))
            if module != package and not module.startswith(package + "."):
                continue
            # ``from pkg import submodule`` loads the submodule; ``from pkg import name`` the package itself.
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules] or [module]
            for target in targets:
                if target not in modules:
                    raise AssertionError(f"{path}:{node.lineno}: imports {target}, which does not exist")
                where = f"{path.relative_to(package_dir.parent).as_posix()}:{node.lineno}"
                edges.append(Edge(name, target, where, level))
    return edges


def layer_of(module: str) -> str:
    parts = module.split(".")
    return "api" if len(parts) == 1 else parts[1]


def layer_violations(edges: list[Edge]) -> list[str]:
    """One message per import that breaks the layer rules (see the module docstring)."""
    problems = []
    for edge in edges:
        source, target = layer_of(edge.source), layer_of(edge.target)
        if source not in ALLOWED:
            problems.append(f"{edge.where}: {edge.source} is in no known layer; add it to ALLOWED in this test")
            continue
        if source in HUB_LAYERS:
            sibling = edge.level == 1 and edge.target.rsplit(".", 1)[0] == edge.source.rsplit(".", 1)[0]
            if not sibling:
                problems.append(
                    f"{edge.where}: {source}/ is copied to the Hub and may import only single-dot siblings "
                    f"('from .x import y'), not {edge.target}"
                )
            continue
        allowed = ALLOWED[source]
        if allowed is None or target == source or target in allowed:
            continue
        rule = ", ".join(sorted(allowed)) if allowed else f"nothing outside {source}"
        problems.append(f"{edge.where}: {source} may import {rule}; it imports {edge.target} ({target})")
    return problems


def import_cycles(edges: list[Edge]) -> list[list[Edge]]:
    """The import cycles, one per strongly connected component (Tarjan), as the edges of one cycle through it."""
    graph: dict[str, list[Edge]] = {}
    for edge in edges:
        graph.setdefault(edge.source, []).append(edge)
        graph.setdefault(edge.target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for edge in graph[node]:
            if edge.target not in index:
                connect(edge.target)
                low[node] = min(low[node], low[edge.target])
            elif edge.target in on_stack:
                low[node] = min(low[node], index[edge.target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1 or any(e.target == node for e in graph[node]):
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)

    cycles = []
    for component in components:
        start = min(component)
        # Breadth-first search inside the component for the shortest way back to ``start``.
        paths: dict[str, list[Edge]] = {start: []}
        queue = [start]
        cycle = None
        while queue and cycle is None:
            node = queue.pop(0)
            for edge in graph[node]:
                if edge.target == start:
                    cycle = [*paths[node], edge]
                    break
                if edge.target in component and edge.target not in paths:
                    paths[edge.target] = [*paths[node], edge]
                    queue.append(edge.target)
        cycles.append(cycle)
    return cycles


def describe_cycle(cycle: list[Edge]) -> str:
    return "import cycle: " + " -> ".join(f"{e.source} ({e.where})" for e in cycle) + f" -> {cycle[0].source}"


# ---------------------------------------------------------------------------------------------------------------
# The package
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    return import_edges(ROOT / PACKAGE)


def test_every_module_is_in_a_layer(edges):
    unknown = sorted({layer_of(m) for m in module_names(ROOT / PACKAGE)} - set(ALLOWED))
    assert not unknown, f"modules outside the known layers: {unknown}; add them to ALLOWED with their rule"


def test_no_arrow_runs_back_up_the_layers(edges):
    problems = layer_violations(edges)
    assert not problems, "\n".join(problems)


def test_no_import_cycles(edges):
    cycles = import_cycles(edges)
    assert not cycles, "\n".join(describe_cycle(c) for c in cycles)


def test_the_walk_sees_the_package(edges):
    # Guards against a walk that silently finds nothing: known arrows of each kind must be there.
    arrows = {(e.source, e.target, e.level) for e in edges}
    assert ("med3dqwen.modeling.modeling_med3d_qwen", "med3dqwen.modeling.configuration_med3d_qwen", 1) in arrows
    assert ("med3dqwen.segmentation.files", "med3dqwen.io", 0) in arrows
    assert ("med3dqwen.training.collator", "med3dqwen.data.schema", 2) in arrows
    assert any(
        e.source == "med3dqwen.builders.radgenome" and e.target.startswith("med3dqwen.processing") for e in edges
    )


# ---------------------------------------------------------------------------------------------------------------
# The checker itself, on a small package written here
# ---------------------------------------------------------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "med3dqwen" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root / "med3dqwen"


def test_checker_finds_function_level_relative_and_hub_violations(tmp_path):
    package = _write(
        tmp_path,
        {
            "__init__.py": "",
            "io.py": "def f():\n    from .segmentation import base\n",  # function-level, relative, upwards
            "anatomy/__init__.py": "",
            "anatomy/labels.py": "from ..processing.ct_io import x\n",  # anatomy imports nothing else of ours
            "processing/__init__.py": "",
            "processing/ct_io.py": "from med3dqwen.anatomy import NAMES\n",  # Hub code: absolute import
            "processing/ct_transforms.py": "from . import ct_io\nfrom typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from med3dqwen.builders import engine\n",  # never runs: not an arrow
            "segmentation/__init__.py": "",
            "segmentation/base.py": "import med3dqwen.io\n",
            "builders/__init__.py": "",
            "builders/engine.py": "from med3dqwen.training import loop\n",  # builders never import training
            "training/__init__.py": "",
            "training/loop.py": "",
        },
    )
    edges = import_edges(package)
    problems = "\n".join(layer_violations(edges))
    assert "med3dqwen/io.py:2: io may import processing; it imports med3dqwen.segmentation.base" in problems
    assert "med3dqwen/anatomy/labels.py:1: anatomy may import nothing outside anatomy" in problems
    assert "med3dqwen/processing/ct_io.py:1: processing/ is copied to the Hub" in problems
    assert "med3dqwen/builders/engine.py:1: builders may import" in problems and "training.loop" in problems
    assert "ct_transforms" not in problems  # single-dot sibling, and the TYPE_CHECKING import is skipped
    cycles = import_cycles(edges)
    assert len(cycles) == 1
    text = describe_cycle(cycles[0])
    assert "med3dqwen.io (med3dqwen/io.py:2)" in text and "med3dqwen/segmentation/base.py:1" in text
