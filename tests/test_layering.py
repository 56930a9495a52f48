"""The packages' dependency rules, read from the source (an AST walk, nothing imported).

- ``topk_moe`` (the folder ``kernels/topk_moe``) imports nothing from ``analysis``;
- the shared infrastructure (modules at ``analysis/`` top level) imports none
  of ``analysis.measure``, ``analysis.study``, ``analysis.chapters``;
- ``analysis.measure`` and ``analysis.study`` never import ``analysis.chapters``;
- no import cycle among the project's modules, counting imports inside
  functions too (a cycle through a deferred import is still a tangle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: package name -> its folder; a module's name is its path below the folder's parent.
PACKAGES = {"topk_moe": REPO / "kernels" / "topk_moe", "analysis": REPO / "analysis"}


def module_name(path: Path, folder: Path) -> str:
    parts = list(path.relative_to(folder.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict:
    """Module name -> source path, for every .py under the project's packages."""
    return {module_name(path, folder): path for folder in PACKAGES.values() for path in sorted(folder.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: dict) -> set:
    """The project modules that module ``name`` imports, anywhere in its source."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module
            # `from package import module` names a module; `from module import name` the module itself.
            targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in known else stem for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a non-module attribute: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict:
    known = project_modules()
    return {name: imported_modules(name, path, known) for name, path in known.items()}


def layer(module: str) -> str:
    """kernels (the topk_moe package), infrastructure, measure, study or chapters."""
    if module == "topk_moe" or module.startswith("topk_moe."):
        return "kernels"
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in ("measure", "study", "chapters"):
        return parts[1]
    return "infrastructure"


#: layer -> the layers it must never import.
FORBIDDEN = {
    "kernels": {"infrastructure", "measure", "study", "chapters"},
    "infrastructure": {"measure", "study", "chapters"},
    "measure": {"chapters"},
    "study": {"chapters"},
    "chapters": set(),
}


def wrong_way_imports(graph: dict) -> list:
    return sorted(f"{source} ({layer(source)}) imports {target} ({layer(target)})"
                  for source, targets in graph.items() for target in targets
                  if layer(target) in FORBIDDEN[layer(source)])


def find_cycle(graph: dict):
    """One import cycle as a list of modules, or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_the_packages():
    graph = import_graph()
    assert {"analysis.records", "analysis.measure.sweep", "analysis.study.train", "analysis.chapters.accuracy",
            "topk_moe.api"} <= set(graph)
    assert "analysis.measure.sweep_plan" in graph["analysis.measure.sweep"]
    assert "analysis.records" in graph["analysis.study.evaluation"]


def test_dependencies_run_one_way():
    assert wrong_way_imports(import_graph()) == []


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


@pytest.mark.parametrize("graph, expected", [
    ({"analysis.records": {"analysis.measure.sweep"}, "analysis.measure.sweep": set()},
     ["analysis.records (infrastructure) imports analysis.measure.sweep (measure)"]),
    ({"analysis.study.train": {"analysis.chapters.accuracy"}, "analysis.chapters.accuracy": set()},
     ["analysis.study.train (study) imports analysis.chapters.accuracy (chapters)"]),
    ({"topk_moe.api": {"analysis.records"}, "analysis.records": set()},
     ["topk_moe.api (kernels) imports analysis.records (infrastructure)"]),
    ({"analysis.chapters.routing": {"analysis.study.corpus", "analysis.records"},
      "analysis.study.corpus": set(), "analysis.records": set()}, []),
])
def test_the_rule_check_catches_a_wrong_way_import(graph, expected):
    assert wrong_way_imports(graph) == expected


def test_the_cycle_check_catches_a_cycle_through_a_deferred_import(tmp_path):
    # the cycle issue 10 removed: sweep -> utilisation -> (inside a function) sweep
    graph = {"analysis.measure.sweep": {"analysis.measure.utilisation"},
             "analysis.measure.utilisation": {"analysis.measure.sweep"}}
    assert find_cycle(graph) == ["analysis.measure.sweep", "analysis.measure.utilisation", "analysis.measure.sweep"]
    source = tmp_path / "utilisation.py"
    source.write_text("def f():\n    from analysis.measure import sweep  # noqa\n")
    known = {"analysis.measure.sweep": None, "analysis.measure.utilisation": source}
    assert imported_modules("analysis.measure.utilisation", source, known) == {"analysis.measure.sweep"}
