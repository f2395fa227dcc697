"""The offline demo: a generated dataset served from disk to a workspace of its own."""

from __future__ import annotations

import logging
from pathlib import Path

from finetune.config import Params
from finetune.sample import class_names, write_sample_archive
from finetune.workspace import sync_workspace

log = logging.getLogger(__name__)


def setup_demo(params: Params, project: Path) -> Path:
    """Write the demo archive (settings ``demo:``) and a workspace whose data.url points at it.

    The archive is generated deterministically, so an unchanged ``demo:`` section gives the
    same bytes, the same checksum and therefore nothing for DVC to redo.
    """
    demo = params.demo
    workspace = (project / demo.workspace).resolve()
    root = "hotdog" if demo.num_classes == 2 else "chairs"
    summary = write_sample_archive(
        workspace / "mirror" / f"{root}.zip",
        classes=class_names(demo.num_classes),
        train_per_class=demo.train_per_class,
        test_per_class=demo.test_per_class,
        seed=demo.seed,
        root=root,
        min_side=demo.min_side,
        max_side=demo.max_side,
    )
    log.info("demo archive %s: %s", summary.path, summary.counts)
    source = write_sample_archive(
        workspace / "mirror" / "source.zip",
        classes=class_names(max(3, demo.source_classes)),
        train_per_class=demo.source_train_per_class,
        test_per_class=demo.source_test_per_class,
        seed=demo.seed + 1,
        root="source",
        min_side=demo.min_side,
        max_side=demo.max_side,
    )
    log.info("demo source archive %s: %d classes", source.path, len(source.counts["train"]))
    # The generated counts are exact, and may be smaller than a real dataset's minimum.
    smallest = min(demo.train_per_class, demo.test_per_class)
    overrides = {
        "data.url": summary.path.as_uri(),
        "data.checksum": f"sha256:{summary.sha256}",
        "validate.expected_per_class": {"train": demo.train_per_class, "test": demo.test_per_class},
        "validate.min_images_per_class": min(params.validate_.min_images_per_class, smallest),
        # Step 1 offline: pretrain on the generated source dataset, fine-tune from its result.
        "pretrain.data": params.data.model_dump(mode="json") | {
            "url": source.path.as_uri(), "checksum": f"sha256:{source.sha256}", "dir": "data/source"},
        "model.weights": "models/source/model.pt",
        **demo.overrides,
    }
    return sync_workspace(project, workspace, overrides, share_cache=True)
