"""The rules that keep a family one module and the package free of import cycles (docs/families.md)."""

from __future__ import annotations

import ast
from pathlib import Path

from predictor.families import FAMILIES
from predictor.families.base import FamilyModel
from predictor.request import SCHEDULER_NAMES

PACKAGE = Path(__file__).resolve().parents[1] / "predictor"
# A family's knowledge lives in its module under families/; its builtins are built in builtin.py.
FAMILY_PLACES = ("families/", "builtin.py")


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """Every predictor module ``module`` imports, wherever the import stands (in a function, under
    TYPE_CHECKING): the most specific module each names."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("predictor"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from its package
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            if not base.startswith("predictor"):
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
    return {name for name in found if name in known and name != module}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_in_the_package_function_level_imports_included() -> None:
    modules = _modules()
    graph = {name: _imports(path, name, set(modules)) for name, path in modules.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _family_rule_breaks(path: Path, names: set[str]) -> list[str]:
    """Comparisons with a family's name, and diffusers pipeline classes named (isinstance, type checks, imports)."""
    breaks = []
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                values = operand.elts if isinstance(operand, ast.Tuple | ast.List | ast.Set) else [operand]
                if any(isinstance(v, ast.Constant) and v.value in names for v in values):
                    breaks.append(f"{path.name}:{node.lineno} compares with a family name")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffusers"):
            for alias in node.names:
                if alias.name.endswith("Pipeline") and alias.name != "DiffusionPipeline":
                    breaks.append(f"{path.name}:{node.lineno} imports {alias.name}")
    return breaks


def test_nothing_outside_the_family_modules_branches_on_a_family() -> None:
    names = {family.name for family in FAMILIES}
    breaks = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        if not relative.startswith(FAMILY_PLACES):
            breaks += _family_rule_breaks(path, names)
    assert not breaks, breaks


def test_the_family_rule_check_catches_a_break(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "from diffusers import FluxPipeline, DiffusionPipeline\n"
        "if traits.family in ('flux', 'sd3'):\n    pass\n"
        "if name == 'sdxl':\n    pass\n"
    )
    assert len(_family_rule_breaks(source, {"sd", "sdxl", "flux", "sd3"})) == 3


def test_every_family_is_registered_once_with_its_own_schedulers_and_builtins() -> None:
    served = [p.pipeline_class for family in FAMILIES for p in family.pipelines]
    assert len(served) == len(set(served)), "a pipeline class served by two families"
    names = set().union(*(set(family.model.schedulers) for family in FAMILIES))
    assert names == set(SCHEDULER_NAMES), "the request's scheduler names and the families' registries"
    for family in FAMILIES:
        assert issubclass(family.model, FamilyModel)
        assert family.builtins, f"{family.name} has no builtin to test and benchmark it with"
        assert any(not b.full_size for b in family.builtins.values()), f"{family.name} has no tiny builtin"
        classes = {p.pipeline_class for p in family.pipelines}
        assert all(b.pipeline_class in classes for b in family.builtins.values())
