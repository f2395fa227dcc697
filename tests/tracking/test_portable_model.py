"""The registered model works where this project is not installed: loaded by plain MLflow, and
served by `mlflow models serve`, in processes where `import finetune` fails, it answers exactly
as `python -m finetune predict` does in the project."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import REPO
from images import encode, photo
from models import CLASSES, MODEL, biased

from finetune.core.config import load_params
from finetune.demo.workspace import write_params
from finetune.model.classifier import save_final
from finetune.tracking import serving
from finetune.tracking.doctor import REREGISTER, diagnose
from finetune.tracking.serving import encode as b64
from finetune.tracking.serving import load_served, log_classifier, predict_files
from finetune.tracking.store import use_store

pytestmark = pytest.mark.slow
NAME = "portable-classifier"
URI = f"models:/{NAME}@production"
# Installed first in every process of the test's "elsewhere" (sitecustomize runs at start-up,
# servers' workers included): the project cannot be imported, as on a machine without it.
BLOCKER = '''import sys
class _NoProject:
    def find_spec(self, name, path=None, target=None):
        if name == "finetune" or name.startswith("finetune."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, _NoProject())
'''
LOAD_AND_PREDICT = '''import json, sys, tempfile
import mlflow, pandas as pd
try:
    import finetune
    sys.exit("finetune was importable")
except ModuleNotFoundError:
    pass
rows = json.loads(open(sys.argv[1]).read())
with tempfile.TemporaryDirectory() as folder:
    model = mlflow.pyfunc.load_model(sys.argv[2], dst_path=folder)
print(json.dumps(model.predict(pd.DataFrame({"image": rows}))))
'''


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A project folder whose store holds a production version of a real (random) ResNet-18, and
    the environment of a process elsewhere: the same store, the project not importable."""
    project = tmp_path_factory.mktemp("project")
    (project / "params.yaml").write_text(yaml.safe_dump({"model": MODEL}))
    settings = {"variant": "finetune", "train": {}, "model": MODEL, "classes": CLASSES, "weights": "none"}
    save_final(project / "model.pt", biased(None), CLASSES, "resnet18", settings, fingerprint="f")
    uri = use_store(project)
    with mlflow.start_run():
        info = log_classifier(project / "model.pt", project / "params.yaml", {"max_image_mb": 1, "max_pixels": 10**6})
    version = mlflow.register_model(info.model_uri, NAME)
    mlflow.MlflowClient().set_registered_model_alias(NAME, "production", version.version)
    elsewhere = project.parent / f"{project.name}-elsewhere"
    elsewhere.mkdir()
    (elsewhere / "sitecustomize.py").write_text(BLOCKER)
    # The environment's bin/ first on PATH, as in an activated environment: `mlflow models serve`
    # starts `uvicorn` by name.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PYTHONPATH": str(elsewhere), "MLFLOW_TRACKING_URI": uri, "PATH": path}
    return project, env


def images(folder: Path) -> list[Path]:
    """Real images of several sizes and formats, and one file that is no image."""
    files = []
    for i, (size, form) in enumerate([((40, 30), "JPEG"), ((17, 50), "PNG"), ((64, 64), "JPEG")]):
        files.append(folder / f"{i}.{form.lower()}")
        files[-1].write_bytes(encode(photo(i, size), form))
    files.append(folder / "notes.jpg")
    files[-1].write_text("not an image")
    return files


def test_production_loads_and_predicts_without_the_project_as_predict_does(registered, tmp_path):
    project, env = registered
    files = images(tmp_path)
    ours = predict_files(load_served(URI, project), files)  # what `python -m finetune predict` prints
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([b64(f.read_bytes()) for f in files]))
    script = tmp_path / "load.py"
    script.write_text(LOAD_AND_PREDICT)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(script), str(rows), URI], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    print(f"\nload and predict without the project: {time.perf_counter() - started:.1f} s")
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(theirs) == len(ours) == 4
    for mine, other in zip(ours[:3], theirs[:3], strict=True):
        assert mine["class"] == other["class"]
        for name in CLASSES:
            assert abs(mine["probabilities"][name] - other["probabilities"][name]) <= 1e-6
    assert "not an image Pillow can read" in theirs[3]["error"] and theirs[3]["error"].startswith("row 3:")
    assert ours[3]["error"].startswith(f"{files[3]}: not an image Pillow can read")


def test_the_model_declares_its_code_and_requirements(registered, tmp_path):
    project, _ = registered
    use_store(project)
    folder = Path(mlflow.artifacts.download_artifacts(URI, dst_path=str(tmp_path)))
    meta = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    assert meta["code"] and (folder / meta["code"] / "portable.py").is_file()
    needed = {line.split("==")[0] for line in (folder / "requirements.txt").read_text().split()}
    assert {"torch", "torchvision", "pillow", "numpy", "pandas", "mlflow"} <= needed
    assert "finetune" not in (folder / "requirements.txt").read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_models_serve_serves_production_without_the_project(registered, tmp_path):
    project, env = registered
    files = images(tmp_path)[:2]
    ours = predict_files(load_served(URI, project), files)
    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen([str(mlflow_cli), "models", "serve", "-m", URI, "--env-manager", "local",
                               "--host", "127.0.0.1", "-p", str(port)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        body = json.dumps({"dataframe_records": [{"image": b64(f.read_bytes())} for f in files]}).encode()
        answer = None
        for _ in range(240):
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                                 {"Content-Type": "application/json"})
                answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()[-3000:]
                time.sleep(0.5)
        assert answer is not None, "the server did not answer in 120 s"
    finally:
        server.terminate()
        server.wait(30)
    served = answer["predictions"]
    for mine, other in zip(ours, served, strict=True):
        for name in CLASSES:
            assert abs(mine["probabilities"][name] - other["probabilities"][name]) <= 1e-6


def test_doctor_names_a_production_that_loads_only_with_the_project(registered, tmp_path):
    """A version registered the old way (the pickled class of finetune.tracking.serving) still
    loads here, and doctor names it with the commands that register it again, portable."""
    project, env = registered
    use_store(project)
    client = mlflow.MlflowClient()
    portable_version = client.get_registered_model(NAME).aliases["production"]
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="classifier", python_model=serving.ImageClassifierModel(),
                                       artifacts={"checkpoint": str(project / "model.pt")})
    old = mlflow.register_model(info.model_uri, NAME).version
    client.set_registered_model_alias(NAME, "production", old)
    try:
        model = load_served(URI, project)
        assert not serving.portable(model) and serving.portable(load_served(f"models:/{NAME}/{portable_version}", project))
        assert predict_files(model, images(tmp_path)[:1])[0]["class"] in CLASSES
        write_params(REPO / "params.yaml", tmp_path / "params.yaml", {"register.model_name": NAME})
        findings = [f for f in diagnose(load_params(tmp_path / "params.yaml"), project) if "installed" in f.problem]
        assert len(findings) == 1 and findings[0].fatal
        assert findings[0].problem.startswith(f"{NAME}@production (v{old}) loads only where this project is installed")
        assert findings[0].repair == f"{REREGISTER}, then python -m finetune promote --force"
    finally:
        client.set_registered_model_alias(NAME, "production", portable_version)
