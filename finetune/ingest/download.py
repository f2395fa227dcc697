"""Getting an archive onto local disk: HTTP(S) with retries and resume, or a local mirror.

HTTP downloads stream into ``<dest>.part``; a retry after a dropped connection asks for the rest
with a Range request, and starts over when the server answers with the whole file instead.
The finished file is renamed to ``dest`` only when complete, so ``dest`` is never half-written.

A host that cannot be reached at all on the first attempt (its name does not resolve, there is
no route to it, or nothing listens on the port) fails at once: no backoff makes a machine
without network get one, and an offline run should say so in a second, not after minutes.
The same errors after the server has answered once in this download are retried like any
dropped connection (a server restarting, a DNS hiccup).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import requests

from finetune.core.errors import FetchError
from finetune.core.progress import Progress

log = logging.getLogger(__name__)

# Small enough that a dropped connection loses little of what was received.
CHUNK = 1 << 16
# 408 (timeout) and 429 (rate limit) are worth another try, like any 5xx.
_RETRYABLE_4XX = {408, 429}
_HTML_PREFIXES = (b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: per-request timeout, extra attempts, and exponential backoff."""

    timeout_s: float
    retries: int
    backoff_s: float

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        return self.backoff_s * 2**attempt


class _Retryable(Exception):
    """A failure worth another attempt (5xx, dropped connection)."""


# A body cut short surfaces as ChunkedEncodingError (not a ConnectionError) in requests.
_TRANSIENT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
              _Retryable)


# No route to the network or the host: an offline machine, a VPN that is down.
_NO_ROUTE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN}


def unreachable(err: BaseException, host: str) -> str | None:
    """Why ``host`` cannot be reached, in words, when ``err`` (a requests error) says it cannot
    be reached at all: a name that does not resolve, no route, a refused connection. None for
    everything else (timeouts, resets, HTTP errors), which may pass."""
    for cause in _causes(err):
        if isinstance(cause, socket.gaierror):
            return f"the host name {host} does not resolve (DNS: {cause.strerror or cause})"
        if isinstance(cause, ConnectionRefusedError):
            return f"{host} refused the connection (nothing listens on that port)"
        if isinstance(cause, OSError) and cause.errno in _NO_ROUTE:
            return f"there is no route to {host} ({cause.strerror})"
    return None


