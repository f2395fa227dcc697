"""Where to look in the MLflow UI after a pipeline run: a saved view of its runs list (both
variants as rows, their validation and test accuracy, the registered model beside the winner,
sorted by validation accuracy so the one register chose is on top), the compare page of the two
trainings (its parallel coordinates: lr against validation accuracy, each run's first metric),
the pipeline's parent run (the verdict is its description) and the registered version.

The saved view is what MLflow's UI "Share" button makes: an experiment tag
``mlflow.sharedViewState.<key>`` holding the view as JSON, opened by
``#/experiments/<id>/runs?viewStateShareKey=<key>``.
"""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

from mlflow.tracking import MlflowClient

from finetune.tracking.store import PIPELINE_TAG, find_parent, pipeline_experiment, use_store
from finetune.train.lr_groups import BASE, HEAD, lr_group

VIEW_TAG = "mlflow.sharedViewState."
VALIDATION, TEST = "metrics.`selected.val_acc`", "metrics.`eval_accuracy`"
# In this order (validation first, the registered model last), all fit beside MLflow's side
# panels at 1,800 px; the Dataset column (the runs' inputs) is in MLflow's default view.
COLUMNS = [VALIDATION, "metrics.`selected.val_acc_sd`", TEST, f"params.`{BASE.param}`",
           f"params.`{lr_group(HEAD).param}`", "attributes.`Models`"]


def ui_base(tracking_uri: str, ui_port: int) -> str:
    """The MLflow UI's address: the tracking server's, or `make ui`'s (ports.ui) over a local store."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return f"http://127.0.0.1:{ui_port}"


def glance_view(parent: str) -> dict:
    """The saved view of the pipeline run ``parent``: its evaluated trainings, best validation first."""
    return {"searchFilter": f"tags.`mlflow.parentRunId` = '{parent}' and metrics.eval_accuracy >= 0",
            "orderByKey": VALIDATION, "orderByAsc": False, "selectedColumns": COLUMNS, "columnOrder": COLUMNS}


def save_view(client: MlflowClient, experiment: str, parent: str) -> str:
    """Save :func:`glance_view` on the experiment; its key (``pipeline-<parent id>``)."""
    key = f"pipeline-{parent}"
    client.set_experiment_tag(experiment, VIEW_TAG + key, json.dumps(glance_view(parent)))
    return key


def latest_parent(client: MlflowClient, experiment: str) -> str | None:
    """The most recent pipeline run's parent run (when this run trained nothing, the one that did)."""
    found = client.search_runs([experiment], filter_string=f"tags.`{PIPELINE_TAG}` != ''", max_results=1,
                               order_by=["attributes.start_time DESC"])
    return found[0].info.run_id if found else None


def pipeline_links(project: Path, dataset: Path, key: str, ui_port: int,
                   model: tuple[str, str] | None = None) -> dict[str, str]:
    """``{"runs", "compare", "parent"}`` and ``"model"`` (``model``: the registered name and
    version): the UI addresses of the pipeline run ``key`` (or of the latest one, when this run
    trained nothing); {} when the store holds no pipeline run."""
    base = ui_base(use_store(project), ui_port)
    client = MlflowClient()
    experiment = pipeline_experiment(dataset, project)
    parent = (find_parent(experiment, key) if key else None) or latest_parent(client, experiment)
    if parent is None:
        return {}
    view = save_view(client, experiment, parent)
    trainings = [r.info.run_id for r in client.search_runs([experiment], glance_view(parent)["searchFilter"])]
    quoted = urllib.parse.quote(json.dumps(trainings)), urllib.parse.quote(json.dumps([experiment]))
    return {"runs": f"{base}/#/experiments/{experiment}/runs?viewStateShareKey={view}",
            "compare": f"{base}/#/compare-runs?runs={quoted[0]}&experiments={quoted[1]}",
            "parent": f"{base}/#/experiments/{experiment}/runs/{parent}"} | (
        {"model": f"{base}/#/models/{urllib.parse.quote(model[0])}/versions/{model[1]}"} if model else {})
