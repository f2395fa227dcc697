"""The ``pretrain`` stage: train a source model on a dataset of your own (step 1 of the recipe).

For users with a large source dataset and no route to ImageNet weights, and for the offline
demo. With ``pretrain.data: null`` the stage only writes a note, and ``model.weights`` names the
ImageNet weights (or any state_dict) as usual. The source model always starts from random
weights: params.yaml is refused at load unless ``pretrain.train.init`` is ``scratch``
(finetune/core/config.py says why). Its training is one tracking record (finetune/tracking/runs.py),
which a rerun after a crash continues from the checkpoint.

`python -m finetune.stages.pretrain --out models/source`
"""

from __future__ import annotations

# First of all, while the `dvc repro` that started this process is surely alive: note it, so
# that killing it even during the imports below ends this stage (finetune/core/guard.py).
from finetune.core.guard import record_starter

record_starter(__name__)

# Before the imports below load torch and MLflow (seconds): a wrong params.yaml fails at once.
from finetune.core.command import check_params_first

check_params_first(__name__, "pretrain")

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from finetune.core.command import exit_now, stage_main
from finetune.core.config import Params
from finetune.core.files import fingerprint_of, write_atomic
from finetune.core.guard import hold_folder, stop_with_starter
from finetune.ingest.fetch import fetch
from finetune.ingest.index import build_index, list_dataset
from finetune.model.classifier import save_final
from finetune.model.factory import build_model
from finetune.tracking.runs import pretrain_record
from finetune.tracking.store import runtime_tags
from finetune.train.checkpoints import load_checkpoint
from finetune.train.loaders import loaders
from finetune.train.loop import fit
from finetune.train.runtime import resolve_runtime, seed_everything

log = logging.getLogger(__name__)


def pretrain(params: Params, out: Path, project: Path = Path(".")) -> Path | None:
    """Fetch ``pretrain.data``, train on all its decodable images, save ``out/model.pt``."""
    target = project / out
    target.mkdir(parents=True, exist_ok=True)
    with hold_folder(target):  # one trainer per folder, or TrainingBusy at once
        return _pretrain(params, target, project)


def _pretrain(params: Params, target: Path, project: Path) -> Path | None:
    """The pretrain stage's work in its locked output folder."""
    cfg = params.pretrain
    if cfg.data is None:
        (target / "README.txt").write_text(
            "No source model: pretrain.data is null, so model.weights is used as it is.\n")
        return None
    dataset = fetch(cfg.data, project).dataset
    files = target / "files.csv"
    index = build_index(dataset, list_dataset(dataset), max_pixels=params.validate_.max_pixels)
    usable = index[index["decodes"] & index["class"].notna()]
    write_atomic(files, lambda tmp: usable[["path", "split", "class"]].to_csv(tmp, index=False))
    m = params.model
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    runtime = resolve_runtime(cfg.train)
    data = loaders(params, cfg.train, dataset, files, runtime.device.type == "cuda", project,
                   key="pretrain.train.val_fraction")
    classes = data.classes
    model = build_model(m.arch, "none", len(classes))
    fingerprint = fingerprint_of(cfg.model_dump(mode="json"), m.model_dump(mode="json"), classes, len(usable))
    checkpoint = load_checkpoint(target, fingerprint)
    record = pretrain_record(project, dataset.name, cfg.train, len(classes),
                             runtime_tags(runtime.device, runtime.precision), checkpoint)
    with record:
        fitted = fit(model, data, data.cfg, runtime, target, fingerprint=fingerprint, checkpoint=checkpoint,
                     extra=record.checkpoint_extra(), callbacks=[record], key="pretrain.train")
    save_final(target / "model.pt", model, classes, m.arch, cfg.model_dump(mode="json"))
    record.check_caught_up(f"{target / 'model.pt'}")
    chosen = fitted.selected
    log.info("source model: %d classes, epoch %d of %d kept (validation accuracy %s) -> %s", len(classes),
             chosen.epoch, len(fitted.history), "n/a" if chosen.val_acc is None else f"{chosen.val_acc:.3f}",
             target / "model.pt")
    return target / "model.pt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--out``: the folder of the source model (dvc.yaml: models/source)."""
    parser.add_argument("--out", type=Path, required=True, help="folder for the source model")


def run(params: Params, args: argparse.Namespace) -> None:
    """Train the source model on pretrain.data (a no-op note when it is null)."""
    stop_with_starter()  # a killed `dvc repro` must not leave this process training
    path = pretrain(params, args.out)
    print(f"source model: {path}" if path else f"no pretraining (pretrain.data is null): {args.out}")


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("finetune.stages.pretrain", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    exit_now(main())
