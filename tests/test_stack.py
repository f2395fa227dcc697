"""The dependency set: pyproject.toml's ranges admit constraints.txt's pins, .venv holds those
pins, every third-party import of the code base is a declared dependency; and the pinned
set does not only import, it runs: MLflow, Great Expectations, torch.

(Prefect and DVC run for real in test_pipeline_flow.py and test_dvc.py.)
"""

from __future__ import annotations

import ast
import importlib.metadata
import sys
import tomllib

import pandas as pd
import pytest
from conftest import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

CODE = ("finetune", "flows", "stack", "tasks", "bench")  # the code base's folders (tests/ aside)


def pins() -> dict[str, str]:
    """constraints.txt as {normalised name: version}."""
    found = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            found[canonicalize_name(name)] = version.strip()
    return found


def declared() -> list[Requirement]:
    """pyproject.toml's requirements: the dependencies and every optional group (the project's own
    extras, e.g. finetune[stack], left out: they name groups listed here)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    groups = [project["dependencies"], *project.get("optional-dependencies", {}).values()]
    return [r for group in groups for r in map(Requirement, group) if canonicalize_name(r.name) != "finetune"]


def test_pyproject_ranges_admit_the_constraints_pins():
    """Each declared requirement is pinned in constraints.txt at a version its range allows
    (a range moved in pyproject.toml without `make lock`, or a pin edited by hand, fails here)."""
    pinned = pins()
    missing = sorted(r.name for r in declared() if canonicalize_name(r.name) not in pinned)
    assert missing == [], f"declared but not pinned in constraints.txt (run `make lock`): {missing}"
    outside = {str(r): pinned[canonicalize_name(r.name)] for r in declared()
               if not r.specifier.contains(pinned[canonicalize_name(r.name)], prereleases=True)}
    assert outside == {}, f"pins outside pyproject.toml's ranges (run `make lock`): {outside}"


def test_the_environment_holds_the_constraints_pins():
    """Every declared requirement is installed, and every installed distribution that
    constraints.txt pins is at its pinned version (a local build label such as +cu130 aside): what
    the tests exercise is what constraints.txt promises. (A pin outside the dependency tree, left
    by a hand install before `make lock`, is not installed on a fresh clone: it is not required.)"""
    pinned = pins()
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    absent = sorted(r.name for r in declared() if canonicalize_name(r.name) not in installed)
    assert absent == [], f"declared but not installed (run `make install`): {absent}"
    differ = {name: (version, installed[name]) for name, version in pinned.items()
              if name in installed and Version(installed[name]).public != Version(version).public}
    assert differ == {}, f"pinned vs installed (run `make install`): {differ}"


def third_party_imports() -> dict[str, set[str]]:
    """Top-level modules imported by the code base that are neither the standard library nor its
    own: module -> the files importing it. Its own: its packages; in a folder of scripts (no
    __init__.py, e.g. bench/) a sibling module file; and a module of the code base imported under
    a `try: ... except ImportError` (as portable_model.py imports portable.py inside a model)."""
    files = [f for folder in CODE for f in (REPO / folder).rglob("*.py") if "node_modules" not in f.parts]
    stems = {f.stem for f in files}
    found: dict[str, set[str]] = {}
    for file in files:
        tree = ast.parse(file.read_text(), str(file))
        siblings = set() if (file.parent / "__init__.py").exists() else {f.stem for f in file.parent.glob("*.py")}
        guarded = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.Try)
                   and any(ast.unparse(h.type or ast.Name("")) in ("ImportError", "ModuleNotFoundError")
                           for h in node.handlers)
                   for statement in node.body for inner in ast.walk(statement)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            own = set(CODE) | siblings | (stems if id(node) in guarded else set())
            for top in {name.split(".")[0] for name in names} - own - set(sys.stdlib_module_names):
                found.setdefault(top, set()).add(str(file.relative_to(REPO)))
    return found


def test_every_third_party_import_of_the_code_base_is_a_declared_dependency():
    """An import that only works because some other dependency happens to pull its package in
    breaks on the next lock: each one must come from a distribution pyproject.toml declares."""
    names = {canonicalize_name(r.name) for r in declared()}
    providers = importlib.metadata.packages_distributions()
    imports = third_party_imports()
    assert {"torch", "mlflow", "prefect", "dvc", "PIL", "yaml"} <= set(imports)  # the scan sees the code base
    undeclared = {module: sorted(files) for module, files in imports.items()
                  if not {canonicalize_name(d) for d in providers.get(module, [])} & names}
    assert undeclared == {}, f"imported but not declared in pyproject.toml: {undeclared}"


def test_mlflow_records_a_run_in_a_sqlite_store(tmp_path):
    """The pinned MLflow stores a run's params, metric history and artifact in a SQLite store."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        # An explicit artifact root: the default is ./mlruns in the working directory.
        experiment_id = mlflow.create_experiment("stack-check", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment_id) as run:
            mlflow.log_params({"lr": 0.0064, "strategy": "full"})
            for step, acc in enumerate([0.6, 0.8]):
                mlflow.log_metric("val_acc", acc, step=step)
            (tmp_path / "note.txt").write_text("hello")
            mlflow.log_artifact(str(tmp_path / "note.txt"))
    finally:
        mlflow.set_tracking_uri(None)
    client = MlflowClient(uri)
    stored = client.get_run(run.info.run_id)
    assert stored.data.params == {"lr": "0.0064", "strategy": "full"}
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val_acc")] == [0.6, 0.8]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["note.txt"]
    assert list((tmp_path / "artifacts").rglob("note.txt")), "artifact not under the experiment's root"


@pytest.mark.parametrize(("max_side", "passes"), [(4000, True), (1000, False)])
def test_great_expectations_validates_a_dataframe(max_side, passes):
    """The pinned Great Expectations passes a column within its bounds and counts the one outside."""
    import great_expectations as gx

    frame = pd.DataFrame({"width": [224, 500, 3000], "split": ["train", "train", "test"]})
    context = gx.get_context(mode="ephemeral")
    batch = (
        context.data_sources.add_pandas("images")
        .add_dataframe_asset("index")
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": frame})
    )
    result = batch.validate(gx.expectations.ExpectColumnValuesToBeBetween(column="width", min_value=1, max_value=max_side))
    assert result.success is passes
    assert result.result["unexpected_count"] == (0 if passes else 1)


def test_torchvision_resnet18_trains_a_step_in_bf16_on_cpu():
    """The pinned torch and torchvision take a finite bf16 training step that moves the weights."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=2).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    images = torch.randn(4, 3, 64, 64).to(memory_format=torch.channels_last)
    labels = torch.tensor([0, 1, 0, 1])
    before = model.fc.weight.detach().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.fc.weight)
