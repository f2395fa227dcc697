"""The house rules of the layout (docs/architecture.md), checked on the source itself: no import
cycles, MLflow only under finetune/tracking/, Prefect only in flows/ and tasks/, no private name
imported from another module, tasks/ made of Prefect tasks, no function longer than a screen."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import networkx as nx
import pytest
from conftest import REPO
from imports import imported_names, module_file, project_modules

MODULES = project_modules(REPO)
SCREEN = 60  # lines: a function longer than this is read in pieces


def imports_of(module: str) -> set[str]:
    """The modules (project or not) that ``module`` imports anywhere in its source."""
    return imported_names(MODULES[module], module)


def test_there_are_no_import_cycles():
    graph = nx.DiGraph()
    for module in MODULES:
        graph.add_node(module)
        graph.add_edges_from((module, name) for name in imports_of(module) if name in MODULES and name != module)
    assert list(nx.simple_cycles(graph)) == []


@pytest.mark.parametrize(("library", "allowed"), [("mlflow", ("finetune.tracking",)),
                                                  ("prefect", ("flows", "tasks"))])
def test_a_library_is_imported_only_in_its_own_layer(library, allowed):
    outside = sorted(m for m in MODULES if not m.startswith(allowed)
                     and any(n == library or n.startswith(f"{library}.") for n in imports_of(m)))
    assert outside == [], f"{library} is imported outside {allowed}: {outside}"


def python_files() -> list[Path]:
    return sorted(p for folder in ("finetune", "flows", "tasks", "bench", "tests") for p in (REPO / folder).rglob("*.py"))


def test_no_private_name_is_imported_from_another_module():
    found = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and module_file(node.module, REPO):
                found += [f"{path.relative_to(REPO)}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert found == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("tasks.")))
def test_every_module_of_tasks_defines_prefect_tasks(module):
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    decorated = [f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                 and any("task" in ast.unparse(d) for d in f.decorator_list)]
    assert decorated, f"{module} defines no @task: it belongs in flows/ or finetune/"


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > SCREEN:
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []


def code_lines(folder: Path):
    """(file, line number, line) of every Python line under ``folder``, comments and docstrings included."""
    for path in sorted(folder.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            yield path.relative_to(REPO), number, line


def test_only_the_model_folder_names_an_architectures_layers():
    """`fc` is resnet's head: every other layer asks the arch table (finetune/model/archs.py)."""
    named = [f"{path}:{number}" for folder in ("finetune", "flows", "tasks", "bench")
             for path, number, line in code_lines(REPO / folder)
             if re.search(r"\.fc\b|[\"']fc[\"']", line) and path.parts[:2] != ("finetune", "model")]
    assert not named


def test_no_train_time_transform_lives_under_finetune_data():
    """Crop and flip for training are drawn and applied in finetune/train/augment.py alone."""
    calls = [f"{path}:{number}" for path, number, line in code_lines(REPO / "finetune" / "data")
             if re.search(r"(transforms|v2)\.Random\w+\(|\.get_params\(|\bhflip\(|\bRandom\w+\(", line)]
    assert not calls