def check_resolves(url: str) -> None:
    """Raise the not-retried FetchError when ``url``'s host name does not resolve on this
    machine (no network, no DNS) and no proxy would resolve it instead; else nothing.
    A second's check that a pipeline makes before it starts its stages."""
    parsed = urlparse(url)
    if not is_remote(url) or not parsed.hostname or requests.utils.get_environ_proxies(url):
        return
    try:
        socket.getaddrinfo(parsed.hostname, parsed.port or 443, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise _unreachable_error(url, f"the host name {parsed.hostname} does not resolve (DNS: "
                                      f"{err.strerror or err})") from None


def _causes(err: BaseException) -> list[BaseException]:
    """``err`` and every exception it wraps (urllib3 keeps the socket error as ``reason``)."""
    found: list[BaseException] = []
    todo: list[object] = [err]
    while todo:
        item = todo.pop()
        if not isinstance(item, BaseException) or any(item is seen for seen in found):
            continue
        found.append(item)
        todo += [item.__cause__, item.__context__, getattr(item, "reason", None), *item.args]
    return found


def is_remote(url: str) -> bool:
    """True for http:// and https:// URLs."""
    return urlparse(url).scheme in ("http", "https")


def local_path(url: str) -> Path:
    """The file a ``file://`` URL or plain path names."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise FetchError(
                f"data.url {url!r} names a file on another host ({parsed.netloc}). Use "
                "file:///absolute/path (three slashes) for a file on this machine."
            )
        return Path(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise FetchError(
            f"data.url {url!r} has the unsupported scheme {parsed.scheme!r}. Use http(s)://, "
            "file:///absolute/path, or a plain local path."
        )
    return Path(url)


def archive_name(url: str) -> str:
    """The file name to download ``url`` to (its last path segment, or archive.zip)."""
    name = Path(unquote(urlparse(url).path)).name
    return name or "archive.zip"


def looks_like_html(path: Path) -> bool:
    """True when a file starts like a web page (a login, error or captive-portal page)."""
    with open(path, "rb") as f:
        head = f.read(512).lstrip().lower()
    return head.startswith(_HTML_PREFIXES)


def download(url: str, dest: Path, policy: RetryPolicy, session: requests.Session | None = None) -> bool:
    """Download ``url`` to ``dest``; return True if any part of it was resumed from a .part file.

    Retries connection errors, timeouts, dropped connections and 5xx with exponential backoff;
    raises FetchError for 4xx and for a host it cannot reach at all (see :func:`unreachable`)
    at once, and for the rest once the retries are spent.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    session = session or requests.Session()
    resumed = False
    statuses: list[int] = []  # HTTP status of every response: none at all means no connection
    with Progress(f"download {archive_name(url)}") as progress:
        for attempt in range(policy.retries + 1):
            try:
                resumed |= _attempt(session, url, part, policy.timeout_s, progress, statuses)
                os.replace(part, dest)
                return resumed
            except _TRANSIENT as err:
                why = None if statuses else unreachable(err, urlparse(url).hostname or url)
                if why is not None:
                    raise _unreachable_error(url, why) from None
                if attempt == policy.retries:
                    raise _gave_up(url, attempt + 1, err, connected=bool(statuses)) from None
                wait = policy.delay(attempt)
                log.warning("download of %s failed (%s); retry %d/%d in %.1f s",
                            url, _reason(err, url), attempt + 1, policy.retries, wait)
                time.sleep(wait)
    raise AssertionError("unreachable")


def _attempt(session: requests.Session, url: str, part: Path, timeout: float, progress: Progress,
             statuses: list[int]) -> bool:
    """One GET into ``part``, resuming it when possible; return True if it resumed."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with session.get(url, stream=True, timeout=timeout, headers=headers) as response:
        statuses.append(response.status_code)
        if response.status_code == 416:  # our .part is not a prefix of this file: start over
            part.unlink()
            raise _Retryable("HTTP 416: the partial download did not match; starting over")
        _check_status(url, response)
        resumed = offset > 0 and _continues_at(response, offset)
        if offset and not resumed:
            log.info("server ignored the Range request; restarting %s from the beginning", url)
        start = offset if resumed else 0
        length = response.headers.get("Content-Length")
        expected = start + int(length) if length and length.isdigit() else None
        progress.reset(start, expected)
        written = start
        with open(part, "ab" if resumed else "wb") as f:
            for chunk in response.iter_content(CHUNK):
                f.write(chunk)
                written += len(chunk)
                progress.update(len(chunk))
    if expected is not None and written < expected:
        raise _Retryable(f"connection closed after {written} of {expected} bytes")
    return resumed


def _continues_at(response: requests.Response, offset: int) -> bool:
    """True if the server answered a Range request with the bytes from ``offset`` on."""
    content_range = response.headers.get("Content-Range", "")
    return response.status_code == 206 and content_range.startswith(f"bytes {offset}-")


def _check_status(url: str, response: requests.Response) -> None:
    code = response.status_code
    if code >= 500 or code in _RETRYABLE_4XX:
        raise _Retryable(f"HTTP {code} {response.reason}")
    if code >= 400:
        raise FetchError(
            f"Download of {url} failed: the server answered HTTP {code} {response.reason}. "
            "Check data.url in params.yaml (a typo, or the file moved); if you have a copy of "
            "the archive, set data.url to its local path instead."
        )


def _reason(err: Exception, url: str = "") -> str:
    """``err`` in a few words: plain ones for an unreachable host, else its text, cut short."""
    plain = unreachable(err, urlparse(url).hostname or url)
    text = plain or str(err)
    return text if len(text) < 200 else text[:200] + "..."


# Both "no connection" messages end with this: the way round a missing network.
AIR_GAPPED = ("To run air-gapped, copy the archive here from a machine that can download it and set "
              "data.url in params.yaml to its path (e.g. file:///mirrors/hotdog.zip); keep "
              "data.checksum as it is, so the copy is verified. To try the pipeline without "
              "network, `make demo` runs it offline on a generated dataset.")


def _unreachable_error(url: str, why: str) -> FetchError:
    """The error for a host that could not be reached at all (not retried)."""
    return FetchError(
        f"Could not download {url}: {why}. Not retried: this machine may have no network access, "
        f"or needs a proxy (HTTPS_PROXY), or data.url names the wrong host or port. {AIR_GAPPED}"
    )


def _gave_up(url: str, attempts: int, err: Exception, connected: bool) -> FetchError:
    """The error for a download that failed on every attempt."""
    host = urlparse(url).netloc
    if connected:
        return FetchError(
            f"Download of {url} failed after {attempts} attempts; the last one: {_reason(err, url)}. The server "
            "or the connection is failing; try again later, raise data.retries, or download the "
            "archive another way and set data.url to its local path."
        )
    return FetchError(
        f"Could not download {url}: no connection to {host} after {attempts} attempts "
        f"({_reason(err, url)}). This machine may have no network access, or a proxy is needed. "
        f"{AIR_GAPPED}"
    )
