"""The ``register`` stage: of the compared variants that did better than chance on the test split
(evaluate.chance_p), the one with the best validation accuracy becomes a new version of
``register.model_name`` in the MLflow registry, alias ``candidate``. When none did, nothing is
registered and register.record says why. Promotion to ``production`` is a separate, gated action
(`python -m finetune promote`; the Prefect flow runs it after this).

`python -m finetune.stages.register --models models`
"""

from __future__ import annotations

# Before the imports below load torch and MLflow (seconds): a wrong params.yaml fails at once.
from finetune.core.command import check_params_first

check_params_first(__name__, "register")

import argparse
from collections.abc import Sequence
from pathlib import Path

from finetune.core.command import exit_now, stage_main
from finetune.core.config import Params
from finetune.evaluate.metrics import uncertainty_words
from finetune.tracking.registry import Registration, register_candidate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--models``: the folder of the train stages' outputs; ``--new-version``: no reuse."""
    parser.add_argument("--models", type=Path, required=True, help="folder of <variant>/model.pt")
    parser.add_argument("--new-version", action="store_true",
                        help="register a new version even if this training has one (e.g. its files are broken)")


def run(params: Params, args: argparse.Namespace) -> None:
    """Register the compared variant above chance that validates best, alias ``candidate``."""
    r = register_candidate(params, args.models, reuse=not args.new_version)
    # Registering nothing is an outcome, not a failure: the stage exits 0, so `dvc repro` and the
    # flow go on to their reports, which say it, and dvc.lock records the stage as done for these
    # inputs (a failure would rerun it on every repro and hide the report that explains why).
    print(registered_words(r, params.register_.record))


def registered_words(r: Registration, record: str | Path) -> str:
    """What the stage did, in one paragraph: the version and the score it was chosen by with its
    uncertainty, or that nothing was registered and why."""
    if not r.registered:
        return (f"nothing registered: {r.reason}. A model that does no better than always answering the largest "
                f"class is never a candidate. Train variants that learn (more epochs, more train images, "
                f"see train: in params.yaml), then `dvc repro`; {record} records this outcome.")
    how = "already registered as" if r.reused else "registered as"
    return (f"{r.variant} ({r.metric} {uncertainty_words(r.value, r.uncertainty)}, run {r.run_id}) {how} "
            f"{r.model_name} version {r.version} @candidate: {r.reason}.")


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("finetune.stages.register", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    exit_now(main())
