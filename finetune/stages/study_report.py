"""The ``study_report`` stage: every seed's study runs summarised — per fraction each variant's
mean test accuracy with its 95% interval, the paired difference, a paired t-test across seeds and
the pooled McNemar test, each variant against chance (the majority class's share of the test
split in ``validate.files``, at ``evaluate.chance_p``); the learning curve (dvc plots data and
PNG), ``study.metrics`` (dvc metrics: the headline numbers; every statistic in
``<study.plots>/summary.json``), ``study.report`` (Markdown, the verdict first), all on the
study's parent MLflow run.
With ``study.enabled: false`` it writes a note in each place.

`python -m finetune.stages.study_report`
"""

from __future__ import annotations

# Before the imports below load torch and MLflow (seconds): a wrong params.yaml fails at once.
from finetune.core.command import check_params_first

check_params_first(__name__, "study_report")

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from finetune.core.command import exit_now, stage_main
from finetune.core.config import Params
from finetune.core.errors import FinetuneError
from finetune.core.files import write_atomic
from finetune.evaluate.figures import learning_curve, save_png
from finetune.evaluate.study import curve_rows, headline, study_markdown, summarize
from finetune.tracking.study import log_study_summary


def read_seeds(params: Params, project: Path) -> tuple[list[dict], str | None]:
    """Every run of every seed's JSON and the study's parent run; raises when one is missing."""
    records, parent = [], None
    for seed in params.study.seeds:
        path = project / params.study.runs / f"seed-{seed}.json"
        if not path.exists():
            raise FinetuneError(f"{path} does not exist: run the study stages first (`dvc repro study@{seed}`).")
        document = json.loads(path.read_text())
        records += document.get("runs", [])
        parent = parent or document.get("parent_run")
    return records, parent


def test_chance(params: Params, project: Path) -> float:
    """The majority class's share of the test split of the validated file list (validate.files):
    what always answering that class scores, the study's chance floor."""
    files_csv = project / params.validate_.files
    if not files_csv.exists():
        raise FinetuneError(f"{files_csv} (validate.files) does not exist: the study's chance floor needs the test "
                            "split's classes. Run the validate stage first (`dvc repro validate`).")
    files = pd.read_csv(files_csv)
    counts = files.loc[files["split"] == "test", "class"].value_counts()
    if counts.empty:
        raise FinetuneError(f"{files_csv} (validate.files) lists no test images; validate the data again "
                            "(`dvc repro validate`).")
    return float(counts.max() / counts.sum())


def report(params: Params, project: Path = Path(".")) -> dict:
    """Summarise the study (or write the disabled note); the metrics document."""
    cfg = params.study
    plots = project / cfg.plots
    plots.mkdir(parents=True, exist_ok=True)
    if not cfg.enabled:
        document = {"enabled": False}
        write_atomic(project / cfg.report, lambda tmp: tmp.write_text(
            "# Study\n\nstudy.enabled is false: no study was run. `make study` runs it.\n"))
        columns = ["train_images", params.evaluate.challenger, params.evaluate.baseline]
        write_atomic(plots / "curve.csv", lambda tmp: tmp.write_text(",".join(columns) + "\n"))
    else:
        records, parent = read_seeds(params, project)
        document = {"enabled": True} | summarize(records, params.evaluate.challenger, params.evaluate.baseline,
                                                 test_chance(params, project), params.evaluate.chance_p)
        write_atomic(plots / "summary.json", lambda tmp: tmp.write_text(json.dumps(document, indent=2) + "\n"))
        frame = pd.DataFrame(curve_rows(document))
        write_atomic(plots / "curve.csv", lambda tmp: frame.to_csv(tmp, index=False))
        png = save_png(learning_curve(document), plots / "curve.png")
        write_atomic(project / cfg.report, lambda tmp: tmp.write_text(study_markdown(document)))
        log_study_summary(project, parent, document, [png, project / cfg.report])
    metrics = {"enabled": True} | headline(document) if cfg.enabled else document
    write_atomic(project / cfg.metrics, lambda tmp: tmp.write_text(json.dumps(metrics, indent=2) + "\n"))
    return document


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No arguments besides --params: paths come from study: in params.yaml."""


def run(params: Params, args: argparse.Namespace) -> None:
    """Summarise every seed's study runs into the learning curve, tables and verdict."""
    document = report(params)
    print(document.get("verdict", "study.enabled is false: no study"), f"({params.study.report})")


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("finetune.stages.study_report", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    exit_now(main())
