"""One model factory keyed by name: the network, its starting weights, a new head, its blocks.

``build_model`` is steps 1–3 of the recipe: take the source model (ImageNet weights through
torchvision's weights API, a local state_dict, or none), keep every layer but the output layer,
and put a new, Xavier-initialised output layer with one output per class in its place. The
network carries its architecture's name, so whatever trains it finds its row of ARCHS (head,
top, blocks) through :func:`arch_of` alone.
"""

from __future__ import annotations

import logging
import socket
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum

from finetune.core.errors import ConfigError, FinetuneError
from finetune.core.files import file_digest
from finetune.model.archs import ARCHS, Arch

log = logging.getLogger(__name__)
# The attribute that names a network's row of ARCHS: a plain string, so that the network still
# unpickles where this project is not installed (the portable MLflow model pickles it).
ARCH_ATTR = "finetune_arch"


class WeightsError(FinetuneError):
    """The starting weights could not be had; the message says how to provide them."""


def build_model(arch: str, weights: str, num_classes: int) -> nn.Module:
    """``arch`` with ``weights`` (imagenet | none | path to a state_dict) and a new
    ``num_classes``-way output layer."""
    spec = arch_spec(arch)
    builder = getattr(torchvision.models, spec.builder)
    model = _imagenet(builder, imagenet_weights(arch)) if weights == "imagenet" else builder(weights=None)
    setattr(model, ARCH_ATTR, arch)
    if weights not in ("imagenet", "none"):
        load_backbone(model, Path(weights))
    model.set_submodule(spec.head, new_head(head_of(model).in_features, num_classes), strict=True)
    return model


def arch_spec(arch: str) -> Arch:
    """The ARCHS row of ``arch``; a ConfigError naming params.yaml's key when there is none."""
    if arch not in ARCHS:
        raise ConfigError(f"model.arch {arch!r} in params.yaml is not known; use one of {sorted(ARCHS)} "
                          "(or add a row to ARCHS in finetune/model/archs.py).")
    return ARCHS[arch]


def arch_of(model: nn.Module) -> Arch:
    """The ARCHS row of a network that build_model made."""
    name = getattr(model, ARCH_ATTR, None)
    if name is None:
        raise ValueError(f"{type(model).__name__} carries no architecture name ({ARCH_ATTR}): build it with "
                         "finetune.model.factory.build_model, which records its row of ARCHS")
    return arch_spec(name)


def head_of(model: nn.Module) -> nn.Linear:
    """The output layer of ``model`` (its row's ``head``)."""
    return model.get_submodule(arch_of(model).head)


def top_of(model: nn.Module) -> nn.Module:
    """The last module ``model`` runs, holding the output layer (its row's ``top``): its input is
    the backbone's features."""
    return model.get_submodule(arch_of(model).top)


@contextmanager
def top_removed(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the ``with`` block ``model`` ends at its top's input (it returns the backbone's
    features); yields the top, which is put back on leaving."""
    path = arch_of(model).top
    top = model.get_submodule(path)
    model.set_submodule(path, nn.Identity(), strict=True)
    try:
        yield top
    finally:
        model.set_submodule(path, top, strict=True)


def imagenet_weights(arch: str) -> WeightsEnum:
    """torchvision's ImageNet weights of ``arch`` (the ARCHS row's ``imagenet``)."""
    enum, _, member = arch_spec(arch).imagenet.partition(".")
    return getattr(getattr(torchvision.models, enum), member)


def new_head(in_features: int, num_classes: int) -> nn.Linear:
    """The new output layer, initialised as in the book: Xavier-uniform weights, zero bias."""
    head = nn.Linear(in_features, num_classes)
    nn.init.xavier_uniform_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def _imagenet(builder: Callable[..., nn.Module], weights: WeightsEnum) -> nn.Module:
    """Through torchvision's own code: downloaded once into the torch hub cache, then offline."""
    try:
        return builder(weights=weights)
    except Exception as err:  # no network, proxy, a bad cache file: all end here
        raise WeightsError(offline_route(weights.url, f"{type(err).__name__}: {err}")) from None


