"""Scoring trained classifiers on the test split of the validated file list (fp32: exactly as the
served model scores)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from finetune.core.config import EvaluateConfig, Params
from finetune.core.errors import FinetuneError
from finetune.data.images import load_splits
from finetune.evaluate.metrics import VariantEval, chance_test, compare, score
from finetune.model.classifier import Classifier, load_classifier
from finetune.train.compiling import INFERENCE_SHARE, should_compile
from finetune.train.runtime import Runtime, pick_device, predict, worker_count

log = logging.getLogger(__name__)


def split_loader(classifier: Classifier, root: Path, files_csv: Path, cfg: EvaluateConfig) -> DataLoader:
    """The test split with the classifier's own test transform, in file-list order."""
    _, test_ds, classes = load_splits(root, files_csv, None, classifier.transform)
    if classes != classifier.classes:
        raise FinetuneError(f"the model was trained on classes {classifier.classes} but {files_csv} has "
                            f"{classes}; train it again on this data (`dvc repro`).")
    workers = worker_count(cfg.workers)
    return DataLoader(test_ds, batch_size=cfg.batch_size, shuffle=False, num_workers=workers)


def inference_network(model: nn.Module, images: int, runtime: Runtime) -> nn.Module:
    """``model``, compiled only if compile: auto's rule (finetune/train/compiling.py) says scoring
    ``images`` repays a cold compile, a forward pass counting as a third of a training step: from
    6.7 million images on CUDA, so in practice never for a test split."""
    compiled, reason = should_compile(images, runtime.device.type, warm=False, share=INFERENCE_SHARE)
    log.info("evaluation %s: %s", "compiles" if compiled else "does not compile", reason)
    return torch.compile(model) if compiled else model


def evaluate_classifier(name: str, classifier: Classifier, root: Path, files_csv: Path,
                        cfg: EvaluateConfig) -> VariantEval:
    """Score ``classifier`` on the test split of the validated file list (fp32: exact, as served),
    with its test against chance at ``cfg.chance_p``."""
    loader = split_loader(classifier, root, files_csv, cfg)
    runtime = Runtime(pick_device(cfg.device), None, False)
    classifier.model.to(runtime.device)
    try:
        probs, truth = predict(inference_network(classifier.model, len(loader.dataset), runtime), loader, runtime)
    finally:
        classifier.model.to("cpu")
    probs_np, truth_np = probs.double().numpy(), truth.numpy()
    broken = int((~np.isfinite(probs_np)).any(1).sum())
    if broken:
        raise FinetuneError(
            f"{name}: its model gives no valid probabilities (NaN or infinite) for {broken} of {len(probs_np)} test "
            "images, so it cannot be scored. Its training diverged, or its BatchNorm statistics came from too few "
            f"images per step. Retrain it with a lower lr or more train images (`dvc repro train@{name}`).")
    probs_np /= probs_np.sum(1, keepdims=True)  # float32 softmax sums to 1 only within 1e-7
    headline, per_class, confusion = score(probs_np, truth_np, classifier.classes)
    return VariantEval(name, headline, per_class, confusion, classifier.classes, list(loader.dataset.paths),
                       probs_np, truth_np,
                       chance=chance_test(truth_np, probs_np.argmax(1), len(classifier.classes), cfg.chance_p))


def evaluate_variants(params: Params, models: Path, project: Path = Path(".")) -> tuple[list[VariantEval], dict]:
    """Every variant of ``train:`` (its ``<models>/<variant>/model.pt``) on the test split, and
    the comparison of ``evaluate.challenger`` against ``evaluate.baseline``."""
    cfg = params.evaluate
    root, files_csv = project / params.data.dir, project / params.validate_.files
    results = []
    for variant in params.train:
        classifier = load_classifier(project / models / variant / "model.pt")
        result = evaluate_classifier(variant, classifier, root, files_csv, cfg)
        result.run_id = classifier.info.get("mlflow_run_id")
        results.append(result)
    by_name = {r.name: r for r in results}
    return results, compare(by_name[cfg.challenger], by_name[cfg.baseline])
