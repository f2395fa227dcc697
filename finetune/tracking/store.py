"""MLflow at the edge: where runs go, the pipeline's parent run, and what a training run records.

Tracking URI: ``MLFLOW_TRACKING_URI`` when set, else a SQLite database in ``mlflow/`` with
artifacts beside it. One experiment per dataset; one parent run per pipeline run (keyed by
``FINETUNE_PIPELINE_RUN`` when an orchestrator sets it, else by data version, code version and
settings), the variants as its nested runs, so the MLflow UI compares them side by side.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from pathlib import Path

import mlflow
import torch
from mlflow.tracking import MlflowClient

from finetune.files import fingerprint_of

log = logging.getLogger(__name__)
PIPELINE_TAG = "finetune.pipeline"
# A tracking server that is away costs seconds per request, not MLflow's default minutes (120 s
# timeout, 7 retries with backoff 2: about 4 min per call): training goes on without it and
# logs what is missing when it answers again (finetune/tracking/runs.py).
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def tracking_uri(project: Path) -> str:
    """``MLFLOW_TRACKING_URI``, or the project's SQLite store ``mlflow/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(project / 'mlflow' / 'mlflow.db').resolve()}"


def use_store(project: Path) -> str:
    """Point MLflow at the tracking store; return its URI."""
    uri = tracking_uri(project)
    # Artifact downloads draw progress bars; in stage logs they are noise.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name, value in HTTP_LIMITS.items():
        os.environ.setdefault(name, value)  # the user's own values win
    if uri.startswith("sqlite:///"):
        (project / "mlflow").mkdir(exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return uri


def experiment_id(name: str, project: Path) -> str:
    """The experiment ``name``, created on first use (local store: artifacts under mlflow/)."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    # A database file here keeps its artifacts beside it; a tracking server has its own store.
    # (Not a test of MLFLOW_TRACKING_URI: mlflow.set_tracking_uri sets that variable itself.)
    if mlflow.get_tracking_uri().startswith("sqlite:"):
        location = (project / "mlflow" / "artifacts" / name).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def pipeline_experiment(dataset: Path, project: Path) -> str:
    """The experiment of the pipeline on ``dataset`` (``finetune-<folder name>``): training runs,
    their parent runs, the registry's log."""
    return experiment_id(f"finetune-{Path(dataset).name}", project)


def parent_run(experiment: str, key: str, tags: dict[str, str]) -> str:
    """The id of the pipeline run ``key`` (a parent run), created by the first variant to ask."""
    client = MlflowClient()
    found = client.search_runs([experiment], filter_string=f"tags.`{PIPELINE_TAG}` = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment, run_name=f"pipeline-{key[:8]}", tags={PIPELINE_TAG: key, **tags})
    client.set_terminated(run.info.run_id)  # a container: its children carry the work
    return run.info.run_id


def pipeline_key(*parts: object) -> str:
    """``FINETUNE_PIPELINE_RUN`` if set (the Prefect flow run id), else a digest of ``parts``."""
    return os.environ.get("FINETUNE_PIPELINE_RUN") or fingerprint_of(*parts)


def runtime_tags(device: torch.device, precision: str) -> dict[str, str]:
    """Device, GPU name and count, torch/CUDA versions, precision."""
    tags = {"device": str(device), "precision": precision, "torch": torch.__version__,
            "cuda": torch.version.cuda or "none", "host.cpu": platform.processor() or platform.machine(),
            "host.cpus": str(os.cpu_count())}
    if device.type == "cuda":
        tags |= {"gpu.name": torch.cuda.get_device_name(device), "gpu.count": str(torch.cuda.device_count())}
    return tags


def flatten(prefix: str, value: object) -> dict[str, object]:
    """{"a.b": 1} from {"a": {"b": 1}}: MLflow params are flat."""
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for key, item in value.items():
            out |= flatten(f"{prefix}.{key}" if prefix else str(key), item)
        return out
    return {prefix: value}


def log_json(data: dict, name: str) -> None:
    """Log ``data`` as a JSON artifact of the active run."""
    mlflow.log_text(json.dumps(data, indent=2, default=str), name)
