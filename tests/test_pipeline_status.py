"""What makes the project's stages stale, by real `dvc status` on the project's dvc.yaml.

The workspace is a copy of the project whose stages are recorded as done without training:
stand-in outputs committed with `dvc commit` (seconds, not the hours of a `dvc repro`); only the
cheap study_plan stage runs for real, since its file's content is what is tested.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO, dvc
from dvc.repo import Repo

from finetune.core.config import load_params
from finetune.demo.workspace import sync_workspace, write_params

# Each test sets up a real workspace or trainings (tens of seconds): not in the quick pass.
pytestmark = pytest.mark.slow


def stand_in_outputs(workspace: Path) -> None:
    """A small file for every output of every stage (a folder where other outputs lie inside it)."""
    with Repo(str(workspace)) as repo:
        outs = {Path(out.def_path) for stage in repo.index.stages for out in stage.outs}
    folders = {parent for path in outs for parent in path.parents}
    for path in sorted(outs):
        target = workspace / path
        if path in folders:
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(f"stand-in for {path}\n")


def stale(workspace: Path) -> set[str]:
    """The stages `dvc status` lists."""
    return set(json.loads(dvc(workspace, "status", "--json").stdout))


def replan(workspace: Path) -> None:
    """Run the study_plan stage alone, for real (it is cheap: no torch, no training)."""
    dvc(workspace, "repro", "--single-item", "study_plan")


def study_stages(workspace: Path) -> set[str]:
    seeds = load_params(workspace / "params.yaml").study.seeds
    return {f"study@{seed}" for seed in seeds} | {"study_report"}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """The project's pipeline with every stage recorded as up to date (study disabled, as in params.yaml)."""
    workspace = sync_workspace(REPO, tmp_path_factory.mktemp("status") / "ws", {}, share_cache=False)
    stand_in_outputs(workspace)
    (workspace / "reports" / "study" / "plan.json").unlink()
    replan(workspace)
    dvc(workspace, "commit", "--force")
    assert stale(workspace) == set()
    return workspace


@pytest.fixture
def workspace(recorded, tmp_path) -> Path:
    """A copy of the recorded workspace that a test may change."""
    return shutil.copytree(recorded, tmp_path / "ws", symlinks=True)


def test_a_disabled_study_stays_up_to_date_when_a_recipe_changes(workspace):
    assert json.loads((workspace / "reports" / "study" / "plan.json").read_text()) == {"enabled": False}
    write_params(workspace / "params.yaml", workspace / "params.yaml", {"train.finetune.lr": 0.01})
    changed = stale(workspace)
    assert {"search@finetune", "train@finetune", "study_plan"} <= changed
    assert not changed & study_stages(workspace), changed
    replan(workspace)  # what `dvc repro` does first: the plan comes out the same, so the study is skipped
    assert not stale(workspace) & (study_stages(workspace) | {"study_plan"})


def test_an_enabled_study_reruns_when_a_recipe_or_an_input_changes(workspace):
    write_params(workspace / "params.yaml", workspace / "params.yaml", {"study.enabled": True})
    replan(workspace)
    assert study_stages(workspace) <= stale(workspace)
    dvc(workspace, "commit", "--force")
    write_params(workspace / "params.yaml", workspace / "params.yaml", {"train.scratch.lr": 0.01})
    replan(workspace)
    assert {f"study@{seed}" for seed in load_params(workspace / "params.yaml").study.seeds} <= stale(workspace)
    dvc(workspace, "commit", "--force")
    # a search that chose anew (recorded in dvc.lock as the search stage would) changes the plan too
    (workspace / "metrics" / "search" / "finetune.json").write_text('{"lr": 0.5}\n')
    dvc(workspace, "commit", "--force", "search@finetune")
    assert stale(workspace) == {"train@finetune", "study_plan"}
    replan(workspace)
    assert study_stages(workspace) - {"study_report"} <= stale(workspace)


def test_only_a_variant_that_starts_from_pretrained_weights_depends_on_the_source_model(workspace):
    params = load_params(workspace / "params.yaml")
    pretrained = {name for name, variant in params.train.items() if variant.init == "pretrained"}
    assert pretrained and pretrained != set(params.train)
    (workspace / "models" / "source").write_text("another source model\n")  # its stand-in: one file
    changed = stale(workspace)
    for name in params.train:
        for stage in (f"search@{name}", f"train@{name}"):
            assert (stage in changed) == (name in pretrained), (stage, changed)


def test_editing_a_data_check_makes_validate_stale_and_no_training(workspace):
    checks = workspace / "finetune" / "ingest" / "checks.py"
    checks.write_text(checks.read_text() + "\n# a new check\n")
    changed = stale(workspace)
    assert "validate" in changed, changed
    assert not {name for name in changed if name.split("@")[0] in {"search", "train", "evaluate", "register"}}, changed
