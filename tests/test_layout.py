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


PRODUCTION = ("common", "export", "engines", "runtime", "deploy")
MAX_FUNCTION_LINES = 80
MAX_PARAMETERS = 8


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _parameter_count(function) -> int:
    a = function.args
    names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    names += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
    return len([n for n in names if n not in ("self", "cls")])


def _oversized(paths) -> list[str]:
    found = []
    for path in paths:
        for function in _functions(path):
            lines = function.end_lineno - function.lineno + 1
            parameters = _parameter_count(function)
            if lines > MAX_FUNCTION_LINES or parameters > MAX_PARAMETERS:
                found.append(
                    f"{path.relative_to(REPO)}:{function.lineno} {function.name}: {lines} lines, {parameters} parameters"
                )
    return found


def test_production_functions_are_short_and_take_few_parameters():
    paths = [p for package in PRODUCTION for p in sorted((REPO / package).rglob("*.py"))]
    assert _oversized(paths) == []


def test_the_size_rule_sees_a_long_function(tmp_path, monkeypatch):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "long.py").write_text(f"def long(a, b, c, d, e, f, g, h, i):\n{body}\n", encoding="utf-8")
    monkeypatch.setattr(__import__("tests.test_layout").test_layout, "REPO", tmp_path)
    assert _oversized([tmp_path / "long.py"]) == [f"long.py:1 long: {MAX_FUNCTION_LINES + 1} lines, 9 parameters"]


def _precision_comparisons(path: Path) -> list[str]:
    """Comparisons (==, !=, in, not in) with a precision's name as a string constant."""
    from common.precision import PRECISION_NAMES

    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        constants = [c for o in operands for c in ([o, *getattr(o, "elts", [])]) if isinstance(c, ast.Constant)]
        if any(c.value in PRECISION_NAMES for c in constants if isinstance(c.value, str)):
            found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_precision_names_are_compared_only_in_their_declaration():
    paths = [p for package in PRODUCTION for p in sorted((REPO / package).rglob("*.py"))]
    found = [hit for path in paths if path != REPO / "common" / "precision.py" for hit in _precision_comparisons(path)]
    assert found == []


def test_the_precision_rule_sees_a_comparison(tmp_path, monkeypatch):
    (tmp_path / "m.py").write_text('def f(p):\n    return p in ("bf16", "fp8") or p == "fp32"\n', encoding="utf-8")
    monkeypatch.setattr(__import__("tests.test_layout").test_layout, "REPO", tmp_path)
    assert _precision_comparisons(tmp_path / "m.py") == ["m.py:2", "m.py:2"]
