"""`python -m stack up|down|env|restart-postgres` (`make stack`, `make stack-down`): the shared
stack on 127.0.0.1, its state under --root (default .stack/). See docs/team.md."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from stack.lifecycle import down, purge, up
from stack.postgres import StackError
from stack.services import BUCKET, PORT_KEYS, POOL, Stack

DVC_S3_PORT = 9000  # the endpoint of the DVC remote `shared` in .dvc/config


def exports(stack: Stack) -> str:
    """The shell lines a client runs to use the stack."""
    return "\n".join(f"export {name}={value}" for name, value in stack.client_env().items())


def report(stack: Stack, seconds: float) -> None:
    urls = stack.urls()
    print(f"\nThe stack is up ({seconds:.0f} s), state in {stack.root}:")
    print(f"  MLflow UI + API   {urls['MLflow']}   (runs and registry in PostgreSQL, artifacts in s3://{BUCKET}/mlflow)")
    print(f"  Prefect UI + API  {urls['Prefect']}   (on PostgreSQL; worker on the pool {POOL})")
    print(f"  S3 object store   {urls['S3']}   (bucket {BUCKET}; DVC remote `shared` = s3://{BUCKET}/dvc)")
    print(f"  PostgreSQL        {urls['PostgreSQL']}   (user finetune, databases mlflow and prefect)")
    print("\nIn each client's shell (also in .stack/env.sh: `source .stack/env.sh`):\n")
    print(exports(stack))
    if stack.ports.s3 != DVC_S3_PORT:
        print(f"dvc remote modify --local shared endpointurl {urls['S3']}")
    print("\nThen: make deploy; prefect deployment run finetune-retrain/scheduled-retrain; dvc push -r shared."
          "\nStop with `make stack-down` (PostgreSQL's data stays; the object store's objects do not).")


def overrides(given: list[str]) -> dict[str, int]:
    """``["UI=5050", ...]`` as Ports fields (``{"mlflow": 5050}``)."""
    fields = {key.upper(): name for name, key in PORT_KEYS.items()}
    found = {}
    for item in given:
        name, _, port = item.partition("=")
        if name.upper() not in fields or not port.isdigit():
            raise SystemExit(f"make stack: --port {item}: expected NAME=PORT with NAME one of {', '.join(fields)}")
        found[fields[name.upper()]] = int(port)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stack", description=__doc__)
    parser.add_argument("action", choices=["up", "down", "env", "restart-postgres"])
    parser.add_argument("--root", default=".stack", help="the stack's state folder (default: %(default)s)")
    parser.add_argument("--project", default=".", help="the folder the worker runs flows in (default: here)")
    parser.add_argument("--purge", action="store_true", help="with down: delete the state folder too")
    parser.add_argument("--port", action="append", default=[], metavar="NAME=PORT",
                        help="with up: another port for UI (MLflow), PREFECT, S3 or POSTGRES than ports: in params.yaml")
    args = parser.parse_args(argv)
    stack = Stack(Path(args.root), Path(args.project))
    if args.port:
        stack = Stack(stack.root, stack.project, replace(stack.ports, **overrides(args.port)))
    try:
        if args.action == "up":
            seconds = up(stack)
            (stack.root / "env.sh").write_text(exports(stack) + "\n")
            report(stack, seconds)
        elif args.action == "down":
            purge(stack) if args.purge else down(stack)
            print(f"The stack is stopped{' and its state deleted' if args.purge else f'; its state stays in {stack.root}'}.")
        elif args.action == "env":
            print(exports(stack))
        else:
            stack.postgres.restart()
    except StackError as err:
        print(f"make stack: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
