"""The fetch stage against a real HTTP server on 127.0.0.1, through the real CLI.

Every failure must exit non-zero with a clear message and leave the previously fetched dataset
byte-identical.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import stat
import threading
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, dataset_zip, make_zip, sha, tree_digest

from finetune.cli import main
from finetune.demo.workspace import write_params


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """An empty folder to fetch into, as the working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_fetch(project: Path, capsys, **data) -> tuple[int, str]:
    """Write params.yaml with ``data.<key>`` overrides (fast retries) and run `fetch`."""
    overrides = {"data.retries": 2, "data.backoff_s": 0.01, "data.timeout_s": 5}
    overrides.update({f"data.{key}": value for key, value in data.items()})
    write_params(REPO / "params.yaml", project / "params.yaml", overrides)
    capsys.readouterr()
    code = main(["fetch"])
    return code, capsys.readouterr().err


@pytest.fixture
def previous(project, capsys) -> dict[str, str]:
    """A dataset fetched earlier (from a local mirror); failures must leave it as it is."""
    mirror = project / "mirror.zip"
    mirror.write_bytes(dataset_zip(variant=1))
    code, err = run_fetch(project, capsys, url=str(mirror), checksum=sha(mirror.read_bytes()))
    assert code == 0, err
    digest = tree_digest(project / "data" / "hotdog")
    assert len(digest) == 10
    return digest


def assert_failed(project: Path, previous: dict[str, str], code: int, err: str, *phrases: str) -> None:
    assert code == 1
    for phrase in phrases:
        assert phrase in err, f"{phrase!r} not in: {err}"
    assert tree_digest(project / "data" / "hotdog") == previous
    leftovers = [p.name for p in (project / "data").iterdir() if p.name.startswith(".")]
    assert leftovers == []


# --- success ---------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sha1", "sha256"])
def test_http_download_extracts_the_dataset(project, capsys, http_server, algorithm):
    body = dataset_zip()
    url = http_server.serve("/hotdog.zip", body)
    code, err = run_fetch(project, capsys, url=url, checksum=sha(body, algorithm))
    assert code == 0, err
    with zipfile.ZipFile(project / "data" / "downloads" / "hotdog.zip") as zf:
        expected = {name.removeprefix("hotdog/") for name in zf.namelist()}
    assert set(tree_digest(project / "data" / "hotdog")) == expected
    assert (project / "data" / "hotdog" / "train" / "hotdog" / "0000.jpg").read_bytes()[:2] == b"\xff\xd8"


def test_verified_download_is_reused(project, capsys, http_server):
    body = dataset_zip()
    url = http_server.serve("/hotdog.zip", body)
    assert run_fetch(project, capsys, url=url, checksum=sha(body))[0] == 0
    assert run_fetch(project, capsys, url=url, checksum=sha(body))[0] == 0
    assert http_server.statuses("/hotdog.zip") == [200]


@pytest.mark.parametrize("form", ["file-url", "absolute", "relative"])
def test_local_mirror_is_used_in_place_and_kept(project, capsys, form):
    mirror = project / "mirror" / "hotdog.zip"
    mirror.parent.mkdir()
    mirror.write_bytes(dataset_zip())
    url = {"file-url": mirror.as_uri(), "absolute": str(mirror), "relative": "mirror/hotdog.zip"}[form]
    code, err = run_fetch(project, capsys, url=url, checksum=sha(mirror.read_bytes()))
    assert code == 0, err
    assert mirror.exists()
    assert len(tree_digest(project / "data" / "hotdog")) == 10


def test_refetch_replaces_the_dataset_whole(project, capsys, previous):
    """A new archive version replaces every file; files only in the old version disappear."""
    (project / "data" / "hotdog" / "train" / "hotdog" / "stale.jpg").write_bytes(b"old")
    mirror = project / "v2.zip"
    mirror.write_bytes(dataset_zip(variant=2))
    assert run_fetch(project, capsys, url=str(mirror), checksum=sha(mirror.read_bytes()))[0] == 0
    now = tree_digest(project / "data" / "hotdog")
    assert set(now) == set(previous)
    assert now != previous


