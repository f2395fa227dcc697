"""The ``study_plan`` stage: what the study stages would train on, in one small file they depend on.

With ``study.enabled: false`` the file says only that, so a recipe, model or data change leaves
a disabled study up to date (its stages would only write the same notes again). Enabled, it holds
everything a study run reads: the seeds and fractions, the compared variants with their
recipes, the model and cache settings, and the DVC hashes (as dvc.lock records them) of the
dataset, the validated file list, the variants' searches and the source model; so the study
stages rerun exactly when one of them changed.

`python -m finetune.stages.study_plan --out reports/study/plan.json`
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from finetune.core.command import exit_now, stage_main
from finetune.core.config import Params
from finetune.core.files import write_atomic
from finetune.data.lineage import data_version

# The folder of the source model (dvc.yaml: the pretrain stage's output), which model.weights may name.
SOURCE_MODEL = Path("models/source")


def study_inputs(params: Params) -> list[Path]:
    """The files and folders a study run reads, as dvc.yaml names them (the plan stage's deps)."""
    searches = [params.search.out / f"{v}.json" for v in (params.evaluate.challenger, params.evaluate.baseline)]
    return [params.data.dir, params.validate_.files, *searches, SOURCE_MODEL]


def plan(params: Params, project: Path = Path(".")) -> dict:
    """The study's plan: ``{"enabled": false}`` when disabled, else every setting and input hash a
    study run depends on."""
    if not params.study.enabled:
        return {"enabled": False}
    variants = {"challenger": params.evaluate.challenger, "baseline": params.evaluate.baseline}
    return {
        "enabled": True,
        "seeds": list(params.study.seeds),
        "fractions": list(params.study.fractions),
        "variants": variants,
        "train": {v: params.train[v].model_dump(mode="json") for v in variants.values()},
        "model": params.model.model_dump(mode="json"),
        "cache_short_side": params.cache.short_side,
        "inputs": {str(path): data_version(project, path) for path in study_inputs(params)},
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--out``: the JSON to write."""
    parser.add_argument("--out", type=Path, required=True, help="JSON of the study's plan")


def run(params: Params, args: argparse.Namespace) -> None:
    """Write the study's plan."""
    document = plan(params)
    write_atomic(args.out, lambda tmp: tmp.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n"))
    print(f"study plan: {'enabled' if document['enabled'] else 'disabled'} -> {args.out}")


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("finetune.stages.study_plan", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    exit_now(main())
