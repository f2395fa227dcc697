"""Error-grid captions name the true class folder with the file: hotdog.zip numbers its files per
class, so a bare `0024.jpg` exists in both classes and says nothing about which was shown."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from images import write_dataset

from finetune.evaluate.figures import error_caption, errors_figure
from finetune.evaluate.metrics import VariantEval

CLASSES = ["hotdog", "not-hotdog"]


def captions_of(figure) -> list[str]:
    return [ax.get_title() for ax in figure.axes if ax.get_title()]


def test_error_caption_names_class_folder_and_file():
    assert error_caption("test/hotdog/0024.jpg", "not-hotdog", 0.934) == "hotdog/0024.jpg\n→ not-hotdog 0.93"
    assert error_caption("test/not-hotdog/0024.jpg", "hotdog", 0.5) == "not-hotdog/0024.jpg\n→ hotdog 0.50"


def test_errors_figure_tells_apart_files_of_the_same_name_in_both_classes(tmp_path):
    dataset = write_dataset(tmp_path / "hotdog", train=0, test=2, classes=tuple(CLASSES))
    paths = ["test/hotdog/0000.jpg", "test/hotdog/0001.jpg", "test/not-hotdog/0000.jpg", "test/not-hotdog/0001.jpg"]
    truth = np.array([0, 0, 1, 1])
    # Wrong: hotdog/0000 (0.9 sure), not-hotdog/0000 (0.8); right: the two 0001.jpg.
    probs = np.array([[0.1, 0.9], [0.7, 0.3], [0.8, 0.2], [0.4, 0.6]])
    result = VariantEval("finetune", {}, {}, [], CLASSES, paths, probs, truth)
    figure = errors_figure(result, dataset, limit=10)
    try:
        assert captions_of(figure) == ["hotdog/0000.jpg\n→ not-hotdog 0.90", "not-hotdog/0000.jpg\n→ hotdog 0.80"]
        assert "caption: true class/file → predicted" in figure.get_suptitle()
    finally:
        plt.close(figure)
