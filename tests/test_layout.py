"""The import graph of the project: no cycles, arrows only downward, and a request schema free of torch.

Imports are read from the source with ``ast``, so the checks see every module without
importing it. The cycle checks count every import, those under ``if TYPE_CHECKING:``
included; the layer check leaves those out: they never run, and a type hint may name a
class of a higher layer (``engine.store.fingerprint`` names ``engine.models.model.Model``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("engine", "export", "perf")
LAYERS: list[tuple[str, ...]] = [
    ("engine.common",),
    ("engine.prompts.syntax", "engine.sizes", "engine.settings", "engine.schedulers", "engine.request"),
    ("engine.spec", "engine.devices", "engine.prompts", "engine.store"),
    ("engine.models",),
    ("engine.lora", "engine.backends"),
    ("engine.pipeline",),
    ("engine.serving", "engine.__main__"),
    ("engine.http", "engine.serve"),
    ("export",),
    ("perf",),
]
"""Lowest first: a module imports only from its own layer or the ones above it in this list."""


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _nodes(tree: ast.AST, type_checking: bool) -> Iterator[ast.AST]:
    pending = [tree]
    while pending:
        node = pending.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if type_checking or not (isinstance(child, ast.If) and _is_type_checking(child)):
                pending.append(child)


def imported(name: str, path: Path, known: dict[str, Path], type_checking: bool = False) -> set[str]:
    """The project's modules ``name`` imports (a ``from package import module`` counts the module), at run
    time only unless ``type_checking``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _nodes(ast.parse(path.read_text()), type_checking):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    return {module for module in found if module in known and module != name}


def graph(type_checking: bool = False) -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known, type_checking) for name, path in known.items()}


def package_graph(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same graph between packages (``engine.models``, ``engine.lora``, ``export``...)."""

    def package(module: str) -> str:
        return ".".join(module.split(".")[:2])

    packages: dict[str, set[str]] = {package(module): set() for module in edges}
    for module, targets in edges.items():
        packages[package(module)] |= {package(target) for target in targets} - {package(module)}
    return packages


def layer(module: str) -> int:
    matches = [
        (len(prefix), index)
        for index, prefixes in enumerate(LAYERS)
        for prefix in prefixes
        if module == prefix or module.startswith(prefix + ".")
    ]
    assert matches, f"{module} is in no layer of LAYERS"
    return max(matches)[1]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                found.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def test_the_graph_is_read_from_the_source():
    edges = graph()
    assert "engine.common.errors" in edges["engine.serving.worker"]
    assert "engine.models.model" in edges["engine.lora.library"]


def test_no_import_cycles_between_modules_or_packages():
    edges = graph(type_checking=True)
    assert cycles(edges) == []
    assert cycles(package_graph(edges)) == []


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    modules = {"engine.models.family": {"engine.lora.factors"}, "engine.lora.factors": set()}
    modules["engine.lora.library"] = {"engine.models.model"}
    modules["engine.models.model"] = {"engine.models.family"}
    assert cycles(modules) == []
    assert cycles(package_graph(modules)) == [["engine.lora", "engine.models", "engine.lora"]]


def test_imports_run_down_the_layers():
    upward = [
        f"{module} -> {target}"
        for module, targets in graph().items()
        for target in sorted(targets)
        if layer(target) > layer(module)
    ]
    assert upward == []


def test_the_request_schema_loads_neither_torch_nor_diffusers_nor_a_model_family():
    code = "import engine.request.schema, engine.request.resolved, engine.settings"
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = {line.rpartition("|")[2].strip() for line in done.stderr.splitlines() if "|" in line}
    heavy = sorted(
        module
        for module in loaded
        if module.split(".")[0] in {"torch", "diffusers", "transformers", "PIL"} or module.startswith("engine.models")
    )
    assert "engine.request.schema" in loaded
    assert heavy == []


def test_a_torch_only_worker_starts_without_onnxruntime():
    """ONNX Runtime is imported by the chains that ask for it, not by the worker's start-up."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import engine.serving.startup"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    loaded = {line.rpartition("|")[2].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "engine.serving.worker" in loaded
    assert sorted(module for module in loaded if module.split(".")[0] == "onnxruntime") == []