def test_unverified_archive_is_accepted_with_its_hash_logged(project, capsys, caplog):
    mirror = project / "mirror.zip"
    mirror.write_bytes(dataset_zip())
    with caplog.at_level(logging.WARNING):
        code, err = run_fetch(project, capsys, url=str(mirror), checksum=None)
    assert code == 0, err
    assert sha(mirror.read_bytes()) in caplog.text


def test_archive_without_top_folder_and_with_mac_junk(project, capsys):
    body = make_zip({"train/a/0.jpg": b"x", "test/a/0.jpg": b"y", "__MACOSX/train/._0.jpg": b"z"})
    mirror = project / "flat.zip"
    mirror.write_bytes(body)
    assert run_fetch(project, capsys, url=str(mirror), checksum=sha(body))[0] == 0
    assert sorted(tree_digest(project / "data" / "hotdog")) == ["test/a/0.jpg", "train/a/0.jpg"]


def test_progress_is_plain_lines_off_a_terminal(project, capsys, caplog, http_server):
    big = {f"hotdog/{split}/a/big.bin": bytes(1_500_000) for split in ("train", "test")}
    body = make_zip(big)  # 3 MB: several chunks of the download
    url = http_server.serve("/hotdog.zip", body)
    with caplog.at_level(logging.INFO, logger="finetune.core.progress"):
        assert run_fetch(project, capsys, url=url, checksum=sha(body))[0] == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "finetune.core.progress"]
    assert any("100%" in line for line in lines) and len(lines) >= 3
    assert not any("\r" in line for line in lines)


# --- retries and resume ------------------------------------------------------------------------


def test_server_error_then_success_is_retried(project, capsys, http_server):
    body = dataset_zip()
    url = http_server.serve("/hotdog.zip", body, fail_first=2)
    code, err = run_fetch(project, capsys, url=url, checksum=sha(body))
    assert code == 0, err
    assert http_server.statuses("/hotdog.zip") == [500, 500, 200]


def big_archive(fill: int) -> bytes:
    """An archive of ~600 kB (many download chunks); ``fill`` changes content, not size."""
    entries = {f"hotdog/{split}/a/{i}.bin": bytes([fill]) * 150_000
               for split in ("train", "test") for i in range(2)}
    return make_zip(entries)


