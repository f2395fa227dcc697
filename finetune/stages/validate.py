"""The ``validate`` stage: index every file of ``data.dir`` and check the index with the Great
Expectations suites built from params ``validate:``. Nothing trains on data that failed: with
``on_failure: stop`` a failed check ends the pipeline here; with ``quarantine`` the bad files are
left out of the file list that training reads.

`python -m finetune.stages.validate`
"""

from __future__ import annotations

# Before the imports below load Great Expectations (seconds): a wrong params.yaml fails at once.
from finetune.core.command import check_params_first

check_params_first(__name__, "validate")

import argparse
import logging
from collections.abc import Sequence

from finetune.core.command import exit_now, stage_main
from finetune.core.config import Params
from finetune.ingest.validation import ValidationFailed, failure_message, validate_dataset

log = logging.getLogger("finetune")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The stage has no arguments of its own: params.yaml ``validate:`` says everything."""


def run(params: Params, args: argparse.Namespace) -> None:
    """Index data.dir and check it with the Great Expectations suite (settings ``validate:``)."""
    cfg = params.validate_
    verdict = validate_dataset(cfg, params.data.dir)
    report = verdict.report
    for check in verdict.checks:
        if not check.success and check.severity != "critical":
            log.warning("warning only: %s — %s: %s", check.check, check.description, check.offending[:5])
    if not verdict.passed:
        raise ValidationFailed(failure_message(verdict, cfg))
    print(f"validation passed: {report['used']} of {report['files']} files "
          f"({report['quarantined']} quarantined) -> {cfg.files}; report {cfg.report}; "
          f"Data Docs (offline page) {verdict.docs}")


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("finetune.stages.validate", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    exit_now(main())
