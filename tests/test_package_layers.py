"""The package's layering: the planning core stays free of torch/megatron, imports flow one way, no cycles.

The walk reads every module's imports with ``ast`` (function-local ones included, since those are
where cycles hide) and checks them against the tier order of ``micromoe_megatron/__init__.py``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "micromoe_megatron"

# A module may import from its own tier and the tiers listed for it (never upwards).
ALLOWED = {
    "core": {"core"},
    "mcore": {"mcore", "core"},
    "sim": {"sim", "core"},
    "training": {"training", "mcore", "sim", "core"},
    "cli": {"cli", "training", "mcore", "sim", "core"},
    "__init__": {"core", "mcore", "sim", "training"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_imports(path: Path) -> set[str]:
    """Every micromoe_megatron module ``path`` imports, resolved to absolute names, at any depth."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("micromoe_megatron")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("micromoe_megatron"):
                continue
            for alias in node.names:  # `from . import x` may name a submodule
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _exists(candidate) else target)
    return found


def _exists(module: str) -> bool:
    relative = Path(*module.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").is_file() or (PACKAGE / relative / "__init__.py").is_file()


def _tier(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _package_imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_imports_flow_one_way():
    wrong = [f"{module} imports {target}" for module, targets in _graph().items() for target in targets
             if _tier(target) not in ALLOWED.get(_tier(module), set())]
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if target == module:
                continue
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(target):] + [target]))
            if target in graph and not state.get(target):
                visit(target)
        stack.pop()
        state[module] = 2

    for module in graph:
        if not state.get(module):
            visit(module)


def test_package_never_imports_the_tests():
    """Benchmarks and tools live in the package; the test suite is never one of its dependencies."""
    offenders = [module for module, path in ((_module_name(p), p) for p in PACKAGE.rglob("*.py"))
                 if any(node.module == "tests" or (node.module or "").startswith("tests.")
                        for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom))
                 or any(alias.name.split(".")[0] == "tests" for node in ast.walk(ast.parse(path.read_text()))
                        if isinstance(node, ast.Import) for alias in node.names)]
    assert offenders == []


def test_the_walk_sees_function_local_imports():
    """Guard the guard: the dispatcher imports the planning core, the launcher imports the layer lazily."""
    graph = _graph()
    assert "micromoe_megatron.core.schedule" in graph["micromoe_megatron.mcore.dispatcher"]
    assert "micromoe_megatron.mcore.layer" in graph["micromoe_megatron.training.pretrain_gpt"]


@pytest.mark.parametrize("statement", [
    "import micromoe_megatron.core.placement, micromoe_megatron.core.schedule, micromoe_megatron.core.routing, "
    "micromoe_megatron.core.loads, micromoe_megatron.core.migration_plan",
    "import micromoe_megatron; micromoe_megatron.ReplicaScheduler; micromoe_megatron.Placement",
    "import micromoe_megatron.cli",
])
def test_planning_core_and_cli_load_neither_torch_nor_megatron(statement):
    code = f"import sys; {statement}; print(sorted(m for m in ('torch', 'megatron') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=PACKAGE.parent)
    assert result.stdout.strip() == "[]", f"{statement!r} loaded {result.stdout.strip()}"


def test_public_api_resolves():
    import micromoe_megatron

    for name in micromoe_megatron.__all__:
        assert getattr(micromoe_megatron, name) is not None
    with pytest.raises(AttributeError):
        micromoe_megatron.not_a_name  # noqa: B018
