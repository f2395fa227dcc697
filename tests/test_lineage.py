"""DVC lineage is complete: every project file a stage's command can import is inside its deps.

For each stage of dvc.yaml (as DVC resolves it: templating, foreach), the command's
``python -m <module>`` is followed through every ``import`` in the project's source, at any depth
and inside functions too, and through the packages each module sits in. Each file reached must be
a dep of the stage, or inside a folder that is.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from dvc.repo import Repo
from imports import import_closure


def runtime_closure(module: str, root: Path) -> set[Path]:
    """The project files actually imported by importing ``module`` in a fresh interpreter."""
    code = ("import importlib, json, sys; importlib.import_module(sys.argv[1]); "
            "print(json.dumps([getattr(m, '__file__', None) for m in list(sys.modules.values())]))")
    out = subprocess.run([sys.executable, "-c", code, module], cwd=root, capture_output=True, text=True, check=True)
    # Some extension modules carry a bare file name (torch's _classes.py): not a project file.
    files = {Path(f).resolve() for f in json.loads(out.stdout.splitlines()[-1]) if f and Path(f).is_absolute()}
    return {f.relative_to(root.resolve()) for f in files if root.resolve() in f.parents and ".venv" not in f.parts}


def stage_commands(root: Path) -> dict[str, tuple[str, list[Path]]]:
    """Each stage's ``python -m`` module and its deps, as DVC resolves dvc.yaml."""
    stages = {}
    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            match = re.search(r"python -m ([\w.]+)", stage.cmd or "")
            if match:
                stages[stage.addressing] = (match.group(1), [Path(dep.def_path) for dep in stage.deps])
    return stages


def covered(path: Path, deps: list[Path]) -> bool:
    return any(path == dep or dep in path.parents for dep in deps)


def uncovered(root: Path) -> dict[str, list[str]]:
    """Per stage, the project files its command imports that its deps do not cover."""
    result = {}
    for name, (module, deps) in stage_commands(root).items():
        missing = sorted(str(p) for p in import_closure(module, root) if not covered(p, deps))
        if missing:
            result[name] = missing
    return result


STAGES = sorted(stage_commands(REPO))


def test_every_stage_runs_a_project_module():
    assert {"fetch", "validate", "pretrain", "train@finetune", "train@scratch", "evaluate", "register"} <= set(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_every_file_a_stage_imports_is_in_its_deps(stage):
    module, deps = stage_commands(REPO)[stage]
    missing = sorted(str(p) for p in import_closure(module, REPO) if not covered(p, deps))
    assert not missing, f"dvc.yaml stage {stage} imports files outside its deps: {missing}"


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["fetch", "train@finetune", "evaluate", "register"])
def test_the_static_closure_holds_every_module_the_stage_really_imports(stage):
    module, _ = stage_commands(REPO)[stage]
    assert runtime_closure(module, REPO) <= import_closure(module, REPO)


def test_the_closure_follows_function_level_and_relative_imports(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "sub" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "main.py").write_text("def run():\n    from .sub import leaf\n")
    (tmp_path / "pkg" / "sub" / "leaf.py").write_text("import os\nfrom pkg import other\n")
    (tmp_path / "pkg" / "other.py").write_text("")
    (tmp_path / "pkg" / "unused.py").write_text("")
    files = {str(p) for p in import_closure("pkg.main", tmp_path)}
    assert files == {"pkg/__init__.py", "pkg/main.py", "pkg/sub/__init__.py", "pkg/sub/leaf.py", "pkg/other.py"}
    assert covered(Path("pkg/sub/leaf.py"), [Path("pkg/sub")]) and not covered(Path("pkg/other.py"), [Path("pkg/sub")])


def test_editing_a_data_check_leaves_every_training_up_to_date():
    """The trainings' deps do not reach finetune/ingest (fetch, download, GX checks): a new
    validation check re-runs validate, never search, train, evaluate or register."""
    stages = stage_commands(REPO)
    check = Path("finetune/ingest/checks.py")
    assert covered(check, stages["validate"][1])
    trainings = [name for name in stages if name.split("@")[0] in {"search", "train", "evaluate", "register"}]
    assert len(trainings) >= 6
    assert not [name for name in trainings if covered(check, stages[name][1])]
