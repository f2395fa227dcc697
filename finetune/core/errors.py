"""Errors a user can act on. Each message says what went wrong, where, and what to do."""

import re

# Python object reprs that libraries put in their messages (``<_io.BytesIO object at 0x7f...>``):
# noise to a reader, and an address leaked to whoever reads a server's answer.
OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def plain_error(text: object) -> str:
    """``text`` without Python object reprs."""
    return OBJECT_REPR.sub("", str(text))


class FinetuneError(Exception):
    """Base of every error the CLI reports as a plain message (no traceback), exit code 1."""


class ConfigError(FinetuneError):
    """params.yaml is missing, unreadable or has an invalid value."""


class FetchError(FinetuneError):
    """The dataset could not be downloaded, verified or extracted; the previous one is intact."""


class TrainingBusy(FinetuneError):
    """Another process is training into the same output folder (it holds the folder's lock)."""


class WriteError(FinetuneError):
    """A file could not be written: no permission, a read-only or full disk, a file in the way."""
