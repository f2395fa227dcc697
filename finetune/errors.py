"""Errors a user can act on. Each message says what went wrong, where, and what to do."""


class FinetuneError(Exception):
    """Base of every error the CLI reports as a plain message (no traceback), exit code 1."""


class ConfigError(FinetuneError):
    """params.yaml is missing, unreadable or has an invalid value."""


class FetchError(FinetuneError):
    """The dataset could not be downloaded, verified or extracted; the previous one is intact."""
