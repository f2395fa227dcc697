"""The production model in use: `python -m finetune predict` in-process and `python -m finetune
serve` (`make serve`: MLflow's scoring app in uvicorn) answering real HTTP requests, against a real
`mlflow server`. Both must give the same answer for the same file, and refuse bad input clearly."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import free_port, jpeg, start_server, stop_server
from images import ODDITIES, encode, huge_png, photo
from models import BLUE, FAINT, MEDIUM, MISSES_FAINT, RED, params, project_with_data, save_variant
from PIL import Image

from finetune.demo.workspace import stage_env
from finetune.stages.evaluate import EvalPaths, run_evaluate
from finetune.tracking.registry import promote, register_candidate
from finetune.tracking.serving import encode as b64

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def production(tmp_path_factory, mlflow_server):
    """A project whose fine-tuned colour network (image-dependent, above chance) is registered and in
    production."""
    env = stage_env() | {"MLFLOW_TRACKING_URI": mlflow_server}
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    project = project_with_data(tmp_path_factory.mktemp("serve") / "p", {"hotdog": 6, "not-hotdog": 6},
                                coloured=True, **{"register.model_name": "served-classifier", "serve.max_image_mb": 1})
    # The colour network learned: 11 of the 12 coloured test images right, above chance (p = 0.003).
    save_variant(project, "finetune", MISSES_FAINT, "serve-ft")
    save_variant(project, "scratch", 1, "serve-sc")
    run_evaluate(params(project), EvalPaths(project / "models", project / "plots"), project)
    register_candidate(params(project), project / "models", project)
    assert promote(params(project), project).action == "promoted"
    yield project, env
    patch.undo()


def files(folder):
    """Real images of several sizes and modes, and bad inputs."""
    folder.mkdir(exist_ok=True)
    made = {"small.jpg": jpeg((200, 40, 30)), "large.jpg": encode(photo(3, (1600, 1200)), "JPEG"),
            "wide.png": encode(photo(4, (300, 40)), "PNG")}
    made |= {name: make() for name, (make, _) in ODDITIES.items()}
    made |= {"notes.jpg": b"this is text, not an image", "empty.png": b"", "bomb.png": huge_png()}
    for name, data in made.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in made}


def predict(project, env, *paths) -> tuple[int, dict[str, dict]]:
    result = subprocess.run([sys.executable, "-m", "finetune", "predict", *map(str, paths)], cwd=project, env=env,
                            capture_output=True, text=True, timeout=300)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == len(paths), result.stdout + result.stderr
    return result.returncode, {line["file"]: line for line in lines}


def test_predict_classifies_any_image_and_names_bad_files(production, tmp_path):
    project, env = production
    images = files(tmp_path)
    status, results = predict(project, env, *images.values())
    assert status == 1  # some inputs are bad
    for name in ["small.jpg", "large.jpg", "wide.png", *ODDITIES]:
        row = results[str(images[name])]
        assert row["class"] in ("hotdog", "not-hotdog"), row
        assert sum(row["probabilities"].values()) == pytest.approx(1.0)
        assert row["confidence"] == max(row["probabilities"].values())
    assert "not an image" in results[str(images["notes.jpg"])]["error"]
    assert "empty" in results[str(images["empty.png"])]["error"]
    assert "validate.max_pixels" in results[str(images["bomb.png"])]["error"]
    # The answer depends on the image (a real network, not a constant).
    assert len({round(results[str(images[n])]["confidence"], 6) for n in ("small.jpg", "large.jpg", "wide.png")}) > 1


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def records(*images: bytes) -> bytes:
    return json.dumps({"dataframe_records": [{"image": b64(data)} for data in images]}).encode()


@pytest.fixture(scope="module")
def endpoint(production, tmp_path_factory):
    """`python -m finetune serve` of the production model: its /invocations URL."""
    project, env = production
    port = free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    server = start_server([sys.executable, "-m", "finetune", "serve", "--port", str(port)],
                          f"http://127.0.0.1:{port}/ping", log, env=env, cwd=project)
    yield f"http://127.0.0.1:{port}/invocations"
    stop_server(server)


def test_served_endpoint_answers_like_predict_and_survives_bad_input(production, endpoint, tmp_path):
    project, env = production
    images = files(tmp_path)
    url = endpoint
    _, local = predict(project, env, images["small.jpg"], images["large.jpg"])
    status, body = post(url, records(images["small.jpg"].read_bytes(), images["large.jpg"].read_bytes()))
    assert status == 200, body
    served = body["predictions"]
    for row, name in zip(served, ("small.jpg", "large.jpg"), strict=True):
        expected = local[str(images[name])]
        assert row["class"] == expected["class"]
        assert row["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6)

    status, body = post(url, records(images["notes.jpg"].read_bytes()))
    assert status == 400 and "not an image" in body["message"]
    status, body = post(url, records(images["bomb.png"].read_bytes()))
    assert status == 400 and "serve.max_pixels" in body["message"]  # the server's limit, below validate's
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8))
    status, body = post(url, records(encode(noise, "PNG")))  # about 2 MB > serve.max_image_mb
    assert status == 400 and "serve.max_image_mb" in body["message"]
    status, body = post(url, b"")
    assert 400 <= status < 500
    status, body = post(url, json.dumps({"dataframe_records": [{"image": "%%% not base64"}]}).encode())
    assert status == 400 and "not base64" in body["message"]
    # ... and it still serves.
    status, body = post(url, records(images["wide.png"].read_bytes()))
    assert status == 200 and body["predictions"][0]["class"] in ("hotdog", "not-hotdog")


# What an answer must never hold: a Python object repr, or a slice of what the client sent.
OBJECT_REPR = re.compile(r" at 0x[0-9a-fA-F]+")
SECRET = "PAYLOAD-7f3a9c"


def leaks(text: str, *sent: str) -> list[str]:
    """Object reprs in ``text``, and any 12-character slice of the values ``sent`` found in it."""
    found = OBJECT_REPR.findall(text)
    found += [value[i:i + 12] for value in sent for i in range(max(1, len(value) - 11)) if value[i:i + 12] in text]
    return found


def test_a_bad_row_gets_its_error_and_the_good_rows_their_classes(endpoint, tmp_path):
    images = files(tmp_path)
    rows = [images["small.jpg"].read_bytes(), f"{SECRET} just text, not an image".encode(),
            images["wide.png"].read_bytes(), images["empty.png"].read_bytes(), images["bomb.png"].read_bytes()]
    body = json.dumps({"dataframe_records": [{"image": b64(rows[0])}, {"image": b64(rows[1])},
                                             {"image": b64(rows[2])}, {"image": f"%%{SECRET}%%"},
                                             {"image": b64(rows[3])}, {"image": b64(rows[4])}]}).encode()
    status, answer = post(endpoint, body)
    assert status == 200, answer
    good, bad = [answer["predictions"][i] for i in (0, 2)], [answer["predictions"][i] for i in (1, 3, 4, 5)]
    assert all(row["class"] in ("hotdog", "not-hotdog") and "error" not in row for row in good)
    assert [row["error"].split(":")[0] for row in bad] == ["row 1", "row 3", "row 4", "row 5"]
    assert "not an image" in bad[0]["error"] and "not base64" in bad[1]["error"]
    assert "empty" in bad[2]["error"] and "serve.max_pixels" in bad[3]["error"]
    assert all(set(row) == {"error"} for row in bad)
    assert not leaks(json.dumps(answer), b64(rows[1]), f"%%{SECRET}%%")


def test_no_answer_echoes_the_request_or_python_objects(endpoint):
    secret = b64(f"{SECRET} not an image".encode())
    number = 123456789123456789
    bodies = {
        "all rows bad": json.dumps({"dataframe_records": [{"image": secret}, {"image": f"{SECRET}!!"}]}),
        "one row bad": json.dumps({"dataframe_records": [{"image": secret}]}),
        "not JSON": '{"dataframe_records": [{"image": "' + secret,
        "no image column": json.dumps({"dataframe_records": [{"picture": secret}]}),
        "no rows": json.dumps({"dataframe_records": []}),
        "a number": json.dumps({"dataframe_records": [{"image": number}]}),
        "a list": json.dumps([secret]),
        "a split frame": json.dumps({"dataframe_split": {"columns": ["image"], "data": secret}}),
    }
    for case, body in bodies.items():
        status, answer = post(endpoint, body.encode())
        assert status == 400, (case, answer)
        assert set(answer) == {"error_code", "message"}, (case, answer)  # no stack trace
        assert not leaks(answer["message"], secret, f"{SECRET}!!", str(number)), (case, answer["message"])
    status, answer = post(endpoint, bodies["all rows bad"].encode())
    assert "none of the 2 rows could be scored: row 0: not an image" in answer["message"]
    assert "row 1: column 'image' is not base64" in answer["message"]
    status, answer = post(endpoint, bodies["not JSON"].encode())
    assert "valid JSON" in answer["message"] and "dataframe_records" in answer["message"]


def test_leaks_finds_a_slice_of_the_request():
    """The check above sees an echo of a sent value or an object repr (so a pass means something)."""
    secret = b64(b"some image bytes here, long enough")
    assert leaks(f"Failed to predict data '    image 0  {secret[5:20]}...'", secret)
    assert leaks("cannot identify image file <_io.BytesIO object at 0x7f3023e4fab0>", secret)
    assert not leaks("row 0: not an image Pillow can read (cannot identify image file)", secret)


def test_errors_grid_of_the_production_model(production):
    """`finetune errors` draws the one test image production gets wrong, the faint hot dog
    (hotdog/0005.jpg, colour FAINT), alone in the first tile of a one-row grid of 8, undistorted,
    with its red caption above it: none of the 11 images it gets right appears."""
    project, env = production
    result = subprocess.run([sys.executable, "-m", "finetune", "errors"], cwd=project, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    grid = project / params(project).evaluate.plots / "errors_production.png"
    assert result.stdout.strip() == f"1 of 12 test images misclassified -> {grid.relative_to(project)}"
    with Image.open(grid) as png:
        assert png.format == "PNG"
        # One row of 8 tiles at 110 dpi: 8 × 1.8 in wide, 2.1 + 0.4 in high.
        assert png.size == (1584, 275)
        pixels = np.asarray(png.convert("RGB")).astype(int)
    tile = pixels.shape[1] // 8

    def near(rgb, tolerance=6):
        return (np.abs(pixels - np.array(rgb)) <= tolerance).all(axis=2)

    faint = near((FAINT[0], 40 + 7 * 5, FAINT[1]))  # test hot dog 5 of 6 (coloured_jpeg's green)
    ys, xs = np.nonzero(faint)
    assert faint.sum() > 20_000 and xs.max() < tile  # drawn large, in the first tile only
    width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    assert width / height == pytest.approx(48 / 40, rel=0.05)  # the 48 × 40 image, not stretched
    # The 11 images it gets right are not drawn: hot dogs 0-3 red and 4 medium, the others blue.
    for shade, i in [(RED, i) for i in range(4)] + [(MEDIUM, 4)] + [(BLUE, i) for i in range(6)]:
        assert near((shade[0], 40 + 7 * i, shade[1])).sum() < 50, (shade, i)
    caption = (pixels[..., 0] > 200) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)  # color="red"
    cys, cxs = np.nonzero(caption)
    assert caption.sum() > 100 and cxs.max() < tile and cys.max() < ys.min()  # above the image
    below_title = pixels[40:, tile:]
    assert (below_title >= 250).all()  # the other 7 tiles are empty


def test_predict_without_a_production_model_says_what_to_do(tmp_path, mlflow_server):
    project = project_with_data(tmp_path / "p", {"hotdog": 1, "not-hotdog": 1},
                                **{"register.model_name": "never-registered"})
    env = stage_env() | {"MLFLOW_TRACKING_URI": mlflow_server}
    image = tmp_path / "a.jpg"
    image.write_bytes(jpeg((1, 2, 3)))
    result = subprocess.run([sys.executable, "-m", "finetune", "predict", str(image)], cwd=project, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "models:/never-registered@production" in result.stderr and "promote" in result.stderr
