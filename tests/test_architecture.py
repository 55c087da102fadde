"""Structure rules that keep the engine a thin orchestrator (checked on the source, no model runs)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "fastface"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The fastface modules an import statement in ``module`` names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("fastface")]
    if node.level == 0:
        base = node.module or ""
    else:
        package = module.split(".")
        if not MODULES[module].name == "__init__.py":
            package = package[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    if not base.startswith("fastface"):
        return []
    names = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
    return names or [base]


def imports(module: str, top_level_only: bool) -> set[str]:
    tree = ast.parse(MODULES[module].read_text())
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.update(resolve(module, node))
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue  # annotations only
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(node.orelse)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            elif not top_level_only:
                visit([child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt)])

    visit(tree.body)
    if not top_level_only:
        found.update(n for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                     for n in resolve(module, node))
    return found


def test_no_engine_module_imports_the_test_fixtures():
    offenders = sorted(m for m in MODULES if m != "fastface.testing" and "fastface.testing" in imports(m, False))
    assert offenders == []


def test_no_import_cycles_at_import_time():
    graph = {m: {d for d in imports(m, True) if d in MODULES and d != m} for m in MODULES}
    # A package's __init__ importing its own submodules is how packages work, not a cycle.
    for m, deps in graph.items():
        graph[m] = {d for d in deps if not m.startswith(d + ".")}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def dfs(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [node, dep])
            elif dep not in state:
                dfs(dep, path + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            dfs(module, [module])
    assert cycles == []


def test_every_module_imports_on_its_own():
    # Each engine module imported first (FastFace's modules forgotten in between; torch stays
    # loaded), so that no import order hides a cycle.
    engine = ["fastface.adapters.faceid", "fastface.adapters", "fastface.config", "fastface.steps",
              "fastface.sampling", "fastface.lora", "fastface.metadata", "fastface.memory", "fastface.pipeline",
              "fastface.commands", "fastface.evaluation.run", "fastface.bench", "fastface.demo"]
    code = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    for loaded in [m for m in sys.modules if m == 'fastface' or m.startswith('fastface.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.run([sys.executable, "-c", code, *engine], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-1500:]


def test_pipeline_classes_are_small_and_call_is_staged():
    tree = ast.parse((PACKAGE / "pipeline.py").read_text())
    sizes = {n.name: n.end_lineno - n.lineno + 1 for n in tree.body if isinstance(n, ast.ClassDef)}
    assert max(sizes.values()) <= 320, sizes
    source = (PACKAGE / "pipeline.py").read_text()
    stages = [line.strip() for line in source.splitlines() if line.strip().startswith("# ") and line.strip()[2:3].isdigit()]
    assert [s.split(".")[0] for s in stages] == [f"# {i}" for i in range(1, 8)], stages


@pytest.mark.parametrize("literal", [0.8, 1.5, 3.0])
def test_method_defaults_live_in_the_presets(literal):
    # The engine, its front ends and the adapters take λ and the guidance peaks from presets.py and
    # guidance.py's named constants; a literal elsewhere would drift from them.
    checked = ["pipeline.py", "steps.py", "sampling.py", "config.py", "commands.py", "bench.py", "demo.py",
               "lora.py", "metadata.py", "evaluation/run.py", *[f"adapters/{p.name}" for p in (PACKAGE / "adapters").glob("*.py")]]
    found = []
    for name in checked:
        tree = ast.parse((PACKAGE / name).read_text())
        found += [f"{name}:{n.lineno}" for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and type(n.value) is float and n.value == literal]
    assert found == []


def test_adapters_register_through_the_seam():
    from fastface.adapters import ADAPTERS
    from fastface.adapters.base import IdentityAdapter

    for name, spec in ADAPTERS.items():
        cls = spec.adapter_class()
        assert issubclass(cls, IdentityAdapter) and spec.name == name
        assert spec.required_files()[0].filename == spec.weight_name
        tiny = cls.tiny_spec(spec)
        assert tiny.repo == "tiny" and tiny.name == name
