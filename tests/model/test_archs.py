"""The architecture table: every row's head, top and blocks are real modules of the network it
builds, freezing and unfreezing follow the row, and params.yaml's unfreeze names are checked
against the chosen row."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO
from torch import nn

from finetune.core.config import load_params
from finetune.demo.workspace import write_params
from finetune.core.errors import ConfigError
from finetune.model.archs import ARCHS, Arch
from finetune.model.factory import block_modules, build_model, head_of, top_of, top_removed
from finetune.train.strategy import freeze, initial_frozen, param_groups, train_mode, unfreeze


def under(name: str, paths) -> bool:
    """Whether the parameter or buffer ``name`` belongs to a module at one of ``paths``."""
    return any(name.startswith(path + ".") for path in paths)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_row_names_real_modules_of_its_network(arch):
    spec = ARCHS[arch]
    torch.manual_seed(0)
    model = build_model(arch, "none", 3).eval()  # eval: BatchNorm on a 1x1 map
    head = head_of(model)
    assert isinstance(head, nn.Linear) and head.out_features == 3 and torch.all(head.bias == 0)
    assert model.get_submodule(spec.head) is head and any(m is head for m in top_of(model).modules())
    blocks = {name: [p for m in block_modules(model, name) for p in m.parameters()] for name in spec.blocks}
    assert blocks[spec.blocks[0]] == list(head.parameters())
    owned = [id(p) for params in blocks.values() for p in params]
    assert len(owned) == len(set(owned)) and set(owned) == {id(p) for p in model.parameters()}
    assert all(params for params in blocks.values()), "a block without parameters"
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        with top_removed(model) as top:
            features = model(images)
        assert torch.allclose(top(features), model(images), atol=1e-5) and top_of(model) is top
    assert model(images).shape == (2, 3)


def sgd_step(model: nn.Module) -> None:
    """One step that moves every trainable parameter (weight decay moves those without a gradient)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    train_mode(model)
    model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean().backward()
    optimizer.step()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_freezing_then_unfreezing_the_top_block_trains_exactly_it(arch):
    spec = ARCHS[arch]
    torch.manual_seed(0)
    model = build_model(arch, "none", 3)
    freeze(model, initial_frozen(model, SimpleNamespace(strategy="freeze")))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [f"{spec.head}.weight", f"{spec.head}.bias"]
    top_block = spec.unfreezable[0]
    unfreeze(model, [top_block])
    expected = {n for n, _ in model.named_parameters() if under(n, (spec.head, *spec.parts[top_block]))}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    groups = {g["name"]: g for g in param_groups(model, 0.01, 10.0)}
    assert {g: groups[g]["lr"] for g in groups} == pytest.approx({"body": 0.01, "head": 0.1})
    assert {id(p) for p in groups["head"]["params"]} == {id(p) for p in head_of(model).parameters()}

    before = {k: v.clone() for k, v in model.state_dict().items()}
    sgd_step(model)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    allowed = (spec.head, *spec.parts[top_block])
    assert expected <= changed and all(under(k, allowed) for k in changed), sorted(changed - expected)[:5]
    # The frozen blocks ran as fixed functions: BatchNorm statistics, stochastic depth, dropout off.
    for name in spec.unfreezable[1:]:
        assert not any(m.training for module in block_modules(model, name) for m in module.modules()), name


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_unfreeze_names_are_checked_against_the_chosen_arch(tmp_path, arch):
    spec, other = ARCHS[arch], "hidden" if arch.startswith("resnet") else "layer4"
    params = tmp_path / "params.yaml"
    good = {2: spec.unfreezable[0], 3: spec.unfreezable[1]}
    write_params(REPO / "params.yaml", params, {"model.arch": arch, "train.finetune.unfreeze": good})
    assert load_params(params).train["finetune"].unfreeze == good

    write_params(REPO / "params.yaml", params, {"model.arch": arch, "train.finetune.unfreeze": {2: other}})
    with pytest.raises(ConfigError) as caught:
        load_params(params)
    message = str(caught.value).split("\n", 1)[1]  # after the file's line: one paragraph
    assert "\n" not in message and f"train.finetune.unfreeze {{2: {other!r}}} names {other!r}" in message
    assert f"model.arch {arch}" in message and ", ".join(spec.unfreezable) in message

    write_params(REPO / "params.yaml", params, {"model.arch": arch, "train_defaults.unfreeze": {2: spec.blocks[0]}})
    with pytest.raises(ConfigError, match=rf"train_defaults.unfreeze .*{spec.blocks[0]}', the new output layer, "
                                          "always trains"):
        load_params(params)


def test_a_row_must_start_with_its_head_and_own_each_module_once():
    with pytest.raises(ValueError, match="first block must be the head"):
        Arch("resnet18", "ResNet18_Weights.DEFAULT", head="fc", top="fc", parts={"layer4": ("layer4",)})
    with pytest.raises(ValueError, match="inside the top"):
        Arch("x", "y", head="classifier.1", top="fc", parts={"head": ("classifier.1",)})
    with pytest.raises(ValueError, match="in two blocks"):
        Arch("x", "y", head="fc", top="fc", parts={"fc": ("fc",), "a": ("layer4",), "b": ("layer4",)})


def test_the_table_loads_without_torch():
    code = "import sys, finetune.model.archs; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(REPO)).returncode == 0
