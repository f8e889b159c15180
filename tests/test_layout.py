"""The package's layout: the core imports nothing from the application, ``import pyro_kfacvi``
loads core modules only (no matplotlib), and no module imports form a cycle."""
import ast
import subprocess
import sys
from pathlib import Path

import pyro_kfacvi

PACKAGE = Path(pyro_kfacvi.__file__).parent


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path):
    """The ``pyro_kfacvi`` modules that ``path`` imports at any level (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found.update(c for c in candidates if c.startswith("pyro_kfacvi") and c in MODULES)
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: imports_of(path) - {name} for name, path in MODULES.items()}


def test_import_loads_core_modules_only():
    code = ("import pyro_kfacvi, sys; "
            "print(sorted(m for m in sys.modules if m.startswith(('pyro_kfacvi', 'matplotlib'))))")
    loaded = eval(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert loaded and all(m.startswith("pyro_kfacvi") for m in loaded), loaded
    assert not any(m.startswith("pyro_kfacvi.experiments") for m in loaded), loaded


def test_the_core_imports_nothing_from_the_application():
    core = [name for name in GRAPH if not name.startswith("pyro_kfacvi.experiments") and name != "pyro_kfacvi.__main__"]
    offenders = {name: sorted(GRAPH[name]) for name in core
                 if any(target.startswith("pyro_kfacvi.experiments") for target in GRAPH[name])}
    assert not offenders


def find_cycle(graph):
    """A cycle of ``graph`` ({node: set of nodes}) as a list of nodes, or ``None``."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target, path + [target])
                if found:
                    return found
        state[node] = "done"
        return None

    return next((c for node in sorted(graph) if node not in state for c in [visit(node, [node])] if c), None)


def test_find_cycle_finds_the_old_presets_distributed_cycle():
    graph = {"presets": {"distributed", "engine"}, "distributed": {"presets"}, "engine": set()}
    assert find_cycle(graph) == ["distributed", "presets", "distributed"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    """A package's ``__init__`` re-exporting its own submodules is not a cycle: those edges are dropped."""
    def is_own_submodule(name, target):
        return MODULES[name].name == "__init__.py" and target.startswith(name + ".")

    graph = {name: {t for t in targets if not is_own_submodule(name, t)} for name, targets in GRAPH.items()}
    assert find_cycle(graph) is None
