"""The data each run used, as MLflow dataset inputs: what the MLflow UI shows in the runs list's
Dataset column and on the run's page.

One dataset per split, named ``<data folder>/<split>`` (``hotdog/train``), whose digest is the
DVC hash of the data folder (the fetch stage's output in dvc.lock: the data version) and whose
source is ``data.url``; its context says how the run used it (train, validation or test). A
training run logs train and validation, the evaluation logs test into each variant's run and
into the pipeline's parent run.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

SPLITS = ("train", "validation", "test")


def source_of(url: str):
    """``data.url`` as an MLflow dataset source (a web address, a local path or file:// URI)."""
    if url.startswith(("http://", "https://")):
        return HTTPDatasetSource(url)
    try:
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": all of them local files
            warnings.simplefilter("ignore", UserWarning)
            return resolve_dataset_source(url)
    except MlflowException:  # a scheme MLflow has no source for: still shown as its address
        return HTTPDatasetSource(url)


def dataset_input(url: str, folder: str, version: str, split: str) -> DatasetInput:
    """The split ``split`` of the data in ``folder`` at DVC hash ``version``, as a run input."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    dataset = MetaDataset(source=source_of(url), name=f"{Path(folder).name}/{split}", digest=version[:36])
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, split)])


def log_data(run_id: str, url: str, folder: str, version: str, splits: tuple[str, ...]) -> None:
    """The ``splits`` of the data as inputs of run ``run_id``."""
    MlflowClient().log_inputs(run_id, datasets=[dataset_input(url, folder, version, s) for s in splits])
