"""One seed of the study: the compared variants (evaluate.challenger, evaluate.baseline) trained
on each fraction of the train split, each with its own recipe and this seed, then scored on the
test split. Validation is held out first, as in the train stages, and chooses each run's epoch;
the fractions are nested subsets of what remains (finetune/train/subsets.py). Decoded images
(and, for frozen strategies, cached features within a run) are shared, so a study costs about
its training steps."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from finetune.core.config import Params
from finetune.model.factory import build_model, weights_path
from finetune.train.callbacks import Callback
from finetune.train.loaders import loaders
from finetune.train.loop import fit, predict_all
from finetune.train.runtime import resolve_runtime, seed_everything
from finetune.train.search import read_search, tuned
from finetune.train.subsets import nested_subset

log = logging.getLogger(__name__)


# How a study training is tracked: given what the run is (seed, fraction, variant, lr,
# train_images, classes), a context that yields the callback ``fit`` reports to, and that gets
# the result (finetune/tracking/study.py makes one; by default nothing is recorded).
Track = Callable[[dict], AbstractContextManager[Callback]]


def untracked(run: dict) -> AbstractContextManager[Callback]:
    """A study training that nothing records."""
    return nullcontext(Callback())


def train_and_test(params: Params, variant: str, fraction: float, seed: int, project: Path,
                   search: dict | None = None, track: Track = untracked) -> tuple[dict, list]:
    """Train ``variant`` with ``seed`` on ``fraction`` of each train class; (record, history).

    The record: seed, fraction, variant, lr (the one its search chose), train_images, classes,
    val_acc and selected_epoch of the kept weights, test_acc and ``right`` (1/0 per test image in
    the file list's order). ``track`` records the training as it goes (see Track)."""
    cfg = tuned(params.train[variant], search or {}).model_copy(update={"seed": seed})
    seed_everything(seed, cfg.deterministic)
    runtime = resolve_runtime(cfg)
    data = loaders(params, cfg, project / params.data.dir, project / params.validate_.files,
                   runtime.device.type == "cuda", project, key=f"train.{variant}.val_fraction", test=True,
                   subset=lambda labels, train: nested_subset(labels, train, fraction, seed))
    weights = params.model.weights if cfg.init == "pretrained" else "none"
    model = build_model(params.model.arch, weights_path(weights, project), len(data.classes))
    run = {"seed": seed, "fraction": fraction, "variant": variant, "lr": cfg.lr, "train_images": data.train_images,
           "classes": len(data.classes)}
    # The scratch folder holds checkpoints: a study run does not resume.
    with track(run) as tracker, tempfile.TemporaryDirectory(prefix="study-") as scratch:
        fitted = fit(model, data, data.cfg, runtime, Path(scratch), fingerprint=f"study-{variant}-{fraction}-{seed}",
                     callbacks=[tracker])
        probs, truth = predict_all(model, data.test, runtime)
        right = (probs.argmax(1) == truth).int().tolist()
        record = run | {"val_acc": fitted.selected.val_acc, "selected_epoch": fitted.selected.epoch,
                        "test_acc": sum(right) / len(right), "right": right}
        tracker.on_result(record)
    log.info("study seed %d, %s on %g of train (%d images): test accuracy %.3f (epoch %d kept)", seed, variant,
             fraction, data.train_images, record["test_acc"], record["selected_epoch"])
    return record, fitted.history


def study_seed(params: Params, seed: int, project: Path, track: Track = untracked) -> list[dict]:
    """Every fraction × compared variant with ``seed``, smallest fraction first, each with the
    values its search chose (``search.out``), each recorded by ``track`` as it trains."""
    records = []
    variants = (params.evaluate.challenger, params.evaluate.baseline)
    searches = {v: read_search(project, params.search.out / f"{v}.json", v) for v in variants}
    for fraction in params.study.fractions:
        for variant in variants:
            record, _ = train_and_test(params, variant, fraction, seed, project, searches[variant], track)
            records.append(record)
    return records
