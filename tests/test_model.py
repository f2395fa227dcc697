"""The model factory: starting weights (ImageNet through torchvision's code, local, none), the
new head, parameter groups, freezing with BatchNorm kept in inference mode."""

from __future__ import annotations

import pytest
import torch
import torchvision

from finetune.errors import ConfigError
from finetune.model import BLOCKS, WeightsError, build_model, freeze, param_groups, train_mode, unfreeze

IMAGENET_FILE = "resnet18-f37072fd.pth"  # the file name in ResNet18_Weights.IMAGENET1K_V1.url


@pytest.mark.parametrize("num_classes", [2, 5])
def test_new_head_has_one_output_per_class(num_classes):
    model = build_model("resnet18", "none", num_classes)
    assert (model.fc.in_features, model.fc.out_features) == (512, num_classes)
    assert torch.all(model.fc.bias == 0) and model.fc.weight.abs().sum() > 0
    bound = (6 / (512 + num_classes)) ** 0.5  # Xavier-uniform's range
    assert model.fc.weight.abs().max() <= bound
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, num_classes)


def test_imagenet_weights_load_through_torchvision_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    source = torchvision.models.resnet18()
    with torch.no_grad():
        source.conv1.weight.fill_(0.5)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(source.state_dict(), tmp_path / "hub" / "checkpoints" / IMAGENET_FILE)
    model = build_model("resnet18", "imagenet", 2)
    assert torch.all(model.conv1.weight == 0.5) and model.fc.out_features == 2


def test_missing_imagenet_weights_say_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):  # the network boundary: this machine has none
        raise ConnectionError("no route to download.pytorch.org")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline, raising=False)
    with pytest.raises(WeightsError) as caught:
        build_model("resnet18", "imagenet", 2)
    message = str(caught.value)
    assert str(tmp_path / "hub" / "checkpoints" / IMAGENET_FILE) in message and "model.weights" in message


@pytest.mark.parametrize("wrapped", [False, True])
def test_local_state_dict_loads_all_but_the_head(tmp_path, wrapped):
    source = build_model("resnet18", "none", 10)  # a source task with 10 classes
    state = source.state_dict()
    path = tmp_path / "source.pt"
    torch.save({"model": state, "classes": list("abcdefghij")} if wrapped else state, path)
    model = build_model("resnet18", str(path), 3)
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert model.fc.out_features == 3


@pytest.mark.parametrize(("content", "phrase"), [(None, "does not exist"), (b"not a tensor file", "not a PyTorch state_dict"),
                                                 ({"x": torch.zeros(1)}, "does not fit")])
def test_bad_weights_files_are_explained(tmp_path, content, phrase):
    path = tmp_path / "weights.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(WeightsError, match=phrase) as caught:
        build_model("resnet18", str(path), 2)
    assert str(path) in str(caught.value)


def test_unknown_arch_lists_the_known_ones():
    with pytest.raises(ConfigError, match="resnet18"):
        build_model("vgg-tiny", "none", 2)


@pytest.mark.parametrize(("mult", "expected"), [(10.0, {"body": 0.01, "head": 0.1}), (None, {"all": 0.01})])
def test_param_groups_cover_the_trainable_parameters(mult, expected):
    model = build_model("resnet18", "none", 2)
    freeze(model, ["stem"])
    groups = param_groups(model, 0.01, mult)
    assert {g["name"]: g["lr"] for g in groups} == pytest.approx(expected)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert not any(id(p) in grouped for p in model.conv1.parameters())


def step(model) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                                weight_decay=1e-3)
    train_mode(model)
    loss = model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean()
    loss.backward()
    optimizer.step()


def test_freeze_keeps_backbone_weights_and_batchnorm_statistics():
    torch.manual_seed(0)
    model = build_model("resnet18", "none", 2)
    freeze(model, BLOCKS[1:])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step(model)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"fc.weight", "fc.bias"}

    unfreeze(model, ["layer4"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step(model)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("layer4.") and "running_mean" in k for k in changed)
    assert any(k.startswith("layer4.") and k.endswith("conv1.weight") for k in changed)
    assert not any(k.startswith(("layer3.", "layer1.", "conv1.", "bn1.")) for k in changed)
