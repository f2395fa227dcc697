"""The pinned dependency set does not only import, it runs: MLflow, Great Expectations, torch.

(Prefect and DVC run for real in test_pipeline_flow.py and test_dvc.py.)
"""

from __future__ import annotations

import pandas as pd
import pytest


def test_mlflow_records_a_run_in_a_sqlite_store(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        # An explicit artifact root: the default is ./mlruns in the working directory.
        experiment_id = mlflow.create_experiment("stack-check", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment_id) as run:
            mlflow.log_params({"lr": 0.0064, "strategy": "full"})
            for step, acc in enumerate([0.6, 0.8]):
                mlflow.log_metric("val_acc", acc, step=step)
            (tmp_path / "note.txt").write_text("hello")
            mlflow.log_artifact(str(tmp_path / "note.txt"))
    finally:
        mlflow.set_tracking_uri(None)
    client = MlflowClient(uri)
    stored = client.get_run(run.info.run_id)
    assert stored.data.params == {"lr": "0.0064", "strategy": "full"}
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val_acc")] == [0.6, 0.8]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["note.txt"]
    assert list((tmp_path / "artifacts").rglob("note.txt")), "artifact not under the experiment's root"


@pytest.mark.parametrize(("max_side", "passes"), [(4000, True), (1000, False)])
def test_great_expectations_validates_a_dataframe(max_side, passes):
    import great_expectations as gx

    frame = pd.DataFrame({"width": [224, 500, 3000], "split": ["train", "train", "test"]})
    context = gx.get_context(mode="ephemeral")
    batch = (
        context.data_sources.add_pandas("images")
        .add_dataframe_asset("index")
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": frame})
    )
    result = batch.validate(gx.expectations.ExpectColumnValuesToBeBetween(column="width", min_value=1, max_value=max_side))
    assert result.success is passes
    assert result.result["unexpected_count"] == (0 if passes else 1)


def test_torchvision_resnet18_trains_a_step_in_bf16_on_cpu():
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=2).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    images = torch.randn(4, 3, 64, 64).to(memory_format=torch.channels_last)
    labels = torch.tensor([0, 1, 0, 1])
    before = model.fc.weight.detach().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.fc.weight)
    assert torchvision.__version__.startswith("0.29.1") and torch.__version__.startswith("2.14.1")
