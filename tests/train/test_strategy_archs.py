"""Every strategy on the rows of the architecture table that are not ResNets, end to end on tiny
generated images: a frozen backbone trained on cached features, gradual unfreezing down the
row's blocks, full training, then evaluate, register and predict, as the pipeline does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from test_training import make_project, paths

from finetune.core.config import load_params
from finetune.core.env import PIPELINE_RUN
from finetune.model.archs import ARCHS
from finetune.model.classifier import load_classifier, probabilities
from finetune.model.factory import build_model, head_of
from finetune.stages.evaluate import EvalPaths, run_evaluate
from finetune.stages.train import train_variant
from finetune.tracking.registry import CANDIDATE, register_candidate
from finetune.tracking.serving import load_served, predict_files
from finetune.train.loaders import loaders
from finetune.train.loop import fit
from finetune.train.recipe import replaced
from finetune.train.runtime import resolve_runtime

pytestmark = pytest.mark.slow
ARCHES = ("mobilenet_v3_small", "efficientnet_b0")
ONE_STEP = {"batch_size": 4, "max_steps": 2, "workers": 0, "precision": "fp32", "val_fraction": 0.5,
            "checkpoint_every_s": 0}


def settings(arch: str) -> dict:
    """A tiny workspace of ``arch``: finetune unfreezes the row's top two blocks at epochs 2 and 3
    (epoch 1 trains the head on cached features), scratch trains the whole network."""
    below = ARCHS[arch].unfreezable
    finetune = {"strategy": "gradual", "epochs": 3, "unfreeze": {2: below[0], 3: below[1]}, "head_lr_mult": 10}
    return ({"model.arch": arch, "evaluate.workers": 0, "evaluate.chance_p": 0.99}
            | {f"train.finetune.{k}": v for k, v in finetune.items()}
            | {f"train.scratch.{k}": v for k, v in (ONE_STEP | {"epochs": 1}).items()})


@pytest.fixture(scope="module", params=ARCHES)
def pipeline(request, tmp_path_factory):
    """One workspace per arch, trained (both variants), evaluated and registered once."""
    arch = request.param
    project = make_project(tmp_path_factory.mktemp(arch), train=4, test=2, **settings(arch))
    with pytest.MonkeyPatch.context() as patch:
        # The project's own store, and MLflow's URI variable as it was once the module is done.
        patch.setenv("MLFLOW_TRACKING_URI", "unset")
        patch.delenv("MLFLOW_TRACKING_URI")
        patch.delenv(PIPELINE_RUN, raising=False)
        params = load_params(project / "params.yaml")
        trained = {v: train_variant(params, v, paths(v), project) for v in ("finetune", "scratch")}
        run_evaluate(params, EvalPaths(project / "models", project / "plots"), project)
        registration = register_candidate(params, Path("models"), project)
        yield arch, project, params, trained, registration


def test_gradual_walks_down_the_rows_blocks_from_cached_features(pipeline):
    arch, _, params, trained, _ = pipeline
    below, lr = ARCHS[arch].unfreezable, params.train["finetune"].lr
    history = trained["finetune"].history
    assert [sorted(s.lrs) for s in history] == [["head"], sorted(["head", below[0]]),
                                                 sorted(["head", below[0], below[1]])]
    assert history[2].lrs == pytest.approx({"head": lr * 10, below[0]: lr * 0.1, below[1]: lr * 0.1})
    # Epoch 1 trained the head on features computed once; the live epochs computed none.
    assert history[0].features_seconds > 0 and [s.features_seconds for s in history[1:]] == [0, 0]
    assert [s.epoch for s in trained["scratch"].history] == [1]


def test_registered_model_predicts_as_the_classifier_scores(pipeline):
    arch, project, params, _, registration = pipeline
    assert registration.registered and registration.variant in ("finetune", "scratch")
    classifier = load_classifier(project / "models" / registration.variant / "model.pt")
    assert head_of(classifier.model).out_features == 2 and classifier.info["arch"] == arch
    files = sorted((project / params.data.dir / "test").rglob("*.jpg"))
    served = load_served(f"models:/{params.register_.model_name}@{CANDIDATE}", project)
    answers = predict_files(served, files)
    assert [a["class"] for a in answers] and all(a["class"] in classifier.classes for a in answers)
    expected = probabilities(classifier, [Image.open(f).convert("RGB") for f in files])
    got = torch.tensor([[a["probabilities"][c] for c in classifier.classes] for a in answers])
    assert torch.allclose(got, expected.float(), atol=1e-5)


def test_freeze_trains_only_the_head_on_cached_features(pipeline):
    arch, project, params, _, _ = pipeline
    cfg = replaced(params.train["finetune"], strategy="freeze", epochs=2, unfreeze={}, select="last")
    data = loaders(params, cfg, project / params.data.dir, project / params.validate_.files, pin=False,
                   project=project)
    torch.manual_seed(0)
    model = build_model(arch, "none", len(data.classes))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = fit(model, data, cfg, resolve_runtime(cfg), project / "models" / "freeze", fingerprint="f").history
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    head = ARCHS[arch].head
    # No backbone weight, no BatchNorm statistic. (The bias may stay 0: a random backbone in
    # inference mode feeds the head features near 0, so it predicts 0.5 for both classes, and a
    # balanced batch then gives the bias no gradient.)
    assert f"{head}.weight" in changed and changed <= {f"{head}.weight", f"{head}.bias"}, sorted(changed)[:5]
    # Epoch 1 computed the features, epoch 2 trained on the same ones.
    assert history[0].features_seconds > 0 and history[1].features_seconds == 0
