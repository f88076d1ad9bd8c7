"""The house rules of the source tree, read from the code itself (ast): no import cycle between
modules or packages, function-level imports only where they say why, file and function sizes,
the top level kept small, ``import wsjax.config`` free of jax, every console script resolvable.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "wsjax"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_TOP_MODULES = 12
LAZY_MARK = "# lazy:"  # a function-level import says why on its line
LONG_MARK = "long because"  # a function over the limit says why in its docstring


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The wsjax modules ``path`` imports anywhere (function bodies included): for ``from a.b
    import c``, ``a.b.c`` when that is a module, else ``a.b``."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in known else node.module)
    return {m for m in out if m in known}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes, or None (depth-first, colouring)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def module_graph() -> dict[str, set[str]]:
    mods = sources()
    known = set(mods)
    # a package's __init__ re-exports its modules: an edge into a package is an edge to it
    return {m: imports_of(p, known) - {m} for m, p in mods.items()}


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_modules():
    graph = module_graph()
    # a package's own __init__ imports its modules, which import siblings by their full
    # names; that is not a cycle between modules, so the package node stands apart from them
    for pkg in [m for m, p in sources().items() if p.name == "__init__.py"]:
        graph[pkg] = {m for m in graph[pkg] if not m.startswith(pkg + ".")}
        for m in graph:
            if m.startswith(pkg + "."):
                graph[m].discard(pkg)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_import_cycle_between_packages():
    """wsjax.<package> (or a top-level module) as a node: no package imports one that
    imports it back."""

    def unit(m: str) -> str:
        return ".".join(m.split(".")[:2])

    graph: dict[str, set[str]] = {}
    for m, deps in module_graph().items():
        graph.setdefault(unit(m), set()).update(unit(d) for d in deps if unit(d) != unit(m))
    graph.pop("wsjax", None)  # the lazy top-level API names everything on first use
    for deps in graph.values():
        deps.discard("wsjax")
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_function_level_imports_say_why():
    bad = []
    for path in sources().values():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for n in ast.walk(node):
                if (
                    isinstance(n, ast.Import | ast.ImportFrom)
                    and LAZY_MARK not in lines[n.lineno - 1]
                ):
                    bad.append(f"{path.relative_to(REPO)}:{n.lineno}")
    assert not bad, f"function-level imports without a '{LAZY_MARK} why' comment: {bad}"


def test_files_and_functions_are_small():
    files = [
        p for d in ("wsjax", "tests", "benchmarks", "scripts") for p in (REPO / d).rglob("*.py")
    ]
    big = [
        f"{p.relative_to(REPO)} ({n})"
        for p in files
        if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    ]
    assert not big, f"files over {MAX_FILE_LINES} lines: {big}"
    long = []
    for path in sources().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                size = node.end_lineno - node.lineno + 1
                doc = (ast.get_docstring(node) or "").lower()
                if size > MAX_FUNCTION_LINES and LONG_MARK not in doc:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({size})")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines, no '{LONG_MARK}': {long}"


def test_few_modules_at_the_top():
    top = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert len(top) <= MAX_TOP_MODULES, sorted(top)


def test_config_imports_no_jax():
    code = "import sys, wsjax.config; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_console_script_resolves():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {
        "wsjax-train",
        "wsjax-launch",
        "wsjax-generate",
        "wsjax-convert",
        "wsjax-preprocess",
    } <= set(scripts)
    for name, target in scripts.items():
        mod, func = target.split(":")
        assert callable(getattr(importlib.import_module(mod), func)), name


@pytest.mark.parametrize("name", ["wsjax-train", "wsjax-convert", "wsjax-preprocess"])
def test_console_script_help_runs(name):
    """The installed command runs (the README's install puts it on PATH)."""
    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"][name]
    mod = target.split(":")[0]
    out = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage:" in out.stdout, out.stderr
