"""The learning-rate search in MLflow: one ``search@<variant>`` run per variant, nested in the
pipeline's parent run, with one child run per trial (its lr as a param, the validation curve per
epoch, its score, and a ``diverged`` or ``collapsed`` tag when it failed). The MLflow UI's chart
view then plots lr against val_acc across a search's trials (parallel coordinates, or a scatter).
"""

from __future__ import annotations

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from finetune.core.config import Params
from finetune.data.lineage import data_version, git_commit
from finetune.tracking.runs import ended, pipeline_parent
from finetune.tracking.store import NOTE_TAG, use_store
from finetune.train.lr_groups import BASE
from finetune.train.search import Plan, Trial


def search_run(params: Params, variant: str, plan: Plan, project):
    """The variant's search run (a context: ended FINISHED, or FAILED on an error), nested in the
    pipeline run that its trainings join, with the plan as params."""
    use_store(project)
    version, commit = data_version(project, params.data.dir), git_commit(project)
    where = pipeline_parent(params, project, version, commit)
    run = mlflow.start_run(experiment_id=where.experiment, run_name=f"search@{variant}", parent_run_id=where.parent,
                           tags={"variant": variant, "finetune.kind": "search"})
    mlflow.log_params({"variant": variant, "method": plan.method, "folds": plan.folds,
                       "budget": params.search.budget, "lr_step": params.search.lr_step,
                       "grid": " ".join(f"{lr:.4g}" for lr in plan.lrs), "batch_size": plan.batch_size,
                       "epochs": plan.epochs, "data_version": version})
    return ended(run)


def log_trial(search_run_id: str, variant: str, plan: Plan, trial: Trial) -> None:
    """One trial as a child run of ``search_run_id``: lr, the folds' mean validation curve, the
    kept epoch's scores, and a failure tag."""
    client = MlflowClient()
    experiment = client.get_run(search_run_id).info.experiment_id
    tags = {"mlflow.parentRunId": search_run_id, "variant": variant, "finetune.kind": "trial"}
    if trial.failure:
        tags |= {trial.failure: "true", NOTE_TAG: f"lr {trial.lr:.4g} {trial.failure}: never chosen"}
    run = client.create_run(experiment, run_name=f"{variant} lr={trial.lr:.3g}", tags=tags)
    run_id = run.info.run_id
    metrics = [Metric(name, float(point[name]), 0, point["epoch"]) for point in trial.curve
               for name in ("val_acc", "val_loss", "train_loss") if point.get(name) is not None]
    final = {"val_acc": trial.val_acc, "val_loss": trial.val_loss, "val_acc_sd": trial.val_acc_sd,
             "kept_epoch": trial.epoch, "trial_seconds": trial.seconds}
    # The kept epoch's scores as the last step: the runs table and the charts show those.
    last = (trial.curve[-1]["epoch"] + 1) if trial.curve else 0
    metrics += [Metric(f"selected.{k}", float(v), 0, last) for k, v in final.items() if v is not None]
    params = [Param(BASE.param, f"{trial.lr:.6g}"), Param("method", plan.method), Param("folds", str(plan.folds)),
              Param("batch_size", str(plan.batch_size)), Param("epochs", str(plan.epochs))]
    client.log_batch(run_id, metrics=metrics, params=params, tags=[RunTag("failure", trial.failure or "none")])
    client.set_terminated(run_id, "FINISHED")


def log_choice(document: dict) -> None:
    """The chosen values on the active search run, and its description in words."""
    mlflow.log_metrics({"chosen_lr": document["lr"], "chosen_epochs": document["epochs"],
                        "val_acc": document["val_acc"], "val_loss": document["val_loss"]})
    mlflow.set_tag(NOTE_TAG, search_words(document))


def search_words(document: dict) -> str:
    """The choice in one sentence: "lr 0.016 chosen by 3-fold cross-validation: val_acc 0.81 ± 0.04 …"."""
    how = (f"{document['folds']}-fold cross-validation" if document["method"] == "cross-validation"
           else "the validation split")
    spread = f" ± {document['val_acc_sd']:.3f}" if document.get("val_acc_sd") is not None else ""
    failed = [t for t in document["trials"] if t["failure"]]
    note = f"; {len(failed)} of {len(document['trials'])} lrs diverged or collapsed" if failed else ""
    return (f"{document['variant']}: lr {document['lr']:.4g} chosen by {how}: val_acc {document['val_acc']:.3f}"
            f"{spread}, val_loss {document['val_loss']:.4f}, {document['epochs']} epochs{note}")
