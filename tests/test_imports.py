"""No import cycles in fastpeft: the graph of every import statement (module level and inside functions) is
acyclic, and every module imports in a fresh interpreter whatever was imported before it.

An import of a package's submodule (`from .. import _ext`) is an edge to the submodule only: the package
itself is always imported first, as Python imports parents before children. kernels/ is fastpeft.kernels.
"""
import ast
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"fastpeft": os.path.join(ROOT, "fastpeft"), "fastpeft.kernels": os.path.join(ROOT, "kernels")}


def _modules() -> dict[str, str]:
    """Module name -> file of every fastpeft module (packages by their __init__.py)."""
    mods = {}
    for pkg, folder in PACKAGES.items():
        for dirpath, dirnames, files in os.walk(folder):
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and not (pkg == "fastpeft" and d == "kernels")]
            rel = os.path.relpath(dirpath, folder)
            base = pkg if rel == "." else pkg + "." + rel.replace(os.sep, ".")
            for f in files:
                if f.endswith(".py"):
                    mods[base if f == "__init__.py" else f"{base}.{f[:-3]}"] = os.path.join(dirpath, f)
    return mods


def _edges(name: str, path: str, mods: dict[str, str]) -> set[str]:
    is_pkg = path.endswith("__init__.py")
    here = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in mods)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = here.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target not in mods:
                continue
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
            out.update(subs)
            if len(subs) < len(node.names):  # some names are attributes of `target`: it runs
                out.add(target)
    out.discard(name)
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_import_graph_is_acyclic():
    mods = _modules()
    assert "fastpeft.inject_lora" in mods and "fastpeft.ops.lora_linear_custom_op" in mods
    graph = {n: _edges(n, p, mods) for n, p in mods.items()}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("order", ["sorted", "reversed"])
def test_every_module_imports_in_a_fresh_interpreter(order):
    names = sorted(n for n in _modules() if not n.endswith("__main__"))
    if order == "reversed":
        names.reverse()
    script = textwrap.dedent(f"""
        import importlib, sys
        for name in {names!r}:
            importlib.import_module(name)
        import fastpeft
        assert callable(fastpeft.inject_lora), fastpeft.inject_lora  # the function, not its module
        assert sys.modules["fastpeft.inject_lora"].inject_lora is fastpeft.inject_lora
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
