"""MLflow at the edge: where runs go, the pipeline's parent run, and what a training run records.

Tracking URI: ``MLFLOW_TRACKING_URI`` when set, else a SQLite database in ``mlflow/`` with
artifacts beside it. One experiment per dataset; one parent run per pipeline run (keyed by
``FINETUNE_PIPELINE_RUN`` when an orchestrator sets it, else by data version, code version and
settings), the variants as its nested runs, so the MLflow UI compares them side by side. The
parent run spans the pipeline (from ``FINETUNE_PIPELINE_START``, which the Prefect flow sets, to
the evaluate stage or the flow's end) and carries the comparison. Experiments are created as
"Machine learning" experiments (not MLflow 3's GenAI default) with a description.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from finetune.core.env import PIPELINE_RUN, PIPELINE_START
from finetune.core.files import fingerprint_of

log = logging.getLogger(__name__)
PIPELINE_TAG = "finetune.pipeline"
# The experiment kind the MLflow 3 UI opens as "Machine learning" (runs, charts, models) rather
# than the GenAI overview (traces); the values are the UI's, see docs/architecture.md.
KIND_TAG, ML_KIND = "mlflow.experimentKind", "custom_model_development"
NOTE_TAG = "mlflow.note.content"  # the description the UI shows on an experiment or run page
SELECTION_TAG = "finetune.selection"  # a training run's kept epoch in words (runs.py; evaluation.py reuses it)
# When the orchestrator started the pipeline (the Prefect flow sets it for the stages it runs,
# flows/pipeline.py): the parent run starts there, not when the first training asks for it.
REGISTRY_EXPERIMENT = "finetune-registry"  # the registry's bookkeeping, apart from the training runs
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


def experiment_id(name: str, project: Path, description: str = "") -> str:
    """The experiment ``name``, created on first use (local store: artifacts under mlflow/) as a
    Machine-learning experiment with ``description``; an older one gets the kind and description."""
    client = MlflowClient()
    tags = {KIND_TAG: ML_KIND} | ({NOTE_TAG: description} if description else {})
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        for key, value in tags.items():
            if key not in experiment.tags:  # a description someone edited in the UI stays
                client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    location = None
    # A database file here keeps its artifacts beside it; a tracking server has its own store.
    # (Not a test of MLFLOW_TRACKING_URI: mlflow.set_tracking_uri sets that variable itself.)
    if mlflow.get_tracking_uri().startswith("sqlite:"):
        location = (project / "mlflow" / "artifacts" / name).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location, tags=tags)


def pipeline_experiment_name(dataset: Path) -> str:
    """``finetune-<dataset folder name>``."""
    return f"finetune-{Path(dataset).name}"


def pipeline_experiment(dataset: Path, project: Path) -> str:
    """The experiment of the pipeline on ``dataset`` (``finetune-<folder name>``): one parent run
    per pipeline run (the comparison) with a nested training run per variant."""
    name = Path(dataset).name
    return experiment_id(pipeline_experiment_name(dataset), project, (
        f"Fine-tuned vs from-scratch on the {name} data. Each pipeline run is a parent run (its span, "
        "both variants' test metrics, the verdict in its description, the curves and the report under "
        "evaluation/) with one nested training run per variant (settings, per-epoch curves, the "
        f"model). The model registry's promotion log is in the experiment {REGISTRY_EXPERIMENT}."))


def registry_experiment(project: Path) -> str:
    """The experiment ``finetune-registry``: the registry's bookkeeping runs (promotion logs),
    kept apart from the training runs."""
    return experiment_id(REGISTRY_EXPERIMENT, project, (
        "Bookkeeping of the model registry: one run per registered model (registry-<model name>) "
        "whose promotions.jsonl records every promote, refusal and rollback. The models and their "
        "aliases are on the Models page; the trainings are in the finetune-<dataset> experiments."))


def parent_run(experiment: str, key: str, tags: dict[str, str]) -> str:
    """The id of the pipeline run ``key`` (a parent run), created by the first variant to ask,
    starting when the pipeline started (``FINETUNE_PIPELINE_START``, else now); it is marked
    running again while a variant trains (see :func:`touch_parent`)."""
    found = find_parent(experiment, key)
    if found:
        return found
    run = MlflowClient().create_run(experiment, start_time=pipeline_start(), run_name=f"pipeline-{key[:8]}",
                                    tags={PIPELINE_TAG: key, **tags})
    return run.info.run_id


def pipeline_start() -> int:
    """``FINETUNE_PIPELINE_START`` (ms), or now when unset, unreadable or in the future."""
    now = int(time.time() * 1000)
    try:
        start = int(os.environ.get(PIPELINE_START, ""))
    except ValueError:
        return now
    return start if 0 < start <= now else now


def touch_parent(run_id: str, status: str) -> None:
    """The parent run ``RUNNING`` (a variant starts training), or ended now with ``status``
    (FINISHED, FAILED: a stage that wrote to it ended): its end time is always the last thing
    the pipeline did in it, and a pipeline stopped half-way shows the span it ran."""
    client = MlflowClient()
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status, end_time=int(time.time() * 1000))


def find_parent(experiment: str, key: str) -> str | None:
    """The parent run of the pipeline run ``key``, if one was made."""
    found = MlflowClient().search_runs([experiment], filter_string=f"tags.`{PIPELINE_TAG}` = '{key}'",
                                       max_results=1)
    return found[0].info.run_id if found else None


def close_pipeline_run(project: Path, dataset: Path, key: str, outcome: str = "",
                       status: str = "FINISHED") -> str | None:
    """At the pipeline's end (the Prefect flow, after the gate): the parent run of the pipeline
    run ``key`` ends now with ``status``, ``outcome`` (what was registered and promoted) added
    to its description. Returns its id; None when the pipeline made none (nothing trained)."""
    use_store(project)
    client = MlflowClient()
    parent = find_parent(pipeline_experiment(dataset, project), key)
    if parent is None:
        return None
    if outcome:
        note = client.get_run(parent).data.tags.get(NOTE_TAG, "")
        client.set_tag(parent, NOTE_TAG, f"{note}\n\n{outcome}".strip())
    touch_parent(parent, status)
    return parent


def pipeline_key(*parts: object) -> str:
    """``FINETUNE_PIPELINE_RUN`` if set (the Prefect flow run id), else a digest of ``parts``."""
    return os.environ.get(PIPELINE_RUN) or fingerprint_of(*parts)


def runtime_tags(device, precision: str) -> dict[str, str]:
    """What the training ran on: the device and precision, torch's version, and on CUDA the GPU
    (name, memory, count) and the CUDA version; on a CPU the processor, its cores and threads
    (no CUDA version on a CPU run: it says nothing about it). ``device``: a torch.device."""
    import torch  # here, not at the top: the flow process reads the parent run without torch (seconds)

    tags = {"device": str(device), "precision": precision, "torch": torch.__version__.split("+")[0]}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return tags | {"gpu.name": props.name, "gpu.memory_gb": f"{props.total_memory / 2**30:.0f}",
                       "gpu.count": str(torch.cuda.device_count()), "cuda": torch.version.cuda or "none"}
    if device.type == "cpu":
        return tags | {"cpu.name": cpu_name(), "cpu.cores": str(usable_cores()),
                       "cpu.threads": str(torch.get_num_threads())}
    return tags


def cpu_name() -> str:
    """The processor's model name (/proc/cpuinfo on Linux), else the platform's word for it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """The cores this process may run on (a container's or taskset's limit, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


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
