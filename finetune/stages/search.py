"""The ``search@<variant>`` stage: the variant's learning rate chosen on validation (or k-fold
cross-validation when the validation split is small) within ``search.budget`` trainings, the
same budget for every variant; ``train@<variant>`` then trains with the chosen values. Writes
``<search.out>/<variant>.json`` (the choice and every trial's score) and logs each trial as an
MLflow child run. With ``search.enabled: false`` it records the variant's own lr, training nothing.

`python -m finetune.stages.search <variant> --out metrics/search/<variant>.json`
"""

from __future__ import annotations

# First of all, while the `dvc repro` that started this process is surely alive: note it, so
# that killing it even during the imports below ends this stage (finetune/core/guard.py).
from finetune.core.guard import record_starter

record_starter(__name__)

# Before the imports below load torch and MLflow (seconds): a wrong params.yaml fails at once.
from finetune.core.command import check_params_first

check_params_first(__name__, "search")

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from finetune.core.command import exit_now, stage_main
from finetune.core.config import Params
from finetune.core.errors import ConfigError
from finetune.core.files import write_atomic
from finetune.core.guard import stop_with_starter
from finetune.tracking.search import log_choice, log_trial, search_run, search_words
from finetune.train.search import disabled_document, plan_search, run_search, search_document, train_labels

log = logging.getLogger(__name__)


def search_variant(params: Params, variant: str, out: Path, project: Path = Path(".")) -> dict:
    """Search ``variant``'s lr (see finetune/train/search.py); the document written to ``out``."""
    if not params.search.enabled:
        document = disabled_document(variant, params.train[variant])
    else:
        plan = plan_search(params, variant, train_labels(params, project)[0])
        with search_run(params, variant, plan, project) as run:
            run_id = run.info.run_id
            trials, chosen = run_search(params, variant, project, plan,
                                        lambda trial: log_trial(run_id, variant, plan, trial))
            document = search_document(variant, plan, trials, chosen) | {"mlflow_run_id": run_id}
            log_choice(document)
    write_atomic(project / out, lambda tmp: tmp.write_text(json.dumps(document, indent=2) + "\n"))
    return document


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The variant and the JSON to write (from dvc.yaml)."""
    parser.add_argument("variant", help="a key under train: in params.yaml")
    parser.add_argument("--out", type=Path, required=True, help="JSON of the chosen values and the trials")


def run(params: Params, args: argparse.Namespace) -> None:
    """Choose one variant's lr on validation within search.budget trainings."""
    stop_with_starter()  # a killed `dvc repro` must not leave this process training
    if args.variant not in params.train:
        raise ConfigError(f"no variant {args.variant!r} under train: in params.yaml; have {sorted(params.train)}")
    document = search_variant(params, args.variant, args.out)
    if not document["enabled"]:
        print(f"search {args.variant}: {document['note']} -> {args.out}")
        return
    table = "; ".join(f"lr {t['lr']:.3g}: " + (t["failure"] if t["failure"] else f"{t['val_acc']:.3f}")
                      for t in document["trials"])
    print(f"search {search_words(document)} [{table}] -> {args.out}")


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("finetune.stages.search", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    exit_now(main())