def test_dropped_connection_resumes_with_a_range_request(project, capsys, http_server):
    body = big_archive(1)
    url = http_server.serve("/hotdog.zip", body, drop_first=1)
    code, err = run_fetch(project, capsys, url=url, checksum=sha(body))
    assert code == 0, err
    assert http_server.statuses("/hotdog.zip") == [200, 206]
    offset = int(http_server.requests[1].headers["Range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < offset <= len(body) // 2
    assert len(tree_digest(project / "data" / "hotdog")) == 4


def test_dropped_connection_restarts_when_ranges_are_ignored(project, capsys, http_server):
    body = big_archive(1)
    url = http_server.serve("/hotdog.zip", body, drop_first=1, ranges=False)
    code, err = run_fetch(project, capsys, url=url, checksum=sha(body))
    assert code == 0, err
    assert http_server.statuses("/hotdog.zip") == [200, 200]
    assert "Range" in http_server.requests[1].headers  # asked, and was refused
    assert len(tree_digest(project / "data" / "hotdog")) == 4


def test_resume_across_a_changed_file_falls_back_to_a_full_download(project, capsys, http_server):
    old, new = big_archive(1), big_archive(2)
    assert len(old) == len(new)
    url = http_server.serve("/hotdog.zip", old, new, drop_first=1)
    code, err = run_fetch(project, capsys, url=url, checksum=sha(new))
    assert code == 0, err
    assert http_server.statuses("/hotdog.zip") == [200, 206, 200]
    assert set(tree_digest(project / "data" / "hotdog").values()) == {
        hashlib.sha256(bytes([2]) * 150_000).hexdigest()}


# --- failures: clear message, previous dataset untouched ----------------------------------------


def test_checksum_mismatch_names_both_hashes_and_deletes_the_download(project, capsys, previous, http_server):
    body = dataset_zip(variant=3)
    url = http_server.serve("/hotdog.zip", body)
    wrong = sha(b"something else", "sha1")
    code, err = run_fetch(project, capsys, url=url, checksum=wrong)
    assert_failed(project, previous, code, err, "Checksum mismatch", wrong, sha(body, "sha1"),
                  "The download was deleted", "data.checksum")
    assert not (project / "data" / "downloads" / "hotdog.zip").exists()


def test_not_found_fails_at_once(project, capsys, previous, http_server):
    code, err = run_fetch(project, capsys, url=http_server.url("/missing.zip"), checksum=sha(b"x"))
    assert_failed(project, previous, code, err, "HTTP 404", "data.url")
    assert http_server.statuses("/missing.zip") == [404]


def test_server_error_after_retries(project, capsys, previous, http_server):
    url = http_server.serve("/hotdog.zip", b"", fail_first=99)
    code, err = run_fetch(project, capsys, url=url, checksum=sha(b"x"))
    assert_failed(project, previous, code, err, "failed after 3 attempts", "HTTP 500", "data.retries")
    assert http_server.statuses("/hotdog.zip") == [500, 500, 500]


def test_html_page_instead_of_zip(project, capsys, previous, http_server):
    page = b"<!DOCTYPE html><html><body>Please log in</body></html>"
    url = http_server.serve("/hotdog.zip", page, content_type="text/html")
    code, err = run_fetch(project, capsys, url=url, checksum=sha(dataset_zip()))
    assert_failed(project, previous, code, err, "HTML page", "not at a web page")


def test_html_page_is_refused_even_unverified(project, capsys, previous, http_server):
    url = http_server.serve("/hotdog.zip", b"<html><body>moved</body></html>", content_type="text/html")
    code, err = run_fetch(project, capsys, url=url, checksum=None)
    assert_failed(project, previous, code, err, "HTML page", "not a zip archive")


def test_truncated_zip_fails_verification(project, capsys, previous, http_server):
    body = dataset_zip()
    url = http_server.serve("/hotdog.zip", body[: len(body) * 2 // 3])
    code, err = run_fetch(project, capsys, url=url, checksum=sha(body))
    assert_failed(project, previous, code, err, "Checksum mismatch", "truncated zip")


def test_truncated_zip_is_refused_even_unverified(project, capsys, previous):
    mirror = project / "cut.zip"
    mirror.write_bytes(dataset_zip()[:900])
    code, err = run_fetch(project, capsys, url=str(mirror), checksum=None)
    assert_failed(project, previous, code, err, "truncated or not a zip", str(mirror))
    assert mirror.exists()  # a local mirror is never deleted


def _symlink_entry() -> zipfile.ZipInfo:
    info = zipfile.ZipInfo("hotdog/train/hotdog/link.jpg")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("hotdog/../../evil.txt", "climbs out"),
        ("/tmp/finetune-evil.txt", "absolute path"),
        ("C:/evil.txt", "absolute path"),
        (_symlink_entry(), "symbolic link"),
    ],
    ids=["zip-slip", "absolute", "drive-letter", "symlink"],
)
def test_unsafe_entries_are_refused_before_extraction(project, capsys, previous, http_server, entry, problem):
    good = {f"hotdog/{s}/a/0.jpg": b"x" for s in ("train", "test")}
    body = make_zip([*good.items(), (entry, b"/etc/passwd")])
    url = http_server.serve("/hotdog.zip", body)
    code, err = run_fetch(project, capsys, url=url, checksum=sha(body))
    assert_failed(project, previous, code, err, "is unsafe", problem, "Nothing was extracted")
    assert not (project.parent / "evil.txt").exists() and not Path("/tmp/finetune-evil.txt").exists()


def test_zip_bomb_is_refused_by_the_size_bound(project, capsys, previous, http_server):
    entries = {"hotdog/train/a/big.bin": b"\0" * 2_000_000, "hotdog/test/a/0.jpg": b"x"}
    body = make_zip(entries, compression=zipfile.ZIP_DEFLATED)
    assert len(body) < 20_000  # small on the wire, 2 MB unpacked: the shape of a zip bomb
    url = http_server.serve("/hotdog.zip", body)
    code, err = run_fetch(project, capsys, url=url, checksum=sha(body), max_unpacked_mb=1)
    assert_failed(project, previous, code, err, "zip bomb", "data.max_unpacked_mb")


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: connecting is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fetch_logged(project, capsys, caplog, url: str) -> tuple[int, str, list[str]]:
    """Fetch ``url`` (3 attempts allowed); exit code, stderr and the download's log lines."""
    with caplog.at_level(logging.INFO):
        code, err = run_fetch(project, capsys, url=url, checksum=sha(b"x"))
    lines = [r.getMessage() for r in caplog.records if r.name in ("finetune.ingest.download", "finetune.core.progress")]
    return code, err, lines


@pytest.mark.parametrize(("host", "why"), [
    # .invalid never resolves (RFC 6761): the same error as any name on a machine without DNS
    ("nonexistent.invalid", "the host name nonexistent.invalid does not resolve"),
    ("127.0.0.1:{port}", "127.0.0.1 refused the connection"),
])
def test_an_unreachable_host_fails_at_once_with_the_air_gapped_route(project, capsys, caplog, previous, host, why):
    url = f"http://{host.format(port=closed_port())}/hotdog.zip"
    code, err, lines = fetch_logged(project, capsys, caplog, url)
    assert_failed(project, previous, code, err, why, "Not retried", "air-gapped", "file:///", "data.checksum")
    assert err.count("air-gapped") == 1
    assert not any("retry" in line for line in lines), lines  # one attempt, no backoff
    assert not any("done" in line for line in lines) and "download hotdog.zip: failed after 0 B" in lines


def test_a_host_that_answered_once_is_retried_when_it_goes_away(project, capsys, caplog, previous):
    """A server that answers 503 and then stops listening (restarting): the refused connections
    after a first answer are retried like a dropped one, then explained."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        def answer_once_then_close() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            listener.close()

        server = threading.Thread(target=answer_once_then_close, daemon=True)
        server.start()
        code, err, lines = fetch_logged(project, capsys, caplog, f"http://127.0.0.1:{port}/hotdog.zip")
        server.join(timeout=5)
    assert_failed(project, previous, code, err, "failed after 3 attempts", "refused", "data.retries")
    retries = [line for line in lines if "retry" in line]
    assert len(retries) == 2 and "HTTP 503" in retries[0] and "refused" in retries[1], retries
    assert not any("done" in line for line in lines)


def test_missing_local_mirror(project, capsys, previous):
    code, err = run_fetch(project, capsys, url="file:///nonexistent/hotdog.zip", checksum=sha(b"x"))
    assert_failed(project, previous, code, err, "/nonexistent/hotdog.zip", "does not exist")


def test_archive_without_the_dataset_layout(project, capsys, previous):
    body = make_zip({"photos/a.jpg": b"x", "photos/b.jpg": b"y"})
    mirror = project / "other.zip"
    mirror.write_bytes(body)
    code, err = run_fetch(project, capsys, url=str(mirror), checksum=sha(body))
    assert_failed(project, previous, code, err, "train and test missing", "layout")


@pytest.mark.parametrize(
    ("key", "value", "phrase"),
    [
        ("checksum", "md5:abc", "not a checksum"),
        ("checksum", "sha1:xyz", "not a checksum"),
        ("url", "ftp://example.org/hotdog.zip", "unsupported scheme"),
        ("url", "file://otherhost/hotdog.zip", "another host"),
    ],
)
def test_bad_settings_are_explained(project, capsys, previous, key, value, phrase):
    code, err = run_fetch(project, capsys, **{key: value})
    assert_failed(project, previous, code, err, phrase)
