"""DistributedDataParallel under torchrun, on the CPU with gloo and 2 processes: the same
accuracy as one process, one MLflow run, one model; and the small pieces it is built from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO
from mlflow.tracking import MlflowClient
from PIL import Image

from finetune.core.env import PIPELINE_RUN
from finetune.demo.workspace import stage_env, write_params
from finetune.train.distributed import SINGLE, interleave, torchrun_command

SETTINGS = {"model.weights": "none", "model.train_crop": 32, "model.test_resize": 36, "model.test_crop": 32,
            **{f"train.finetune.{k}": v for k, v in {
                "epochs": 4, "batch_size": 8, "max_steps": None, "workers": 0, "precision": "fp32",
                "lr": 0.01, "momentum": 0.9, "head_lr_mult": 1, "val_fraction": 0.25,
                # A frozen random backbone and a live head: DDP trains the head (a convex problem,
                # so both runs get to the same answer); cached features would bypass DDP.
                "strategy": "freeze", "cached_features": False}.items()}}


def separable_project(root: Path, nproc: int) -> Path:
    """Dark images are one class, bright images the other: learnable in a few steps, so that
    the accuracy of 1 and 2 processes can be compared without luck deciding."""
    rng = np.random.default_rng(0)
    rows = []
    for split, count in (("train", 16), ("test", 8)):
        for label, name in enumerate(("hotdog", "not-hotdog")):
            for i in range(count):
                path = root / "data" / "hotdog" / split / name / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                base = 40 if label == 0 else 215
                pixels = np.clip(base + rng.normal(0, 25, (40, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(path)
                rows.append({"path": f"{split}/{name}/{i}.png", "split": split, "class": name})
    (root / "data" / "validate").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(root / "data" / "validate" / "files.csv", index=False)
    write_params(REPO / "params.yaml", root / "params.yaml", SETTINGS | {"train.finetune.nproc_per_node": nproc})
    return root


def train(root: Path) -> subprocess.CompletedProcess:
    env = stage_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop(PIPELINE_RUN, None)
    return subprocess.run([sys.executable, "-m", "finetune.stages.train", "finetune", "--out", "models/finetune",
                           "--metrics", "metrics/finetune.json", "--plots", "plots/finetune.csv"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_gloo_processes_train_like_one(tmp_path):
    results = {}
    for nproc in (1, 2):
        root = separable_project(tmp_path / f"n{nproc}", nproc)
        done = train(root)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        results[nproc] = json.loads((root / "metrics" / "finetune.json").read_text())
        client = MlflowClient(f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
        runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
                if r.data.tags.get("variant") == "finetune"]
        assert len(runs) == 1, [r.info.run_id for r in runs]  # rank 0 alone logs
        assert runs[0].data.tags["processes"] == str(nproc)
        assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_acc")] == [1, 2, 3, 4]
        state = torch.load(root / "models" / "finetune" / "model.pt", weights_only=True)
        assert state["val_acc"] == pytest.approx(results[nproc]["val_acc"])
        assert sorted(p.name for p in (root / "models" / "finetune").iterdir()) == [
            "model.pt", "run.json", "validation.csv"]  # the checkpoint goes once the run is complete
    if_two = "DistributedDataParallel over 2 processes"
    assert if_two in done.stdout  # the stage ran itself again under torchrun
    # Every image seen once per epoch in total, the validation set scored whole, accuracies alike.
    assert results[2]["train_images"] == results[1]["train_images"] == 24
    assert results[2]["val_images"] == results[1]["val_images"] == 8
    assert results[1]["val_acc"] >= 0.875 and abs(results[2]["val_acc"] - results[1]["val_acc"]) <= 0.125


@pytest.mark.parametrize("world", [1, 2, 3])
def test_interleave_undoes_the_strided_test_split(world):
    items = torch.arange(10) * 10
    parts = [items[rank::world] for rank in range(world)]
    assert torch.equal(interleave(parts, 10), items)


def test_one_process_needs_no_process_group():
    assert SINGLE.main and not SINGLE.active
    assert SINGLE.sum([1.0, 2.0]) == [1.0, 2.0] and SINGLE.gather("x") == ["x"]
    SINGLE.barrier()
    command = torchrun_command(4, ["finetune.stages.train", "scratch"])
    assert command[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node=4" in command
    assert command[-3:] == ["-m", "finetune.stages.train", "scratch"]
