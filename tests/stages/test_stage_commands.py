"""Each DVC stage is `python -m finetune.stages.<stage>`, and `python -m finetune <stage>` is the
same command: same arguments, same one-paragraph errors."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, jpeg

from finetune.cli import STAGES, main, stage_names
from finetune.demo.workspace import stage_env, write_params

# The arguments each stage's command needs besides --params (dvc.yaml passes them); none: none needed.
ARGS = {"pretrain": ["--out", "x"], "search": ["finetune", "--out", "s.json"],
        "train": ["finetune", "--out", "x", "--metrics", "m", "--plots", "p"],
        "evaluate": ["--models", "m", "--history", "h"], "register": ["--models", "m"],
        "study_plan": ["--out", "plan.json"], "study": ["--seed", "0", "--out", "s.json"]}


def pipeline() -> dict:
    """dvc.yaml's stages as written (before templating: one entry per foreach stage)."""
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_the_umbrella_knows_every_stage_of_dvc_yaml_and_its_summary():
    assert list(STAGES) == list(pipeline())
    assert all(STAGES.values()), STAGES  # each stage's desc: in dvc.yaml
    assert set(ARGS) <= set(STAGES)


@pytest.mark.parametrize("stage", sorted(pipeline()))
def test_each_stage_runs_the_module_named_like_it(stage):
    definition = pipeline()[stage]
    command = (definition.get("do") or definition)["cmd"]
    assert command.startswith(f"python -m finetune.stages.{stage}")
    assert stage in stage_names()


