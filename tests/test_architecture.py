"""The layering of docs/architecture.md, checked by walking every import of the package (module level
and inside functions)."""

import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parents[1] / "lhf_torchrec"
# The layers of docs/architecture.md, lowest first: a package may import only packages before it.
LAYERS = ("files", "install_check", "mapping", "modules", "data", "distributed", "training", "baselines",
          "pipeline", "bench", "arguments", "cli")


def _unit(module: str) -> str:
    """The package a module belongs to: ``lhf_torchrec.mapping.budget`` -> ``mapping``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def _imports() -> Dict[str, Set[str]]:
    """Module name -> the lhf_torchrec modules it imports."""
    out: Dict[str, Set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(relative.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        out[name] = {m for m in found if m == "lhf_torchrec" or m.startswith("lhf_torchrec.")}
    return out


def test_every_package_imports_only_the_layers_below_it():
    imports = _imports()
    unknown = sorted({_unit(m) for m in imports} - set(LAYERS) - {"<root>"})
    assert not unknown, f"packages missing from LAYERS (and docs/architecture.md): {unknown}"
    offenders = [
        f"{module} imports {target}"
        for module, targets in imports.items()
        if _unit(module) != "<root>"
        for target in targets
        if _unit(target) not in ("<root>", _unit(module))
        and LAYERS.index(_unit(target)) > LAYERS.index(_unit(module))
    ]
    assert not offenders, offenders


def test_nothing_inside_imports_the_package_root():
    """The root re-exports every layer: importing it from inside would hide a cycle."""
    offenders = [module for module, targets in _imports().items() if module != "lhf_torchrec" and "lhf_torchrec" in targets]
    assert not offenders, offenders


def test_no_import_cycles_between_packages():
    graph: Dict[str, Set[str]] = {}
    for module, targets in _imports().items():
        if module == "lhf_torchrec":  # the package root re-exports from every layer
            continue
        for target in targets:
            if _unit(target) not in (_unit(module), "<root>"):
                graph.setdefault(_unit(module), set()).add(_unit(target))
    cycles: List[List[str]] = []

    def visit(node: str, path: List[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif len(path) < len(graph) + 1:
                visit(nxt, path + [nxt])

    for start in sorted(graph):
        visit(start, [start])
    assert not cycles, cycles


def test_the_walk_sees_the_layers():
    """The checks above would pass on an empty walk: make sure they see real edges."""
    imports = _imports()
    assert "lhf_torchrec.mapping.budget" in imports["lhf_torchrec.mapping.tables"]
    assert "lhf_torchrec.pipeline.methods" in imports["lhf_torchrec.pipeline.compare"]
    assert "lhf_torchrec.pipeline.compare" in imports["lhf_torchrec.bench.quality"]
    assert {_unit(m) for m in imports["lhf_torchrec.training.trainer"]} >= {"distributed", "mapping", "data"}
