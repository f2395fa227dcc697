"""The environment variables by which the orchestrator (flows/, tasks/) and the stages
(finetune/) speak to each other, each named once here. A stage's process inherits them from
the flow, through `dvc repro`."""

from __future__ import annotations

# The Prefect flow run's id: every training of one pipeline run nests under one MLflow parent
# run keyed by it (finetune/tracking/store.py); unset, the key is a digest of data and code.
PIPELINE_RUN = "FINETUNE_PIPELINE_RUN"
# Milliseconds since the epoch when the flow started the pipeline: the parent run's start time.
PIPELINE_START = "FINETUNE_PIPELINE_START"
# Processes as "pid:start-time" words whose end stops a training (finetune/core/guard.py): each
# process adds its starter for its children (torchrun's workers watch what started the
# launcher); the flow adds itself.
WATCH = "FINETUNE_WATCH"
