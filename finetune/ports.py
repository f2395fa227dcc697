"""`python -m finetune.ports NAME PORT`: exit 2 with one line naming the setting when PORT is
taken on 127.0.0.1, before a server starts (a server that fails on a busy port after printing
its URL leaves that URL pointing at whatever holds the port)."""

from __future__ import annotations

import socket
import sys


def busy(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on ``host:port`` (a connection is accepted)."""
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex((host, port)) == 0


def main(argv: list[str]) -> int:
    name, port = argv[0], int(argv[1])
    if busy(port):
        print(f"port {port} on 127.0.0.1 is already in use by another program: set {name} to a free "
              f"port (e.g. make ... {name}={port + 1}), or stop what listens there.", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
