"""Each DVC stage is `python -m finetune.stages.<stage>`, and `python -m finetune <stage>` is the
same command: same arguments, same one-paragraph errors."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from conftest import REPO

from finetune.cli import STAGES, main

ARGS = {"fetch": [], "validate": [], "pretrain": ["--out", "x"], "train": ["finetune", "--out", "x", "--metrics", "m",
                                                                      "--plots", "p"],
        "evaluate": ["--models", "m", "--history", "h"], "register": ["--models", "m"]}


def test_the_umbrella_knows_every_stage_module():
    assert set(STAGES) == set(ARGS) == {p.stem for p in (REPO / "finetune" / "stages").glob("[a-z]*.py")}


@pytest.mark.parametrize("stage", sorted(ARGS))
def test_both_doors_print_the_stages_own_help(stage, capsys):
    module = importlib.import_module(f"finetune.stages.{stage}")
    with pytest.raises(SystemExit) as direct:
        module.main(["--help"])
    own = capsys.readouterr().out
    with pytest.raises(SystemExit) as umbrella:
        main([stage, "--help"])
    assert direct.value.code == umbrella.value.code == 0
    assert own == capsys.readouterr().out and f"python -m finetune.stages.{stage}" in own


@pytest.mark.parametrize("stage", sorted(ARGS))
def test_a_missing_params_file_is_one_paragraph_from_either_door(stage, tmp_path, capsys):
    missing = tmp_path / "nowhere.yaml"
    assert main(["--params", str(missing), stage, *ARGS[stage]]) == 1
    message = capsys.readouterr().err
    assert message.startswith(f"error: {missing} not found") and "Traceback" not in message
    module = importlib.import_module(f"finetune.stages.{stage}")
    assert module.main(["--params", str(missing), *ARGS[stage]]) == 1
    assert capsys.readouterr().err == message


def test_a_stage_module_runs_as_a_script():
    result = subprocess.run([sys.executable, "-m", "finetune.stages.register", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--models" in result.stdout
