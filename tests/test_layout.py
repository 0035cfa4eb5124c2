"""The layout is the architecture: which package may import which, and no import cycles.

Read from the source with `ast` (no imports executed), so it holds for lazy imports inside
functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support import REPO

PACKAGES = ("common", "export", "engines", "runtime", "deploy", "flux2_tiny")
# package -> the project packages it must never import
FORBIDDEN = {
    "common": {"export", "engines", "runtime", "deploy", "flux2_tiny"},
    "export": {"engines", "runtime", "deploy", "flux2_tiny"},
    "engines": {"export", "runtime", "deploy", "flux2_tiny"},
    "runtime": {"export", "engines", "deploy", "flux2_tiny"},
    "deploy": {"export", "engines", "flux2_tiny"},  # serves artifacts through the runtime, nothing else
    "flux2_tiny": {"export", "engines", "runtime", "deploy"},  # writes checkpoints with the HF libraries only
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imports(path: Path, module: str) -> set[str]:
    names = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {i for i in _imports(path, name) if i in modules} for name, path in modules.items()}


def test_packages_import_only_downwards():
    offences = [
        f"{module} imports {target}"
        for module, targets in _graph().items()
        for target in targets
        if target.split(".")[0] in FORBIDDEN.get(module.split(".")[0], set())
    ]
    assert offences == []


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if target == node or node.startswith(target + "."):  # a package's own __init__
                continue
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


def test_no_import_cycles_between_modules():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == ["a -> b -> c -> a"]


def test_the_checker_sees_lazy_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from export.run import ExportJob\n    import runtime.pipeline\n")
    assert {"export.run", "export.run.ExportJob", "runtime.pipeline"} <= _imports(source, "runtime.m")


def test_every_package_folder_is_in_the_wheel():
    """pyproject's packages.find must include every folder with an __init__.py under the shipped packages."""
    import tomllib

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    roots = {pattern.rstrip("*") for pattern in include}
    assert set(PACKAGES) <= roots


def test_console_scripts_go_through_run_cli():
    """A console script that called main() directly would print tracebacks for user mistakes."""
    import importlib
    import inspect
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert len(scripts) >= 10
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        source = inspect.getsource(getattr(importlib.import_module(module), function))
        assert "run_cli(main)" in source, f"{name} -> {target} bypasses common.cli.run_cli"
