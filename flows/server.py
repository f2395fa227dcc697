"""`make scheduler`: a real Prefect server on 127.0.0.1 with its state under the project
(.prefect/, ignored by git), and the scheduled retraining served against it. Ctrl-C or SIGTERM
stops both (the flow runs first).

Prefect cannot schedule on its ephemeral server, hence this. With PREFECT_API_URL already set
(your own server), only the deployment is served.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from finetune.core.errors import FinetuneError
from finetune.ports import check_free, configured, wait_until_answers
from flows.proctree import stop_on_signals


def start_server(home: Path, port: int, timeout: float = 180) -> subprocess.Popen:
    """`prefect server start` on 127.0.0.1:``port`` with PREFECT_HOME=``home``, once healthy; its
    UI talks to the API on the same port (PREFECT_UI_API_URL, else a profile's 4200)."""
    home.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                        "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
    env.pop("PREFECT_API_URL", None)
    log = (home / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    why = wait_until_answers(server, f"http://127.0.0.1:{port}/api/health", timeout)
    if why:
        raise SystemExit(f"prefect server {why}; see {home / 'server.log'}")
    return server


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.server", description=__doc__)
    parser.add_argument("--workspace", default=".", help="DVC project to retrain (default: here)")
    parser.add_argument("--port", type=int, help="Prefect server port (default: ports.prefect; make PREFECT_PORT=...)")
    args = parser.parse_args(argv)
    server = None
    env = dict(os.environ)
    if "PREFECT_API_URL" not in env:
        try:
            port = check_free("prefect", args.port or configured("prefect", Path(args.workspace) / "params.yaml"))
        except FinetuneError as err:
            print(f"make scheduler: {err}", file=sys.stderr)
            return 2
        server = start_server(Path(".prefect").resolve(), port)
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
        print(f"Prefect server: http://127.0.0.1:{port} (state in .prefect/)", flush=True)
    stop_on_signals()
    served = subprocess.Popen([sys.executable, "-m", "flows.retrain", "--workspace", args.workspace], env=env)
    try:
        return served.wait()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the deployment stops its flow runs first (flows/retrain.py)
        served.send_signal(signal.SIGTERM)
        try:
            served.wait(timeout=40)
        except subprocess.TimeoutExpired:
            served.kill()
        return 130
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    raise SystemExit(main())
