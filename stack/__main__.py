"""`python -m stack up|down|env|restart-postgres|backup|restore` (`make stack`, `make stack-down`,
`make stack-backup`, `make stack-restore FILE=...`): the shared stack on 127.0.0.1, its state
under --root (default .stack/). See docs/team.md."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from finetune.core.errors import FinetuneError
from stack.auth import write_user_files
from stack.backup import backup, restore
from stack.lifecycle import down, purge, up
from stack.postgres import StackError
from stack.services import ADMIN, BUCKET, PIPELINE, PORT_KEYS, POOL, READER, Ports, Stack, write_private

DVC_S3_PORT = 9000  # the endpoint of the DVC remote `shared` in .dvc/config


SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING")


def exports(stack: Stack, masked: bool = False) -> str:
    """The shell lines a client runs to use the stack (``masked``: secrets cut to their first characters)."""
    env = stack.client_env()
    for name in SECRET_VARIABLES if masked else ():
        env[name] = env[name][:4] + "..."
    return "\n".join(f"export {name}={value}" for name, value in env.items())


def report(stack: Stack, seconds: float) -> None:
    urls = stack.urls()
    print(f"\nThe stack is up ({seconds:.0f} s), state in {stack.root}:")
    print(f"  MLflow UI + API   {urls['MLflow']}   (runs and registry in PostgreSQL, artifacts in s3://{BUCKET}/mlflow)")
    print(f"  Prefect UI + API  {urls['Prefect']}   (on PostgreSQL; worker on the pool {POOL})")
    print(f"  S3 object store   {urls['S3']}   (bucket {BUCKET}; DVC remote `shared` = s3://{BUCKET}/dvc)")
    print(f"  PostgreSQL        {urls['PostgreSQL']}   (user finetune, databases mlflow, mlflow_auth and prefect)")
    print(f"\nMLflow's users: {PIPELINE} (below), {READER} ({stack.root / f'env.{READER}.sh'}) and {ADMIN} "
          f"({stack.root / f'env.{ADMIN}.sh'}).")
    print(f"In each client's shell: `source {stack.root / 'env.sh'}` (mode 600; secrets are shortened here):\n")
    print(exports(stack, masked=True))
    if stack.ports.s3 != DVC_S3_PORT:
        print(f"dvc remote modify --local shared endpointurl {urls['S3']}")
    print("\nThen: make deploy; prefect deployment run finetune-retrain/scheduled-retrain; dvc push -r shared."
          f"\nStop with `make stack-down` (the data stays: PostgreSQL's, and the objects in {stack.objects});"
          "\n`make stack-backup` writes one archive of both.")


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


def chosen_ports(args: argparse.Namespace) -> Ports | None:
    """The ports that --port sets (all four: params.yaml is not read), the others the stack's own."""
    given = overrides(args.port)
    if not given or len(given) == len(PORT_KEYS):
        return Ports(**given) if given else None
    return replace(Stack(Path(args.root), Path(args.project)).ports, **given)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stack", description=__doc__)
    parser.add_argument("action", choices=["up", "down", "env", "restart-postgres", "backup", "restore"])
    parser.add_argument("--root", default=".stack", help="the stack's state folder (default: %(default)s)")
    parser.add_argument("--project", default=".", help="the folder the worker runs flows in (default: here)")
    parser.add_argument("--purge", action="store_true", help="with down: delete the state folder too")
    parser.add_argument("--port", action="append", default=[], metavar="NAME=PORT",
                        help="with up: another port for UI (MLflow), PREFECT, S3 or POSTGRES than ports: in params.yaml")
    parser.add_argument("--objects", type=Path, help="with a first up: the object store's folder (default: ROOT/objects)")
    parser.add_argument("--file", type=Path, help="backup: the archive to write (default: stack-backups/stack-<UTC "
                        "time>.tar.gz); restore: the archive to read")
    args = parser.parse_args(argv)
    try:
        stack = Stack(Path(args.root), Path(args.project), chosen_ports(args), objects=args.objects)
        if args.action in ("up", "restore"):
            if args.action == "restore" and not args.file:
                raise StackError("restore needs the archive: `make stack-restore FILE=stack-backups/stack-<date>.tar.gz`.")
            seconds = up(stack) if args.action == "up" else restore(stack, args.file)
            write_private(stack.root / "env.sh", exports(stack) + "\n")
            write_user_files(stack)
            report(stack, seconds)
        elif args.action == "backup":
            backup(stack, args.file)
        elif args.action == "down":
            purge(stack) if args.purge else down(stack)
            print(f"The stack is stopped{' and its state deleted' if args.purge else f'; its state stays in {stack.root}'}.")
        elif args.action == "env":
            print(exports(stack, masked=True))  # the whole values: source ROOT/env.sh
        else:
            stack.postgres.restart()
    except (StackError, FinetuneError) as err:
        target = {"backup": "make stack-backup", "restore": "make stack-restore"}.get(args.action, "make stack")
        print(f"{target}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
