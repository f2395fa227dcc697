"""train_defaults through real DVC: a tiny repository whose stages read the merged variants."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from finetune.core.config import TrainConfig
from finetune.demo.workspace import write_params

VARIANTS = ("finetune", "scratch")
ALL_KEYS = set(TrainConfig.model_fields)

# One stage per variant, as the project's train stage: foreach over train:, params of the variant.
DVC_YAML = """\
stages:
  train:
    foreach: ${train}
    do:
      cmd: echo ${key} > out_${key}.txt
      params:
        - train_defaults
        - train.${key}
      outs:
        - out_${key}.txt
"""


def run(repo: Path, *command: str) -> str:
    """Run a command in ``repo`` (``dvc`` is this interpreter's); it must succeed; its stdout."""
    if command[0] == "dvc":
        command = (sys.executable, "-m", *command)
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def own_keys(repo: Path, dotted: str) -> set[str]:
    """The keys that the mapping at ``dotted`` in params.yaml states itself (not through ``<<:``)."""
    node = yaml.compose((repo / "params.yaml").read_text())
    for part in dotted.split("."):
        node = next(value for key, value in node.value if key.value == part)
    return {key.value for key, _ in node.value} - {"<<"}


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory) -> Path:
    """A git + DVC repository with the project's params.yaml, committed after one `dvc repro`."""
    repo = tmp_path_factory.mktemp("params-dvc") / "repo"
    repo.mkdir()
    run(repo, "git", "init", "-q")
    run(repo, "git", "config", "user.name", "test")
    run(repo, "git", "config", "user.email", "test@localhost")
    run(repo, "dvc", "init", "-q")
    run(repo, "dvc", "config", "core.analytics", "false")
    shutil.copy(REPO / "params.yaml", repo / "params.yaml")
    (repo / "dvc.yaml").write_text(DVC_YAML)
    run(repo, "dvc", "repro", "-q")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", "reproduced")
    return repo


@pytest.fixture
def repo(reproduced, tmp_path) -> Path:
    """A copy of the reproduced repository that a test may change."""
    return shutil.copytree(reproduced, tmp_path / "repo", symlinks=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_repro_records_the_merged_settings_of_each_variant(reproduced, variant):
    lock = yaml.safe_load((reproduced / "dvc.lock").read_text())
    recorded = lock["stages"][f"train@{variant}"]["params"]["params.yaml"][f"train.{variant}"]
    assert set(recorded) == ALL_KEYS
    assert recorded == yaml.safe_load((reproduced / "params.yaml").read_text())["train"][variant]
    assert (reproduced / f"out_{variant}.txt").read_text().strip() == variant


def test_a_key_set_on_one_variant_changes_only_that_stage(repo):
    """A ruamel edit (as the demo's write_params) adds ``epochs`` to scratch alone, and DVC sees
    exactly that key of exactly that stage change."""
    write_params(repo / "params.yaml", repo / "params.yaml", {"train.scratch.epochs": 2})
    assert own_keys(repo, "train.scratch") == {"epochs"}
    assert own_keys(repo, "train.finetune") == {"init", "lr", "head_lr_mult"}
    assert set(json.loads(run(repo, "dvc", "status", "--json"))) == {"train@scratch"}
    diff = json.loads(run(repo, "dvc", "params", "diff", "--json"))
    assert diff == {"params.yaml": {"train.scratch.epochs": {"old": 5, "new": 2, "diff": -3}}}
    ran = run(repo, "dvc", "exp", "run")
    assert "Running stage 'train@scratch'" in ran and "Running stage 'train@finetune'" not in ran


def test_exp_run_set_param_runs_only_that_variant_but_writes_back_every_key(repo):
    """`dvc exp run -S` gets the settings right, but DVC writes each merged key back as the
    variants' own (dvc.utils.collections.merge_dicts assigns every leaf), so the file it leaves
    no longer follows later edits of train_defaults: set keys with a ruamel edit, then `exp run`."""
    ran = run(repo, "dvc", "exp", "run", "-S", "train.scratch.epochs=2")
    assert "Running stage 'train@scratch'" in ran and "Running stage 'train@finetune'" not in ran
    diff = json.loads(run(repo, "dvc", "params", "diff", "--json"))
    assert diff == {"params.yaml": {"train.scratch.epochs": {"old": 5, "new": 2, "diff": -3}}}
    assert {"epochs", "batch_size", "seed"} <= own_keys(repo, "train.scratch")
    assert {"batch_size", "seed"} <= own_keys(repo, "train.finetune")


def test_a_changed_default_makes_every_variant_stale(repo):
    write_params(repo / "params.yaml", repo / "params.yaml", {"train_defaults.batch_size": 64})
    assert own_keys(repo, "train.scratch") == set()  # still inherited, through the merge
    status = json.loads(run(repo, "dvc", "status", "--json"))
    # Each stage sees its own variant changed, not only the train_defaults it also lists.
    assert status == {f"train@{v}": [{"changed deps": {"params.yaml": {
        "train_defaults": "modified", f"train.{v}": "modified"}}}] for v in VARIANTS}
    changed = json.loads(run(repo, "dvc", "params", "diff", "--json"))["params.yaml"]
    assert {f"train.{v}.batch_size" for v in VARIANTS} <= set(changed)


@pytest.mark.parametrize("stage", ["search", "train"])
def test_the_pipeline_has_a_stage_for_each_variant_starting_from_what_it_starts_from(stage):
    """dvc.yaml names the variants (with what each starts from, which params.yaml cannot say to
    DVC): exactly those of params.yaml, and models/source for those, and only those, that start
    from pretrained weights (model.weights may be models/source/model.pt)."""
    listed = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["foreach"]
    variants = yaml.safe_load((REPO / "params.yaml").read_text())["train"]
    assert set(listed) == set(variants)
    for name, variant in variants.items():
        assert (listed[name]["starts_from"] == "models/source") == (variant["init"] == "pretrained"), name
