"""Cached features: frozen epochs train the head on backbone outputs computed once per view."""

from __future__ import annotations

import pytest
import torch
from test_training import fit_tiny, make_project

from finetune.core.config import load_params
from finetune.model.factory import top_of
from finetune.train.features import backbone
from finetune.train.runtime import predict, resolve_runtime
from finetune.train.strategy import feature_views, frozen_epochs, head_only


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return make_project(tmp_path, train=6, test=3)


def train_cfg(project, **changes):
    from finetune.demo.workspace import write_params

    write_params(project / "params.yaml", project / "params.yaml",
                 {f"train.finetune.{k}": v for k, v in changes.items()})
    return load_params(project / "params.yaml").train["finetune"]


def backbone_passes(model) -> list[int]:
    """A list that grows by one at every forward pass through the network's first layer."""
    passes: list[int] = []
    model.conv1.register_forward_hook(lambda module, args, output: passes.append(len(args[0])))
    return passes


@pytest.mark.parametrize(("strategy", "unfreeze", "cached", "frozen", "head"), [
    ("full", {}, True, 0, [False, False, False, False]),
    ("freeze", {}, True, 4, [True, True, True, True]),
    ("freeze", {}, False, 4, [False, False, False, False]),
    ("gradual", {3: "layer4"}, True, 2, [True, True, False, False]),
    ("gradual", {}, True, 4, [True, True, True, True]),
])
def test_which_epochs_train_the_head_on_cached_features(project, strategy, unfreeze, cached, frozen, head):
    cfg = train_cfg(project, strategy=strategy, unfreeze=unfreeze, cached_features=cached, epochs=4, feature_views=3)
    assert frozen_epochs(cfg) == frozen
    assert [head_only(cfg, e) for e in range(1, 5)] == head
    if frozen:
        assert feature_views(cfg, 1) == min(3, frozen) and feature_views(cfg, frozen) == 1


@pytest.mark.slow
def test_freeze_on_cached_features_reports_what_the_live_model_scores(project):
    model, run = fit_tiny(project, strategy="freeze", epochs=3, max_steps=None, feature_views=2, momentum=0.9,
                          select="last")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    passes = backbone_passes(model)
    history = run().history
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}  # backbone and BatchNorm statistics untouched
    # The backbone ran once per batch of each view (2 views x 2 batches of the 6 train images left
    # after 6 are held out, 2 validation batches), all before the first epoch; the three head
    # epochs did not run it.
    assert len(passes) == 2 * 2 + 2
    assert history[0].features_seconds > 0 and [s.features_seconds for s in history[1:]] == [0, 0]
    # The accuracy reported from cached validation features is the live model's on those images
    # (select: last, so the model holds the last epoch's weights).
    params = load_params(project / "params.yaml")
    from finetune.train.loaders import loaders

    cfg = params.train["finetune"]
    data = loaders(params, cfg, project / params.data.dir, project / params.validate_.files, pin=False,
                   project=project)
    probs, truth = predict(model, data.val, resolve_runtime(cfg))
    assert history[-1].val_acc == pytest.approx((probs.argmax(1) == truth).float().mean().item())


@pytest.mark.slow
def test_gradual_leaves_cached_features_when_it_unfreezes(project):
    # select: last, or a better first epoch (layer4 still frozen) would be the weights kept
    model, run = fit_tiny(project, strategy="gradual", epochs=2, unfreeze={2: "layer4"}, max_steps=None,
                          select="last")
    layer4 = [p.clone() for p in model.layer4.parameters()]
    passes = backbone_passes(model)
    history = run().history
    assert history[0].features_seconds > 0 and history[1].features_seconds == 0
    # Epoch 1: features of 1 view (2 train + 2 validation batches); epoch 2 live: the same again.
    assert len(passes) == (2 + 2) + (2 + 2)
    assert any(not torch.equal(a, b) for a, b in zip(layer4, model.layer4.parameters(), strict=True))


def test_backbone_is_the_tops_input(project):
    model, _ = fit_tiny(project)
    model.eval()
    top = top_of(model)  # a ResNet's: its output layer fc (every row: tests/model/test_archs.py)
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(top(backbone(model, images)), model(images), atol=1e-5)
    assert top_of(model) is top and isinstance(top, torch.nn.Linear)  # put back


@pytest.mark.parametrize(("setting", "device", "compiled"), [(True, "cpu", True), (False, "cpu", False),
                                                              ("auto", "cpu", False)])
def test_compile_follows_params(project, setting, device, compiled):
    from finetune.train.distributed import SINGLE
    from finetune.train.loop import training_network

    cfg = train_cfg(project, compile=setting, device=device)
    model = torch.nn.Linear(2, 2)
    network = training_network(model, resolve_runtime(cfg), cfg, SINGLE)
    assert (network is not model) == compiled  # torch.compile wraps lazily: nothing compiles here
