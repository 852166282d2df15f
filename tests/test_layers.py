"""The package's layers, as docs/architecture.md draws them: each imports only the layers below it, the training
core imports no Ray, Optuna or MLflow, the records and the analysis no Ray, Optuna or torch, and no module imports
itself back through another. Read from the source (every import, function-level ones included) and checked once
more by importing each layer in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ncssl_tune"

# Lowest first. A module may import its own layer and any layer below it. The configuration validates names
# against the core's registries (losses, datasets, backbones), so it lives with the core.
LAYERS = {
    "ncssl_tune": 0,  # the package's own __init__ (its version); the prefix match below never falls back to it
    "ncssl_tune.vocab": 0, "ncssl_tune.naming": 0,
    "ncssl_tune.config": 1, "ncssl_tune.spec": 1, "ncssl_tune.core": 1,
    "ncssl_tune.records": 2,
    "ncssl_tune.analysis": 3,
    "ncssl_tune.sweep": 4,
    "ncssl_tune.cli": 5,
}
FORBIDDEN = {  # third-party packages a layer must not import
    "ncssl_tune.vocab": {"ray", "optuna", "mlflow", "torch"},
    "ncssl_tune.naming": {"ray", "optuna", "mlflow", "torch"},
    "ncssl_tune.config": {"ray", "optuna", "mlflow"},
    "ncssl_tune.spec": {"ray", "optuna", "mlflow"},
    "ncssl_tune.core": {"ray", "optuna", "mlflow"},
    "ncssl_tune.records": {"ray", "optuna", "torch"},
    "ncssl_tune.analysis": {"ray", "optuna", "torch"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth; `from pkg import mod` counts as mod, not pkg."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names} & MODULES.keys()
            out |= subs or {node.module}
    return out


def _layer_of(module: str) -> str | None:
    return next((k for k in sorted(LAYERS, key=len, reverse=True)
                 if module == k or (k != "ncssl_tune" and module.startswith(k + "."))), None)


def _project_graph() -> dict[str, set[str]]:
    return {m: {i for i in _imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}


def test_every_module_has_a_layer():
    assert not [m for m in MODULES if _layer_of(m) is None], "add new modules to LAYERS (and docs/architecture.md)"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer_of(m)))
def test_a_module_imports_no_layer_above_its_own(module):
    own = LAYERS[_layer_of(module)]
    above = sorted(i for i in _project_graph()[module] if LAYERS[_layer_of(i) or "ncssl_tune"] > own)
    assert not above, f"{module} (layer {own}) imports {above} from a layer above it"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer_of(m) in FORBIDDEN))
def test_a_module_imports_no_forbidden_library(module):
    roots = {i.split(".")[0] for i in _imports(MODULES[module])}
    assert not roots & FORBIDDEN[_layer_of(module)], f"{module} imports {sorted(roots & FORBIDDEN[_layer_of(module)])}"


def test_no_import_cycle():
    graph, state, path = _project_graph(), {}, []

    def visit(m: str) -> list[str] | None:
        state[m] = "open"
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = "done"
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            assert (cycle := visit(m)) is None, " -> ".join(cycle)


@pytest.mark.parametrize("layer", ["ncssl_tune.core", "ncssl_tune.records", "ncssl_tune.analysis"])
def test_importing_a_layer_loads_none_of_its_forbidden_libraries(layer):
    # A library imported by a dependency (not by our own source) would pass the static check: import for real.
    names = sorted(m for m in MODULES if _layer_of(m) == layer)
    code = (f"import sys; import {', '.join(names)}; "
            f"print(sorted(m for m in {sorted(FORBIDDEN[layer])!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
