"""params.yaml → typed Params: the repo's own file loads; mistakes are named, not ignored."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO

from finetune.config import Checksum, load_params
from finetune.errors import ConfigError
from finetune.workspace import write_params


def test_the_repo_params_load_with_the_books_dataset():
    params = load_params(REPO / "params.yaml")
    assert params.data.url.endswith("/hotdog.zip")
    assert params.data.checksum == Checksum("sha1", "fba480ffa8aa7e0febbb511d181409f899b9baa5")
    assert params.data.dir == Path("data/hotdog")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sha1:FBA480FFA8AA7E0FEBBB511D181409F899B9BAA5", Checksum("sha1", "fba480ffa8aa7e0febbb511d181409f899b9baa5")),
        ("sha256:" + "ab" * 32, Checksum("sha256", "ab" * 32)),
    ],
)
def test_checksum_forms(text, expected):
    assert Checksum.parse(text) == expected
    assert str(expected) == text.lower()


@pytest.mark.parametrize("text", ["md5:" + "a" * 32, "sha1:" + "a" * 39, "sha256:" + "g" * 64, "fba480ff", ""])
def test_bad_checksums_are_refused(text):
    with pytest.raises(ValueError, match="sha1:<40 hex digits>"):
        Checksum.parse(text)


def _params_with(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text() + text)
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("\nextra_section: {a: 1}\n", "extra_section: unknown key"),
        ("\n".join(["", "demo:", "  workspace: demo", "  num_clases: 2"]), "demo.num_clases: unknown key"),
    ],
)
def test_unknown_keys_are_named(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_params(_params_with(tmp_path, extra))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("data.retries", -1, "data.retries: Input should be greater than or equal to 0"),
        ("data.max_unpacked_mb", "lots", "data.max_unpacked_mb"),
        ("demo.max_side", 20, "max_side \\(20\\) is below min_side"),
        ("demo.num_classes", 1, "demo.num_classes"),
    ],
)
def test_invalid_values_are_named(tmp_path, key, value, message):
    path = tmp_path / "params.yaml"
    write_params(REPO / "params.yaml", path, {key: value})
    with pytest.raises(ConfigError, match=message) as caught:
        load_params(path)
    assert str(path) in str(caught.value)


def test_missing_key_and_missing_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text().replace("  retries: 4", "  # retries removed"))
    with pytest.raises(ConfigError, match="data.retries: missing"):
        load_params(path)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "absent.yaml")


def test_params_are_immutable():
    params = load_params(REPO / "params.yaml")
    with pytest.raises(Exception):
        params.data.url = "elsewhere"  # type: ignore[misc]
