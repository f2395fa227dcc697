"""The offline demo: a generated dataset served from disk to a workspace of its own."""

from __future__ import annotations

import logging
from pathlib import Path

from finetune.core.config import DemoConfig, Params
from finetune.demo.sample import class_names, write_sample_archive
from finetune.demo.workspace import sync_workspace

log = logging.getLogger(__name__)


def setup_demo(params: Params, project: Path) -> Path:
    """Write the demo archives (settings ``demo:``) and a workspace whose data.url points at
    the generated hot-dog archive and whose pretrain.data points at the generated source one.

    The archives are generated deterministically, so an unchanged ``demo:`` section gives the
    same bytes, the same checksums and therefore nothing for DVC to redo.
    """
    demo = params.demo
    workspace = (project / demo.workspace).resolve()
    root = "hotdog" if demo.num_classes == 2 else "chairs"
    target = _archive(demo, workspace / "mirror" / f"{root}.zip", root, demo.num_classes,
                      demo.train_per_class, demo.test_per_class, seed=demo.seed)
    source = _archive(demo, workspace / "mirror" / "source.zip", "source", demo.source_classes,
                      demo.source_train_per_class, demo.source_test_per_class, seed=demo.seed + 1)
    # The generated counts are exact, and may be smaller than a real dataset's minimum.
    smallest = min(demo.train_per_class, demo.test_per_class)
    overrides = {
        "data.url": target.path.as_uri(),
        "data.checksum": f"sha256:{target.sha256}",
        "validate.expected_per_class": {"train": demo.train_per_class, "test": demo.test_per_class},
        "validate.min_images_per_class": min(params.validate_.min_images_per_class, smallest),
        # Step 1 offline: pretrain on the generated source dataset, fine-tune from its result.
        "pretrain.data": params.data.model_dump(mode="json") | {
            "url": source.path.as_uri(), "checksum": f"sha256:{source.sha256}", "dir": "data/source"},
        "model.weights": "models/source/model.pt",
        **demo.overrides,
    }
    return sync_workspace(project, workspace, overrides, share_cache=True)


def _archive(demo: DemoConfig, path: Path, root: str, classes: int, train: int, test: int, seed: int):
    summary = write_sample_archive(path, classes=class_names(classes), train_per_class=train,
                                   test_per_class=test, seed=seed, root=root,
                                   min_side=demo.min_side, max_side=demo.max_side)
    log.info("demo archive %s: %s images per class (train/test), %d classes", summary.path,
             f"{train}/{test}", classes)
    return summary
