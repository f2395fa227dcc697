"""The ``register`` stage: the variant that wins on ``register.metric`` becomes a new version of
``register.model_name`` in the MLflow registry, alias ``candidate``. Promotion to ``production``
is a separate, gated action (`python -m finetune promote`; the Prefect flow runs it after this).

`python -m finetune.stages.register --models models`
"""

from __future__ import annotations

# Before the imports below load torch and MLflow (seconds): a wrong params.yaml fails at once.
from finetune.command import check_params_first

check_params_first(__name__, "register")

import argparse
from collections.abc import Sequence
from pathlib import Path

from finetune.command import exit_now, stage_main
from finetune.config import Params
from finetune.tracking.registry import register_candidate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--models``: the folder of the train stages' outputs; ``--new-version``: no reuse."""
    parser.add_argument("--models", type=Path, required=True, help="folder of <variant>/model.pt")
    parser.add_argument("--new-version", action="store_true",
                        help="register a new version even if this training has one (e.g. its files are broken)")


def run(params: Params, args: argparse.Namespace) -> None:
    """Register the variant that wins on register.metric as a new version, alias ``candidate``."""
    r = register_candidate(params, args.models, reuse=not args.new_version)
    how = "already registered as" if r.reused else "registered as"
    print(f"{r.variant} ({r.metric} {r.value:.4f}, run {r.run_id}) {how} {r.model_name} version {r.version} "
          f"@candidate")


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("finetune.stages.register", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    exit_now(main())
