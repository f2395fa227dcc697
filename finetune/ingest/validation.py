"""Dataset validation (the ``validate`` stage's work): index the dataset, check the index, apply
``validate.on_failure``.

Outputs (paths from params): the index (parquet), the JSON report (a DVC metrics file), the Data
Docs site with its self-contained page of this run (``<validate.docs>/index.html``, readable
offline), and — only when validation passes — the list of files that training uses. A failed
validation therefore never replaces the file list of the last good one.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from finetune.core.config import ValidateConfig
from finetune.core.errors import FinetuneError, plain_error
from finetune.core.files import write_atomic
from finetune.ingest.checks import FILE_CHECKS, CheckResult, build_docs, open_context, run_suites, tables
from finetune.ingest.index import build_index, list_dataset
from finetune.ingest.report_html import write_page

log = logging.getLogger(__name__)
SHOWN_FILES = 20  # offending files named per failed check in the error message


class ValidationFailed(FinetuneError):
    """The dataset failed a critical expectation; the message says which and what to do."""


@dataclass(frozen=True)
class Verdict:
    """The outcome of :func:`validate_dataset`; ``checks`` are those that decided it."""

    passed: bool
    checks: list[CheckResult]
    quarantined: list[str]
    errors: dict[str, str]  # path -> why the file could not be decoded
    report: dict
    docs: Path  # the run's self-contained HTML page (<validate.docs>/index.html)


def validate_dataset(cfg: ValidateConfig, dataset: Path, workdir: Path = Path(".")) -> Verdict:
    """Index ``dataset``, run the suites, quarantine if the policy says so, write the outputs."""
    started = time.perf_counter()
    if not (workdir / dataset).is_dir():
        raise FinetuneError(f"{dataset} (data.dir) is not a folder: fetch the dataset first "
                            "(`dvc repro fetch`, or `python -m finetune fetch`).")
    listing = list_dataset(workdir / dataset)
    index = build_index(workdir / dataset, listing, max_pixels=cfg.max_pixels, workers=cfg.workers)
    index_seconds = time.perf_counter() - started
    log.info("indexed %d files under %s in %.1f s", len(index), dataset, index_seconds)
    write_atomic(workdir / cfg.index, lambda tmp: index.to_parquet(tmp, index=False))

    run_name = time.strftime("%Y%m%dT%H%M%S")
    context = open_context(cfg, workdir)
    checks = run_suites(cfg, tables(index, listing.classes), context, run_name)
    first_failed = _failed(checks)
    quarantined: list[str] = []
    if first_failed and cfg.on_failure == "quarantine":
        quarantined = quarantine(checks, index)
        kept = index[~index["path"].isin(quarantined)]
        log.warning("quarantined %d files; validating the %d that remain", len(quarantined), len(kept))
        checks = run_suites(cfg, tables(kept, listing.classes), context, f"{run_name}-quarantined")
    used = index[~index["path"].isin(quarantined)]
    passed = not _failed(checks)
    report = _report(cfg, index, used, checks, first_failed, quarantined, listing.ignored,
                     index_seconds, passed)
    write_atomic(workdir / cfg.report, lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))
    write_atomic(workdir / cfg.metrics, lambda tmp: tmp.write_text(json.dumps(headline(report), indent=2) + "\n"))
    if passed:
        files = used.loc[:, ["path", "split", "class"]]
        write_atomic(workdir / cfg.files, lambda tmp: files.to_csv(tmp, index=False))
    failing = index.dropna(subset=["error"])
    errors = {path: plain_error(error) for path, error in zip(failing["path"], failing["error"], strict=True)}
    docs = write_page(build_docs(cfg, context, workdir), report, checks, errors, dataset, run_name)
    return Verdict(passed, checks, quarantined, errors, report, docs)


def quarantine(checks: list[CheckResult], index: pd.DataFrame) -> list[str]:
    """The files to leave out: those failing a critical per-file check.

    Of a file found in both splits only the train copies go, so that the test set (what models
    are compared on) stays whole.
    """
    split_of = dict(zip(index["path"], index["split"], strict=True))
    bad = set()
    for check in checks:
        if check.success or check.severity != "critical" or check.check not in FILE_CHECKS:
            continue
        bad.update(p for p in check.offending if check.check != "leakage" or split_of[p] == "train")
    return sorted(bad)


def failure_message(verdict: Verdict, cfg: ValidateConfig) -> str:
    """What failed, up to SHOWN_FILES offenders per check (with decoder errors), and what to do."""
    failed = _failed(verdict.checks)
    lines = [f"validation failed: {len(failed)} expectation(s) not met"
             + (f" even after quarantining {len(verdict.quarantined)} files" if verdict.quarantined else "")
             + ":"]
    for check in failed:
        lines.append(f"- {check.check}: {check.description} — {len(check.offending)} offending:")
        kind = "class " if check.table == "classes" else ""
        for name in check.offending[:SHOWN_FILES]:
            error = verdict.errors.get(name)
            lines.append(f"    {kind}{name}" + (f"  ({error})" if error else ""))
        if len(check.offending) > SHOWN_FILES:
            lines.append(f"    ... and {len(check.offending) - SHOWN_FILES} more (see {cfg.report})")
    lines.append(
        "Nothing downstream runs. Fix or remove these files in the dataset (then publish a new "
        "archive and update data.url/data.checksum), adjust the thresholds under validate: in "
        "params.yaml if they are wrong for this data, or set validate.on_failure: quarantine to "
        f"train without the bad files. Details: {cfg.report}; every expectation and offending file, "
        f"readable offline: {verdict.docs}"
    )
    return "\n".join(lines)


def _failed(checks: list[CheckResult]) -> list[CheckResult]:
    return [c for c in checks if not c.success and c.severity == "critical"]


def headline(report: dict) -> dict:
    """What `dvc metrics show` prints of a validation: passed, files seen and used, quarantined,
    checks failed (the report has every check and file)."""
    return {"passed": report["passed"], "files": report["files"], "used": report["used"],
            "quarantined": report["quarantined"], "failed_checks": len(report["failed"]),
            "warnings": len(report["warnings"])}


def _report(cfg, index, used, checks, first_failed, quarantined, ignored, seconds, passed) -> dict:
    """The JSON summary: counts, each check, offending files, the policy's effect (its headline
    goes to the DVC metrics file, see :func:`headline`)."""
    counts = used.dropna(subset=["class"]).groupby(["split", "class"]).size()
    return {
        "passed": passed,
        "on_failure": cfg.on_failure,
        "files": len(index),
        "used": len(used),
        "quarantined": len(quarantined),
        "index_seconds": round(seconds, 2),
        "counts": {split: {cls: int(n) for cls, n in counts[split].items()}
                   for split in counts.index.get_level_values(0).unique()},
        "checks": {c.check: {"success": c.success, "offending_count": len(c.offending),
                             "offending": c.offending[:100]} for c in checks},
        "failed": [c.check for c in _failed(checks)],
        "failed_before_quarantine": [c.check for c in first_failed],
        "warnings": [c.check for c in checks if not c.success and c.severity != "critical"],
        "quarantined_files": quarantined,
        "ignored_entries": ignored,
    }
