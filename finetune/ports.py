"""Every server's port, from one place: ``ports:`` of params.yaml, or the make variable that
overrides it for one command (``make ui UI_PORT=5050``).

`python -m finetune.ports NAME [PORT]` prints the port the server ``NAME`` (ui, serve, prefect,
s3, postgres) is to use, PORT when given, else ``ports.NAME``; when that port is taken on
127.0.0.1 it prints one line naming the make variable and the params key instead, and exits 2,
before anything starts (a server that fails on a busy port after printing its URL leaves that
URL pointing at whatever holds the port).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from finetune.core.errors import FinetuneError

# The make variable that overrides each ports.<name> (Makefile).
VARIABLES = {"ui": "UI_PORT", "serve": "SERVE_PORT", "prefect": "PREFECT_PORT", "s3": "S3_PORT",
             "postgres": "POSTGRES_PORT"}


class PortBusy(FinetuneError):
    """The port a server is to listen on is taken."""


def busy(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on ``host:port`` (a connection is accepted)."""
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex((host, port)) == 0


def configured(name: str, params_file: Path = Path("params.yaml")) -> int:
    """``ports.<name>`` of ``params_file``."""
    from finetune.core.config import load_params  # noqa: PLC0415 (pydantic: only when no port is given)

    return int(getattr(load_params(params_file).ports, name))


def check_free(name: str, port: int) -> int:
    """``port``, when nothing listens there; else :class:`PortBusy` naming how to choose another."""
    if busy(port):
        variable = VARIABLES[name]
        raise PortBusy(f"port {port} on 127.0.0.1 is already in use by another program: set {variable} to a free "
                       f"port for this command (make ... {variable}={port + 1}) or ports.{name} in params.yaml, "
                       "or stop what listens there.")
    return port


def wait_until_answers(process: subprocess.Popen, url: str, timeout_s: float) -> str | None:
    """None once ``url`` answers (the server ``process`` started is up); else why not, in words:
    it exited, or it did not answer within ``timeout_s`` (then it is terminated)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"exited ({process.returncode})"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return None
        except OSError:
            time.sleep(0.5)
    process.terminate()
    return f"did not answer within {timeout_s:.0f} s"


def main(argv: Sequence[str]) -> int:
    if not argv or argv[0] not in VARIABLES or len(argv) > 2:
        print(f"usage: python -m finetune.ports {{{','.join(VARIABLES)}}} [PORT]", file=sys.stderr)
        return 2
    name = argv[0]
    try:
        port = int(argv[1]) if len(argv) == 2 else configured(name)
        print(check_free(name, port))
    except ValueError:
        print(f"{VARIABLES[name]}={argv[1]} is not a port number: give a number such as "
              f"{VARIABLES[name]}=5050.", file=sys.stderr)
        return 2
    except FinetuneError as err:
        print(err, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
