"""The validate stage's self-contained Data Docs page (finetune/ingest/report_html.py), written by the
real stage on generated images: readable offline (nothing fetched from the network), with the
verdict, the counts, every expectation and the offending files of a failing one."""

from __future__ import annotations

import html
import re
import shutil
from pathlib import Path

import pytest
from conftest import REPO
from images import write_dataset

from finetune.cli import main
from finetune.demo.workspace import write_params

DOCS = Path("gx/uncommitted/data_docs")
# Anything the browser would fetch or follow: src=, href=, CSS url(), @import.
REMOTE = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?\s*(?:https?:)?//|@import""",
                    re.IGNORECASE)


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project with the repo's params and GX context (no Data Docs yet) and a valid dataset."""
    shutil.copytree(REPO / "gx", tmp_path / "gx", ignore=shutil.ignore_patterns("uncommitted"))
    write_params(REPO / "params.yaml", tmp_path / "params.yaml",
                 {"validate.min_images_per_class": 2, "validate.expected_per_class": None})
    write_dataset(tmp_path / "data" / "hotdog")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def validate(capsys) -> tuple[int, str, str]:
    """Run the stage; its exit code, its output and the page it wrote."""
    capsys.readouterr()
    code = main(["validate"])
    out = capsys.readouterr()
    return code, out.out + out.err, (DOCS / "index.html").read_text(encoding="utf-8")


def expectation_names() -> list[str]:
    import json

    report = json.loads(Path("reports/validate.json").read_text())
    return list(report["checks"])


def test_a_failed_validation_names_each_expectation_and_the_offending_files(project, capsys):
    (project / "data/hotdog/train/hotdog/bad.jpg").write_bytes(bytes(range(256)) * 4)
    shutil.copy(project / "data/hotdog/train/hotdog/0000.jpg", project / "data/hotdog/test/hotdog/copy.jpg")
    code, output, page = validate(capsys)
    assert code == 1
    assert str((DOCS / "index.html").resolve()) in output  # the error message points to the page
    assert "FAILED" in page and "PASSED" not in page
    names = expectation_names()
    assert len(names) >= 15
    for name in names:
        assert f"<code>{name}</code>" in page
    # The failing checks with their files, the decoder's reason without Python object reprs.
    failing = page.split("Offending files per expectation")[1]
    for name in ("decodes", "leakage"):
        assert f"<code>{name}</code>: " in failing
    for path in ("train/hotdog/bad.jpg", "train/hotdog/0000.jpg", "test/hotdog/copy.jpg"):
        assert f"<code>{path}</code>" in failing
    assert "UnidentifiedImageError" in page and " at 0x" not in page and " at 0x" not in output
    assert "✘ FAIL" in page and "✔ pass" in page


def test_a_passed_validation_shows_the_counts_per_split_and_class(project, capsys):
    code, output, page = validate(capsys)
    assert code == 0, output
    assert str((DOCS / "index.html").resolve()) in output
    assert "PASSED" in page and "10 of 10 files used" in page
    counts = re.sub(r"\s+", "", page.split("Images per split and class")[1].split("</table>")[0])
    assert '<tr><th>class</th><th>train</th><th>test</th></tr>' in counts
    assert '<tr><td>hotdog</td><tdclass="n">3</td><tdclass="n">2</td></tr>' in counts
    assert '<tr><td>not-hotdog</td><tdclass="n">3</td><tdclass="n">2</td></tr>' in counts
    for name in expectation_names():
        assert f"<code>{name}</code>" in page


def test_the_page_fetches_nothing_and_links_to_gx_own_pages(project, capsys):
    (project / "data/hotdog/train/hotdog/bad.jpg").write_bytes(b"not an image")
    validate(capsys)
    _, _, page = validate(capsys)  # a second run: GX keeps both, the page is about the last
    assert not REMOTE.search(page), REMOTE.search(page)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    # GX's original index, renamed, still lists the validations (in its script data).
    gx_index = (DOCS / "gx-index.html").read_text()
    assert "validations/images/" in gx_index and "dataset-images.html" in gx_index
    links = re.findall(r'href="([^"]+)"', page)
    assert "gx-index.html" in links
    pages = [link for link in links if link.startswith("validations/")]
    assert len(pages) == 3  # this run's images, classes and splits pages, not the first run's
    assert all((DOCS / html.unescape(link)).is_file() for link in links)


def test_the_remote_pattern_catches_cdn_references():
    """The check above would see what GX's own index loads (so a pass means something)."""
    for text in ('<script src="https://cdn.example/x.js">', "<link href='http://x/y.css'>",
                 '<img src="//cdn/x.png">', "body{background:url(https://x/y.png)}", "@import 'x.css';"):
        assert REMOTE.search(text), text
    assert not REMOTE.search('<a href="validations/images/run/x.html">x</a>')