def hub_file(url: str) -> Path:
    """Where torch.hub.load_state_dict_from_url looks before downloading ``url`` (the URL's file
    name in the torch hub cache; TORCH_HOME moves it)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def offline_route(url: str, why: str) -> str:
    """The message for ImageNet weights that could not be had: what failed, and the air-gapped
    route (the exact file, where it goes, the one command that fetches it, or a local file)."""
    cached = hub_file(url)
    return (f"Could not get the ImageNet weights from {url} ({why}). On a machine with network access, "
            f"run `curl -L -o {cached.name} {url}` and copy {cached.name} to {cached} here (the torch "
            "hub cache, replacing any broken file there; TORCH_HOME moves it), or set model.weights in "
            "params.yaml to a local state_dict file (torch.save(model.state_dict(), path)).")


def check_weights_reachable(arch: str, weights: str, url: str | None = None) -> None:
    """Before a pipeline starts: ImageNet weights that are not in the torch hub cache must come
    from a host name that resolves here (or through a proxy); else the WeightsError of
    :func:`offline_route`, in a second instead of minutes into training. ``url``: the weights'
    file (default: torchvision's for ``arch``)."""
    if weights != "imagenet":
        return
    url = url or imagenet_weights(arch).url
    host = urlparse(url).hostname
    if hub_file(url).is_file() or not host or urllib.request.getproxies():
        return
    try:
        socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise WeightsError(offline_route(url, f"the host name {host} does not resolve: {err.strerror or err}")) from None


def load_backbone(model: nn.Module, path: Path) -> None:
    """Load a local state_dict (or a checkpoint holding one under ``model``) into every layer
    but the output layer, whose shape belongs to the source task."""
    if not path.is_file():
        raise WeightsError(f"model.weights file {path} does not exist. Fix the path in params.yaml, "
                           "or use imagenet or none.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"{path} is not a PyTorch state_dict ({type(err).__name__}: {err}). "
                           "Save one with torch.save(model.state_dict(), path).") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} holds no state_dict (a mapping of names to tensors, or a checkpoint "
                           "with one under 'model'). Save one with torch.save(model.state_dict(), path).")
    head = arch_of(model).head + "."  # the source task's output layer: another shape, left new
    state = {k: v for k, v in state.items() if not k.startswith(head)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # same names, other shapes
        reason = " ".join(str(err).split())  # torch's message spans lines; the error is one paragraph
        raise WeightsError(f"{path} does not fit this model.arch ({reason}). Use weights saved from the "
                           "same architecture, or fix model.arch / model.weights in params.yaml.") from None
    missing = [k for k in missing if not k.startswith(head)]
    if missing or unexpected:
        raise WeightsError(
            f"{path} does not fit this model.arch: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}. Use weights saved from the same "
            "architecture, or fix model.arch / model.weights in params.yaml.")
    log.info("loaded %d tensors from %s (output layer left new)", len(state), path)


def block_modules(model: nn.Module, name: str) -> list[nn.Module]:
    """The modules of block ``name`` of ``model``, as its row of ARCHS lists them (a ResNet's
    ``stem`` is conv1 + bn1)."""
    spec = arch_of(model)
    if name not in spec.parts:
        raise ValueError(f"{name!r} is not a block of {spec.builder}; its blocks are {', '.join(spec.blocks)}")
    return [model.get_submodule(path) for path in spec.parts[name]]


def weights_path(weights: str, project: Path) -> str:
    """params.yaml's ``model.weights`` as build_model takes it: a local file relative to ``project``."""
    return weights if weights in ("imagenet", "none") else str(project / weights)


def weights_digest(weights: str, project: Path) -> str:
    """Changes when a local weights file changes (so does the fingerprint of a training)."""
    path = project / weights
    return file_digest(path, "sha256") if weights not in ("imagenet", "none") and path.exists() else weights