def test_the_stages_are_found_where_no_dvc_yaml_is(tmp_path):
    """Installed as a package (no checkout around it), the umbrella still knows every stage."""
    code = ("import finetune.cli as cli; cli.PIPELINE_FILES = (); "
            "print(' '.join(cli.stage_summaries()))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, check=True)
    assert sorted(result.stdout.split()) == sorted(pipeline())


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_both_doors_print_the_stages_own_help(stage, capsys):
    module = importlib.import_module(f"finetune.stages.{stage}")
    with pytest.raises(SystemExit) as direct:
        module.main(["--help"])
    own = capsys.readouterr().out
    with pytest.raises(SystemExit) as umbrella:
        main([stage, "--help"])
    assert direct.value.code == umbrella.value.code == 0
    assert own == capsys.readouterr().out and f"python -m finetune.stages.{stage}" in own


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_missing_params_file_is_one_paragraph_from_either_door(stage, tmp_path, capsys):
    missing = tmp_path / "nowhere.yaml"
    assert main(["--params", str(missing), stage, *ARGS.get(stage, [])]) == 1
    message = capsys.readouterr().err
    assert message.startswith(f"error: {missing} not found") and "Traceback" not in message
    module = importlib.import_module(f"finetune.stages.{stage}")
    assert module.main(["--params", str(missing), *ARGS.get(stage, [])]) == 1
    assert capsys.readouterr().err == message


@pytest.mark.slow
def test_a_stage_module_runs_as_a_script():
    result = subprocess.run([sys.executable, "-m", "finetune.stages.register", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--models" in result.stdout


# Runs a stage module as `python -m` does and reports, on exit, whether torch and MLflow were loaded.
PROBE = ("import runpy, sys\n"
         "sys.argv = sys.argv[:1] + sys.argv[2:]  # drop the '-' placeholder\n"
         "try:\n"
         "    runpy.run_module(sys.argv[1] if False else MODULE, run_name='__main__', alter_sys=True)\n"
         "except SystemExit as exit:\n"
         "    print('exit', exit.code, 'torch' in sys.modules, 'mlflow' in sys.modules)\n")


@pytest.mark.parametrize(("stage", "overrides", "named"), [
    ("train", {"model.arch": "resnet81"}, "model.arch"),
    ("train", {"model.weights": "photo.jpg"}, "model.weights: "),
    ("train", {"model.weights": "missing.pt"}, "model.weights file"),
    ("pretrain", {"model.arch": "resnet81"}, "model.arch"),
    ("search", {"model.weights": "missing.pt"}, "model.weights file"),
    ("search", {"search.lr_step": 1}, "search.lr_step"),
    ("evaluate", {"model.weights": "photo.jpg"}, "model.weights: "),
    ("register", {"model.arch": "resnet81"}, "model.arch"),
    ("study", {"study.fractions": [0.5, 0.25]}, "study.fractions"),
    ("study_report", {"model.arch": "resnet81"}, "model.arch"),
])
def test_a_wrong_model_setting_stops_the_stage_before_torch_and_mlflow_load(tmp_path, stage, overrides, named):
    (tmp_path / "photo.jpg").write_bytes(jpeg((200, 40, 40)))
    write_params(REPO / "params.yaml", tmp_path / "params.yaml", overrides)
    code = PROBE.replace("MODULE", repr(f"finetune.stages.{stage}"))
    result = subprocess.run([sys.executable, "-c", code, "-", *ARGS.get(stage, [])], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.strip() == "exit 1 False False", result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and named in result.stderr and "Traceback" not in result.stderr


EXIT_NOW = """
import atexit, logging, sys, threading, time
from pathlib import Path
from finetune.core.command import exit_now
out = Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))
def late():
    time.sleep(0.3)
    (out / "thread").write_text("done")
threading.Thread(target=late).start()
from concurrent.futures import ThreadPoolExecutor
pool = ThreadPoolExecutor(1)  # an idle worker (MLflow's artifact uploads): not a thread to wait for
pool.submit(print, end="").result()
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
logging.getLogger("x").info("logged")
sys.stdout.write("no newline")  # buffered: a pipe is not a terminal
exit_now({code})
"""


@pytest.mark.parametrize("code", [0, 3, None])
def test_a_command_ends_with_its_code_its_output_threads_and_exit_handlers(tmp_path, code):
    """exit_now skips only the interpreter's teardown: the code, buffered output, logs, a thread
    still working, an idle thread pool and the atexit handlers all behave as at a normal exit."""
    result = subprocess.run([sys.executable, "-c", EXIT_NOW.format(code=code), str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == (code or 0)
    assert result.stdout == "no newline" and result.stderr.strip() == "logged"
    assert (tmp_path / "thread").read_text() == "done" and (tmp_path / "atexit").read_text() == "ran"


def test_a_stage_whose_params_are_wrong_exits_1_with_its_message(tmp_path):
    (tmp_path / "params.yaml").write_text("nonsense: [\n")
    result = subprocess.run([sys.executable, "-m", "finetune.stages.validate", "--params",
                             str(tmp_path / "params.yaml")], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env=stage_env())
    assert result.returncode == 1 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr


# Runs a stage module as `python -m` does (or imports it) and reports, on exit, the collector's state.
GC_PROBE = ("import gc, importlib, runpy, sys\n"
            "try:\n"
            "    if RUN_NAME == '__main__':\n"
            "        runpy.run_module(MODULE, run_name=RUN_NAME, alter_sys=True)\n"
            "    importlib.import_module(MODULE).main(['--help'])  # imported: main() runs as a test's would\n"
            "except SystemExit as exit:\n"
            "    print('exit', exit.code, gc.isenabled(), gc.get_freeze_count() > 0, 'torch' in sys.modules)\n")


@pytest.mark.slow
@pytest.mark.parametrize(("run_name", "frozen"), [("__main__", True), ("imported", False)])
def test_a_stage_run_as_a_script_sets_its_imports_aside_from_the_garbage_collector(run_name, frozen):
    """Run (python -m), the stage imports torch and MLflow with the collector off, then freezes
    what they made and turns it on again before its work; imported (tests, the umbrella command),
    it leaves the collector alone."""
    code = GC_PROBE.replace("MODULE", repr("finetune.stages.register")).replace("RUN_NAME", repr(run_name))
    result = subprocess.run([sys.executable, "-c", code, "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env=stage_env())
    assert result.stdout.splitlines()[-1] == f"exit 0 True {frozen} True", result.stdout + result.stderr
