"""The ``evaluate`` stage: every variant on the test split with its test transform, and against
chance (exact binomial test vs the majority class's share, evaluate.chance_p); the challenger
against the baseline (deltas, exact McNemar test). Writes the metrics JSON (evaluate.metrics), the
summary beside it that `dvc metrics show` prints (``summary.json``: see :func:`summary_document`),
dvc plots data, the same plots as PNG, a Markdown report, and the MLflow record (the pipeline's
parent run and each variant's run).

Every file is written atomically, and only after every variant was scored: a failed evaluation
leaves the previous outputs as they were.

`python -m finetune.stages.evaluate --models models --history plots/train`
"""

from __future__ import annotations

# Before the imports below load torch and MLflow (seconds): a wrong params.yaml fails at once.
from finetune.core.command import check_params_first

check_params_first(__name__, "evaluate")

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from finetune.core.command import exit_now, stage_main
from finetune.core.config import Params
from finetune.core.files import write_atomic
from finetune.data.lineage import data_version
from finetune.evaluate.figures import write_plots
from finetune.evaluate.metrics import VariantEval, metrics_document, per_class_document, summary_document
from finetune.evaluate.report import evaluation_markdown, verdict_line
from finetune.evaluate.scoring import evaluate_variants
from finetune.tracking.evaluation import log_evaluation


@dataclass(frozen=True)
class EvalPaths:
    """Where the stage reads trained models and training histories (from dvc.yaml)."""

    models: Path  # <models>/<variant>/model.pt
    history: Path  # <history>/<variant>.csv: per-epoch stats of the train stage


def run_evaluate(params: Params, paths: EvalPaths, project: Path = Path(".")) -> tuple[list[VariantEval], dict]:
    """Score every variant, compare challenger and baseline, write and log the outputs."""
    results, comparison = evaluate_variants(params, paths.models, project)
    cfg = params.evaluate
    figures = write_plots(results, project / cfg.plots, project / params.data.dir, project / paths.history,
                          cfg.errors_shown)
    document = metrics_document(results, comparison)
    report = evaluation_markdown(document, results, params.data.dir, figures, (project / cfg.report).parent)
    _write_text(project / cfg.metrics, json.dumps(document, indent=2) + "\n")
    validation = project / params.validate_.metrics
    summary = summary_document(document, json.loads(validation.read_text()) if validation.is_file() else None)
    _write_text(project / summary_path(params), json.dumps(summary, indent=2) + "\n")
    _write_text(project / cfg.plots / "per_class.json", json.dumps(per_class_document(results), indent=2) + "\n")
    _write_text(project / cfg.report, report)
    data = (params.data.url, params.data.dir, data_version(project, params.data.dir))
    log_evaluation(results, comparison, project, [project / cfg.metrics, project / cfg.report, *figures.values()], data)
    return results, comparison


# The one file dvc.yaml declares as DVC metrics, beside evaluate.metrics: `dvc metrics show` prints
# one column per key of every declared file, so the other metrics files are plain outputs.
SUMMARY_NAME = "summary.json"


def summary_path(params: Params) -> Path:
    """Where the summary goes: ``summary.json`` in evaluate.metrics' folder (metrics/summary.json)."""
    return params.evaluate.metrics.with_name(SUMMARY_NAME)


def _write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--models`` and ``--history``: the train stages' outputs."""
    parser.add_argument("--models", type=Path, required=True, help="folder of <variant>/model.pt")
    parser.add_argument("--history", type=Path, required=True, help="folder of <variant>.csv (per-epoch stats)")


def run(params: Params, args: argparse.Namespace) -> None:
    """Score every variant on the test split; compare challenger and baseline (settings ``evaluate:``)."""
    results, comparison = run_evaluate(params, EvalPaths(args.models, args.history))
    for r in results:
        floor = (f"above chance (binomial p = {r.chance.p_value:.2g} against {r.chance.chance:.3f})" if r.chance.above
                 else r.chance.reason())
        print(f"{r.name}: " + ", ".join(f"{k} {v:.4f}" for k, v in r.metrics.items()) + f"; {floor}")
    print(f"verdict: {verdict_line(metrics_document(results, comparison))} Report: {params.evaluate.report}")


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("finetune.stages.evaluate", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    exit_now(main())
