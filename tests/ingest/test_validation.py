"""The validate stage on a corpus of bad datasets built here, through the real CLI and GX context.

Each bad dataset must stop with the failed expectations and the offending files named; valid
oddities must pass; `quarantine` must leave out only the bad files and still insist on the rest.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REPO, TINY_DATA, dataset_zip, dvc, make_zip, sha
from images import ODDITIES, encode, huge_png, photo, rgb_jpeg, write_dataset

from finetune.cli import main
from finetune.demo.workspace import sync_workspace, write_params

SMALL = {"validate.min_images_per_class": 2, "validate.expected_per_class": None}


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project folder with the repo's params and GX context, and a valid dataset."""
    shutil.copytree(REPO / "gx", tmp_path / "gx", ignore=shutil.ignore_patterns("uncommitted"))
    configure(tmp_path)
    write_dataset(tmp_path / "data" / "hotdog")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def configure(project: Path, **validate) -> None:
    overrides = SMALL | {f"validate.{key}": value for key, value in validate.items()}
    write_params(REPO / "params.yaml", project / "params.yaml", overrides)


def run_validate(capsys) -> tuple[int, str, dict]:
    capsys.readouterr()
    code = main(["validate"])
    out = capsys.readouterr()
    report = json.loads(Path("reports/validate.json").read_text())
    headline = json.loads(Path("metrics/validate.json").read_text())
    assert headline == {"passed": report["passed"], "files": report["files"], "used": report["used"],
                        "quarantined": report["quarantined"], "failed_checks": len(report["failed"]),
                        "warnings": len(report["warnings"])}
    return code, out.out + out.err, report


def data(project: Path) -> Path:
    return project / "data" / "hotdog"


# Each bad dataset: how to make it from the valid one, the checks it must fail, words the
# message must hold (the offending files among them).
def corrupt(root):
    (root / "train/hotdog/bad.jpg").write_bytes(bytes(range(256)) * 4)


def truncated(root):
    (root / "train/hotdog/cut.jpg").write_bytes(rgb_jpeg(90, (200, 160))[:900])


def text_as_jpeg(root):
    (root / "test/not-hotdog/notes.jpg").write_text("shopping list: buns, sausages\n")


def one_pixel(root):
    (root / "train/not-hotdog/dot.png").write_bytes(encode(photo(91, (1, 1)), "PNG"))


def empty_class(root):
    (root / "train/empty-class").mkdir()
    (root / "test/empty-class").mkdir()


def missing_split(root):
    shutil.rmtree(root / "test")


def train_only_class(root):
    (root / "train/extra").mkdir()
    for i in range(3):
        (root / f"train/extra/{i}.jpg").write_bytes(rgb_jpeg(200 + i))


def leaked(root):
    shutil.copy(root / "train/hotdog/0000.jpg", root / "test/hotdog/copy.jpg")


def bomb(root):
    (root / "train/hotdog/huge.png").write_bytes(huge_png())


