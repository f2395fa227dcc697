"""The ``study@<seed>`` stages: with one seed, evaluate.challenger and evaluate.baseline trained on
each of ``study.fractions`` of the train split and scored on the test split, each training
recorded as it trains (one training record: a run nested under the study's parent run in
MLflow). Writes ``<study.runs>/seed-<seed>.json`` (every run's accuracies and per-image test
outcomes), which the ``study_report`` stage summarises. With ``study.enabled: false`` it only
writes a note, so `dvc repro` costs nothing extra.

`python -m finetune.stages.study --seed 0 --out reports/study/seed-0.json`
"""

from __future__ import annotations

# First of all, while the `dvc repro` that started this process is surely alive: note it, so
# that killing it even during the imports below ends this stage (finetune/core/guard.py).
from finetune.core.guard import record_starter

record_starter(__name__)

# Before the imports below load torch and MLflow (seconds): a wrong params.yaml fails at once.
from finetune.core.command import check_params_first

check_params_first(__name__, "study")

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from finetune.core.command import exit_now, stage_main
from finetune.core.config import Params
from finetune.core.errors import ConfigError
from finetune.core.files import fingerprint_of, write_atomic
from finetune.core.guard import stop_with_starter
from finetune.data.lineage import data_version
from finetune.tracking.study import study_parent, study_record
from finetune.train.search import read_search, tuned
from finetune.train.study import study_seed


def study_key(params: Params, project: Path) -> str:
    """What makes two study runs the same study: data, recipes of both variants (as their searches
    tuned them), model, plan."""
    variants = (params.evaluate.challenger, params.evaluate.baseline)
    return fingerprint_of(data_version(project, params.data.dir), params.model.model_dump(mode="json"),
                          {v: tuned(params.train[v], read_search(project, params.search.out / f"{v}.json", v))
                           .model_dump() for v in variants},
                          params.study.model_dump(mode="json", include={"seeds", "fractions"}))


def run_seed(params: Params, seed: int, out: Path, project: Path = Path(".")) -> dict:
    """The study's trainings with ``seed``; the document written to ``out``."""
    if not params.study.enabled:
        document = {"enabled": False, "seed": seed,
                    "note": "study.enabled is false: nothing trained (make study, or set it true in params.yaml)"}
    else:
        parent = study_parent(project, params.data.dir, study_key(params, project))
        records = study_seed(params, seed, project, lambda run: study_record(project, parent, run))
        document = {"enabled": True, "seed": seed, "parent_run": parent, "runs": records}
    write_atomic(project / out, lambda tmp: tmp.write_text(json.dumps(document) + "\n"))
    return document


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--seed`` (one of study.seeds) and ``--out`` (the JSON to write)."""
    parser.add_argument("--seed", type=int, required=True, help="one of study.seeds")
    parser.add_argument("--out", type=Path, required=True, help="JSON of this seed's runs")


def run(params: Params, args: argparse.Namespace) -> None:
    """Train both compared variants on every study fraction with one seed."""
    stop_with_starter()  # a killed `dvc repro` must not leave this process training
    if args.seed not in params.study.seeds:
        raise ConfigError(f"--seed {args.seed} is not in study.seeds {list(params.study.seeds)} (params.yaml)")
    document = run_seed(params, args.seed, args.out)
    if not document["enabled"]:
        print(f"study seed {args.seed}: {document['note']}")
        return
    done = ", ".join(f"{r['variant']} {r['fraction']:g}: {r['test_acc']:.3f}" for r in document["runs"])
    print(f"study seed {args.seed}: test accuracy {done} -> {args.out}")


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("finetune.stages.study", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    exit_now(main())
