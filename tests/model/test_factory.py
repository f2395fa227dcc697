"""The model factory: starting weights (ImageNet through torchvision's code, local, none), the
new head, parameter groups, freezing with BatchNorm kept in inference mode."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from images import write_content
from torch import nn

from finetune.core.errors import ConfigError
from finetune.model.archs import ARCHS
from finetune.model.factory import WeightsError, block_modules, build_model, check_weights_reachable, imagenet_weights
from finetune.train.strategy import freeze, param_groups, train_mode, unfreeze

IMAGENET_FILE = "resnet18-f37072fd.pth"  # the file name in ResNet18_Weights.IMAGENET1K_V1.url
BLOCKS = ARCHS["resnet18"].blocks  # fc, layer4, ..., stem


@pytest.mark.parametrize("num_classes", [2, 5])
def test_new_head_has_one_output_per_class(num_classes):
    model = build_model("resnet18", "none", num_classes)
    assert (model.fc.in_features, model.fc.out_features) == (512, num_classes)
    assert torch.all(model.fc.bias == 0) and model.fc.weight.abs().sum() > 0
    bound = (6 / (512 + num_classes)) ** 0.5  # Xavier-uniform's range
    assert model.fc.weight.abs().max() <= bound
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, num_classes)


@pytest.mark.parametrize(("arch", "features"), [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_every_registered_arch_gets_the_new_head(arch, features):
    model = build_model(arch, "none", 3).eval()  # eval: BatchNorm on a 1x1 map of one image
    assert (model.fc.in_features, model.fc.out_features) == (features, 3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    assert ARCHS[arch].blocks == BLOCKS and ARCHS[arch].head == "fc"


def test_imagenet_weights_load_through_torchvision_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert Path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url).name == IMAGENET_FILE
    source = torchvision.models.resnet18()
    with torch.no_grad():
        source.conv1.weight.fill_(0.5)
        source.layer3[0].bn1.running_mean.fill_(0.25)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(source.state_dict(), tmp_path / "hub" / "checkpoints" / IMAGENET_FILE)
    model = build_model("resnet18", "imagenet", 2)
    assert torch.all(model.conv1.weight == 0.5) and torch.all(model.layer3[0].bn1.running_mean == 0.25)
    assert model.fc.out_features == 2 and torch.all(model.fc.bias == 0)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_missing_imagenet_weights_say_where_to_put_the_file(tmp_path, monkeypatch, arch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    tried = []

    def offline(url, dst, *args, **kwargs):  # the network boundary: this machine has none
        tried.append((url, dst))
        raise urllib.error.URLError("no route to download.pytorch.org")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError) as caught:
        build_model(arch, "imagenet", 2)
    message = str(caught.value)
    # The path named is where torch's own code looked (and will look next time).
    [(url, dst)] = tried
    assert url == imagenet_weights(arch).url and dst.startswith(str(tmp_path))
    assert dst in message and url in message and "model.weights" in message and "URLError" in message


@pytest.mark.parametrize("wrapped", [False, True])
def test_local_state_dict_loads_all_but_the_head(tmp_path, wrapped):
    source = build_model("resnet18", "none", 10)  # a source task with 10 classes
    state = source.state_dict()
    path = tmp_path / "source.pt"
    torch.save({"model": state, "classes": list("abcdefghij")} if wrapped else state, path)
    model = build_model("resnet18", str(path), 3)
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert model.fc.out_features == 3


def other_shapes() -> dict[str, torch.Tensor]:
    state = torchvision.models.resnet18().state_dict()
    state["conv1.weight"] = torch.zeros(8, 3, 3, 3)
    return state


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        (None, "does not exist"),
        (b"not a tensor file", "not a PyTorch state_dict"),
        ([1, 2, 3], "holds no state_dict"),
        ({"model": {"conv1.weight": "text"}}, "holds no state_dict"),
        ({"x": torch.zeros(1)}, r"does not fit.*missing keys \['conv1.weight'.*1 unexpected keys \['x'\]"),
        (torchvision.models.resnet34().state_dict(), "does not fit.*unexpected keys.*layer1.2"),
        (other_shapes(), "does not fit.*size mismatch for conv1.weight"),
    ],
    ids=["missing", "not-torch", "a-list", "no-tensors", "other-keys", "other-arch", "other-shapes"],
)
def test_bad_weights_files_are_explained(tmp_path, content, phrase):
    path = write_content(tmp_path / "weights.pt", content)
    with pytest.raises(WeightsError, match=phrase) as caught:
        build_model("resnet18", str(path), 2)
    assert str(path) in str(caught.value)


def test_unknown_arch_lists_the_known_ones():
    with pytest.raises(ConfigError, match="resnet18"):
        build_model("vgg-tiny", "none", 2)


@pytest.mark.parametrize(
    ("frozen", "mult", "expected"),
    [(["stem"], 10.0, {"body": 0.01, "head": 0.1}), (["stem"], None, {"all": 0.01}),
     (["fc", "stem"], 10.0, {"body": 0.01}), (BLOCKS[1:], 10.0, {"head": 0.1})],
)
def test_param_groups_cover_the_trainable_parameters(frozen, mult, expected):
    model = build_model("resnet18", "none", 2)
    freeze(model, frozen)
    groups = param_groups(model, 0.01, mult)
    assert {g["name"]: g["lr"] for g in groups} == pytest.approx(expected)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    if mult is not None and "fc" not in frozen:
        assert {id(p) for p in model.fc.parameters()} == {id(p) for p in groups[-1]["params"]}


def test_blocks_name_the_resnet_stages():
    model = build_model("resnet18", "none", 2)
    assert block_modules(model, "stem") == [model.conv1, model.bn1]
    assert block_modules(model, "layer2") == [model.layer2] and block_modules(model, "fc") == [model.fc]
    covered = {id(p) for name in BLOCKS for module in block_modules(model, name) for p in module.parameters()}
    assert covered == {id(p) for p in model.parameters()}
    with pytest.raises(ValueError, match="layer4"):
        block_modules(model, "layer5")


def step(model) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                                weight_decay=1e-3)
    train_mode(model)
    loss = model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean()
    loss.backward()
    optimizer.step()


def batchnorm_training(model, prefix: str) -> set[bool]:
    return {m.training for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and name.startswith(prefix)}


def test_freeze_keeps_backbone_weights_and_batchnorm_statistics():
    torch.manual_seed(0)
    model = build_model("resnet18", "none", 2)
    freeze(model, BLOCKS[1:])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step(model)
    assert batchnorm_training(model, "") == {False} and model.training and model.fc.training
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"fc.weight", "fc.bias"}  # no weight, no running_mean/var, no batch count

    unfreeze(model, ["layer4"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step(model)
    assert batchnorm_training(model, "layer4") == {True} and batchnorm_training(model, "layer3") == {False}
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("layer4.") and "running_mean" in k for k in changed)
    assert any(k.startswith("layer4.") and "running_var" in k for k in changed)
    assert any(k.startswith("layer4.") and k.endswith("conv1.weight") for k in changed)
    assert "fc.weight" in changed
    assert not any(k.startswith(("layer3.", "layer2.", "layer1.", "conv1.", "bn1.")) for k in changed)


NO_HOST = "https://weights.nonexistent.invalid/models/resnet18-f37072fd.pth"  # .invalid never resolves


def test_unreachable_imagenet_weights_fail_before_training_with_the_offline_route(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    with pytest.raises(WeightsError) as caught:
        check_weights_reachable("resnet18", "imagenet", url=NO_HOST)
    message = str(caught.value)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert "the host name weights.nonexistent.invalid does not resolve" in message
    assert f"curl -L -o resnet18-f37072fd.pth {NO_HOST}" in message and f"to {cached} here" in message
    assert "model.weights" in message and "\n" not in message
    # Once the file is where torchvision looks, nothing is fetched and nothing is checked.
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights")
    check_weights_reachable("resnet18", "imagenet", url=NO_HOST)
    check_weights_reachable("resnet18", "none", url=NO_HOST)  # no ImageNet weights asked for
