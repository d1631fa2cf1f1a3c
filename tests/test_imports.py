"""Import structure: no import cycle inside parcae_jax, and loading a config file does not import jax.

The module graph is read from the source with `ast`, function-level imports included: a cycle there
only shows up at run time, on whichever call happens to import second.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "parcae_jax"
CONFIGS = sorted((ROOT / "configs").glob("*.py"))


def module_files(package: pathlib.Path) -> dict[str, pathlib.Path]:
    """Dotted module name -> source file, for every module of the package folder `package`."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """The package modules `name` imports anywhere in its file.

    `from pkg import sub` is an edge to the submodule pkg.sub alone, and `import a.b` to a.b alone: the
    parent package runs first but is already in sys.modules, half-initialised, when its own `__init__`
    is what imported the child (the usual lazy-export pattern), so that is no cycle.
    """
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0]
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                targets.add(submodule if submodule in modules else source)
    edges = set()
    for target in targets:
        while target and target not in modules:  # `import parcae_jax.x.attr`-like names: the module
            target = target.rpartition(".")[0]
        if target and target != name:
            edges.add(target)
    return edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path, on_path = [start], {start}
        stack = [iter(sorted(graph[start]))]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                finished = path.pop()
                on_path.discard(finished)
                done.add(finished)
            elif nxt in on_path:
                return path[path.index(nxt) :] + [nxt]
            elif nxt not in done:
                path.append(nxt)
                on_path.add(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_find_cycle_reports_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def import_graph(package: pathlib.Path) -> dict[str, set[str]]:
    modules = module_files(package)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def test_import_graph_sees_every_kind_of_import(tmp_path):
    files = {
        "pkg/__init__.py": "def f():\n    from pkg import a\n",
        "pkg/a.py": "from .sub import b\nfrom . import c\n",
        "pkg/c.py": "def g():\n    import pkg.sub.b\n",
        "pkg/d.py": "from pkg.sub.b import NAME\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/b.py": "from ..c import g\nNAME = 1\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path / "pkg")
    assert graph["pkg"] == {"pkg.a"}
    assert graph["pkg.a"] == {"pkg.sub.b", "pkg.c"}
    assert graph["pkg.c"] == {"pkg.sub.b"}
    assert graph["pkg.d"] == {"pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.c"}
    assert find_cycle(graph) == ["pkg.c", "pkg.sub.b", "pkg.c"]


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph(PACKAGE))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_loading_a_config_does_not_import_jax(config):
    # Config files are loaded by CLIs that must choose the platform (or initialize multi-host JAX)
    # before jax is imported, and by tools that need no accelerator at all.
    code = (
        "import sys\n"
        "from parcae_jax.cli_config import load_config\n"
        f"load_config({str(config)!r})\n"
        "print('jax' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False", f"loading {config.name} imports jax"