BAD = {
    "corrupt-jpeg": (corrupt, {"decodes"}, ["train/hotdog/bad.jpg", "UnidentifiedImageError"]),
    "truncated-jpeg": (truncated, {"decodes"}, ["train/hotdog/cut.jpg", "truncated"]),
    "text-as-jpeg": (text_as_jpeg, {"decodes"}, ["test/not-hotdog/notes.jpg"]),
    "one-pixel": (one_pixel, {"min_side"}, ["train/not-hotdog/dot.png", "validate.min_side"]),
    "empty-class": (empty_class, {"train_min_images", "test_min_images"}, ["empty-class"]),
    "missing-split": (missing_split, {"splits", "test_has_class"}, ["missing: test"]),
    "train-only-class": (train_only_class, {"test_has_class"}, ["extra"]),
    "leakage": (leaked, {"leakage"}, ["train/hotdog/0000.jpg", "test/hotdog/copy.jpg"]),
    "decompression-bomb": (bomb, {"decodes", "pixels"}, ["train/hotdog/huge.png", "validate.max_pixels"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_dataset_stops_with_the_failed_checks_and_files(project, capsys, case):
    make, failed, words = BAD[case]
    make(data(project))
    code, output, report = run_validate(capsys)
    assert code == 1
    assert set(report["failed"]) == failed and report["passed"] is False
    assert "validation failed" in output and "validate.on_failure: quarantine" in output
    assert " at 0x" not in output  # decoder messages without Python object reprs
    for check in failed:
        assert f"- {check}:" in output
    for word in words:
        assert word in output, f"{word!r} not in {output}"
    assert not Path("data/validate/files.csv").exists()  # nothing for training to read
    assert Path("data/validate/index.parquet").exists()  # the evidence stays


def test_valid_dataset_passes_and_writes_everything(project, capsys):
    code, output, report = run_validate(capsys)
    assert code == 0, output
    assert report["passed"] and report["failed"] == [] and report["files"] == report["used"] == 10
    assert report["counts"] == {"train": {"hotdog": 3, "not-hotdog": 3}, "test": {"hotdog": 2, "not-hotdog": 2}}
    assert all(check["success"] for check in report["checks"].values())
    files = pd.read_csv("data/validate/files.csv")
    assert list(files.columns) == ["path", "split", "class"] and len(files) == 10
    docs = Path("gx/uncommitted/data_docs/index.html")
    assert docs.exists() and "images" in docs.read_text() and str(docs.resolve()) in output
    assert len(pd.read_parquet("data/validate/index.parquet")) == 10


def test_valid_oddities_pass_and_their_modes_are_indexed(project, capsys):
    for name, (make, _) in ODDITIES.items():
        (data(project) / "train" / "hotdog" / name).write_bytes(make())
    code, output, report = run_validate(capsys)
    assert code == 0, output
    index = pd.read_parquet("data/validate/index.parquet").set_index("path")
    modes = set(index.loc[[f"train/hotdog/{name}" for name in ODDITIES], "mode"])
    assert {"CMYK", "L", "RGBA", "P", "RGB"} <= modes and modes & {"I;16", "I"}
    assert index.loc["train/hotdog/rotated.jpg", "orientation"] == 6


def test_warnings_are_reported_but_do_not_fail(project, capsys, caplog):
    configure(project, expected_per_class={"train": 1000, "test": 400})
    shutil.copy(data(project) / "train/hotdog/0000.jpg", data(project) / "train/hotdog/again.jpg")
    code, output, report = run_validate(capsys)
    assert code == 0, output
    assert set(report["warnings"]) == {"train_expected_count", "test_expected_count", "duplicates"}
    assert "warning only: duplicates" in caplog.text and "train/hotdog/again.jpg" in caplog.text


def test_class_imbalance_fails(project, capsys):
    configure(project, max_class_ratio=1.5)
    for i in range(3):
        (data(project) / f"train/hotdog/more{i}.jpg").write_bytes(rgb_jpeg(300 + i))
    code, output, report = run_validate(capsys)
    assert code == 1 and report["failed"] == ["train_balance"] and "hotdog" in output


def test_unknown_extension_fails(project, capsys):
    (data(project) / "train/hotdog/scan.jfif").write_bytes(rgb_jpeg(77))
    code, output, report = run_validate(capsys)
    assert code == 1 and report["failed"] == ["extension"] and "train/hotdog/scan.jfif" in output


def test_a_failed_validation_keeps_the_last_good_file_list(project, capsys):
    assert run_validate(capsys)[0] == 0
    good = Path("data/validate/files.csv").read_bytes()
    corrupt(data(project))
    assert run_validate(capsys)[0] == 1
    assert Path("data/validate/files.csv").read_bytes() == good


def test_quarantine_leaves_out_bad_files_and_the_train_copy_of_a_leak(project, capsys):
    configure(project, on_failure="quarantine")
    corrupt(data(project))
    bomb(data(project))
    leaked(data(project))
    before = sorted(p.relative_to(project).as_posix() for p in data(project).rglob("*"))
    code, output, report = run_validate(capsys)
    assert code == 0, output
    assert report["quarantined_files"] == ["train/hotdog/0000.jpg", "train/hotdog/bad.jpg", "train/hotdog/huge.png"]
    assert set(report["failed_before_quarantine"]) == {"decodes", "pixels", "leakage"}
    assert report["passed"] and report["failed"] == [] and report["files"] == 13 and report["used"] == 10
    files = set(pd.read_csv("data/validate/files.csv")["path"])
    assert "test/hotdog/copy.jpg" in files and not files & set(report["quarantined_files"])
    # Nothing was deleted or moved in the dataset itself.
    assert sorted(p.relative_to(project).as_posix() for p in data(project).rglob("*")) == before
    assert "10 of 13 files (3 quarantined)" in output


def test_quarantine_still_fails_when_too_little_remains(project, capsys):
    configure(project, on_failure="quarantine")  # at least 2 images per class and split
    for name in ("0000.jpg", "0001.jpg"):
        (data(project) / "train/hotdog" / name).write_bytes(b"not an image")
    code, output, report = run_validate(capsys)
    assert code == 1
    assert report["quarantined_files"] == ["train/hotdog/0000.jpg", "train/hotdog/0001.jpg"]
    assert report["failed"] == ["train_min_images"] and "even after quarantining 2 files" in output
    assert "hotdog" in output.split("- train_min_images:")[1]


def test_missing_dataset_folder_says_to_fetch_first(project, capsys):
    shutil.rmtree(data(project))
    capsys.readouterr()
    assert main(["validate"]) == 1
    assert "fetch the dataset first" in capsys.readouterr().err


def test_unchanged_params_leave_the_saved_suites_as_they_are(project, capsys):
    configure(project, expected_per_class={"train": 1000, "test": 400}, min_images_per_class=10)
    # With the repo's own settings, the suites committed in gx/ must come out byte-identical.
    write_params(REPO / "params.yaml", project / "params.yaml", {})
    saved = {p.name: p.read_bytes() for p in (REPO / "gx" / "expectations").glob("*.json")}
    main(["validate"])
    assert {p.name: p.read_bytes() for p in Path("gx/expectations").glob("*.json")} == saved
    assert Path("gx/great_expectations.yml").read_bytes() == (REPO / "gx" / "great_expectations.yml").read_bytes()


@pytest.mark.slow
def test_dvc_repro_halts_at_validate_and_training_keeps_its_output(tmp_path):
    good = tmp_path / "good.zip"
    good.write_bytes(dataset_zip())
    workspace = sync_workspace(REPO, tmp_path / "ws", {"data.url": good.as_uri(),
                               "data.checksum": sha(good.read_bytes()), **TINY_DATA}, share_cache=False)
    first = dvc(workspace, "repro")
    assert "Running stage 'validate'" in first.stdout and "Running stage 'train@finetune'" in first.stdout
    model = (workspace / "models/finetune/model.pt").read_bytes()
    files = (workspace / "data/validate/files.csv").read_bytes()
    trained = yaml.safe_load((workspace / "dvc.lock").read_text())["stages"]["train@finetune"]

    bad = tmp_path / "bad.zip"  # the same data plus a corrupt JPEG
    with zipfile.ZipFile(io.BytesIO(dataset_zip())) as zf:
        entries = {name: zf.read(name) for name in zf.namelist()}
    bad.write_bytes(make_zip(entries | {"hotdog/train/hotdog/broken.jpg": b"\xff\xd8garbage"}))
    write_params(workspace / "params.yaml", workspace / "params.yaml",
                 {"data.url": bad.as_uri(), "data.checksum": sha(bad.read_bytes())})
    second = dvc(workspace, "repro", check=False)
    output = second.stdout + second.stderr
    assert second.returncode != 0 and "validation failed" in output
    assert "train/hotdog/broken.jpg" in output and "Running stage 'train@" not in output
    assert (workspace / "models/finetune/model.pt").read_bytes() == model
    assert (workspace / "data/validate/files.csv").read_bytes() == files
    assert yaml.safe_load((workspace / "dvc.lock").read_text())["stages"]["train@finetune"] == trained
    assert "validate" in dvc(workspace, "status", "--json").stdout  # still to do, not faked done
