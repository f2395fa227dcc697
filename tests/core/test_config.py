"""params.yaml → typed Params: the repo's own file loads; mistakes are named, not ignored."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO
from pydantic import ValidationError

from finetune.core.config import Checksum, TrainConfig, load_params
from finetune.demo.workspace import write_params
from finetune.core.errors import ConfigError


def test_the_repo_params_load_with_the_books_dataset():
    params = load_params(REPO / "params.yaml")
    assert params.data.url.endswith("/hotdog.zip")
    assert params.data.checksum == Checksum("sha1", "fba480ffa8aa7e0febbb511d181409f899b9baa5")
    assert params.data.dir == Path("data/hotdog")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sha1:FBA480FFA8AA7E0FEBBB511D181409F899B9BAA5", Checksum("sha1", "fba480ffa8aa7e0febbb511d181409f899b9baa5")),
        ("sha256:" + "ab" * 32, Checksum("sha256", "ab" * 32)),
    ],
)
def test_checksum_forms(text, expected):
    assert Checksum.parse(text) == expected
    assert str(expected) == text.lower()


@pytest.mark.parametrize("text", ["md5:" + "a" * 32, "sha1:" + "a" * 39, "sha256:" + "g" * 64, "fba480ff", ""])
def test_bad_checksums_are_refused(text):
    with pytest.raises(ValueError, match="sha1:<40 hex digits>"):
        Checksum.parse(text)


def _params_with(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text() + text)
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("\nextra_section: {a: 1}\n", "extra_section: unknown key"),
        ("\n".join(["", "demo:", "  workspace: demo", "  num_clases: 2"]), "demo.num_clases: unknown key"),
    ],
)
def test_unknown_keys_are_named(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_params(_params_with(tmp_path, extra))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("data.retries", -1, "data.retries: Input should be greater than or equal to 0"),
        ("data.max_unpacked_mb", "lots", "data.max_unpacked_mb"),
        ("demo.max_side", 20, "max_side \\(20\\) is below min_side"),
        ("demo.num_classes", 1, "demo.num_classes"),
        ("train_defaults.epochs", 0, "train_defaults.epochs: Input should be greater than or equal to 1"),
        ("model.arch", "resnet81", "model.arch: Value error, 'resnet81' is not an architecture the factory builds"),
        ("retrain.wait_timeout_s", 0, "retrain.wait_timeout_s: Input should be greater than 0"),
    ],
)
def test_invalid_values_are_named(tmp_path, key, value, message):
    path = tmp_path / "params.yaml"
    write_params(REPO / "params.yaml", path, {key: value})
    with pytest.raises(ConfigError, match=message) as caught:
        load_params(path)
    assert str(path) in str(caught.value)


def test_missing_key_and_missing_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text().replace("  retries: 4", "  # retries removed"))
    with pytest.raises(ConfigError, match="data.retries: missing"):
        load_params(path)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "absent.yaml")


def test_params_are_immutable():
    """Assigning to a loaded setting or section raises pydantic's ValidationError (frozen_instance)
    naming the field, and the value stays what params.yaml says."""
    params = load_params(REPO / "params.yaml")
    url = params.data.url
    with pytest.raises(ValidationError) as raised:
        params.data.url = "elsewhere"  # type: ignore[misc]
    assert [(e["type"], e["loc"]) for e in raised.value.errors()] == [("frozen_instance", ("url",))]
    with pytest.raises(ValidationError) as raised:
        params.data = None  # type: ignore[misc]
    assert [(e["type"], e["loc"]) for e in raised.value.errors()] == [("frozen_instance", ("data",))]
    assert params.data.url == url


# The training settings as params.yaml stated them in full before train_defaults (scratch and
# pretrain.train were equal); each variant must still read exactly these.
RECIPE = {
    "init": "scratch", "strategy": "full", "epochs": 5, "batch_size": 128, "loss": "mean", "lr": 0.064,
    "head_lr_mult": None, "weight_decay": 7.8125e-6, "momentum": 0.0, "schedule": "none", "step_epochs": 2,
    "step_gamma": 0.1, "unfreeze": {}, "unfreeze_lr_mult": 0.1, "device": "auto", "precision": "auto",
    "channels_last": True, "seed": 0, "deterministic": False, "workers": "auto", "max_steps": None,
    "decode_cache": True, "compile": "auto", "cached_features": True, "feature_views": 2, "nproc_per_node": 1,
    "checkpoint_every_s": 30, "val_fraction": 0.1, "monitor": "val_acc", "select": "best",
    "early_stopping": None, "test_each_epoch": False,
    "augment_on": "auto",
    # the judgment keys, added later (finetune/train/recipe.py, health.py)
    "min_steps": 50, "auto_steps": 300, "diverge_loss": 10.0, "judge_epochs": True,
}
FINETUNE = {"init": "pretrained", "lr": 0.0064, "head_lr_mult": 10}
REPO_SETTINGS = {"train.finetune": RECIPE | FINETUNE, "train.scratch": RECIPE, "pretrain.train": RECIPE}
# The demo workspace's settings as demo.overrides makes them: batch_size auto, each variant's lr
# the centre of its search; the source model keeps batch 32.
DEMO_BATCH = {"epochs": 10, "batch_size": "auto", "weight_decay": 8.3e-5, "momentum": 0.9}
DEMO_SETTINGS = {
    "train.finetune": RECIPE | FINETUNE | DEMO_BATCH | {"lr": 0.000063},
    "train.scratch": RECIPE | DEMO_BATCH | {"lr": 0.00063},
    "pretrain.train": RECIPE | DEMO_BATCH | {"batch_size": 32, "lr": 0.05, "momentum": 0.9, "schedule": "cosine",
                                            "weight_decay": 5.0e-4},
}


def _section(tree: dict, dotted: str) -> dict:
    """The mapping at a dotted key of loaded YAML."""
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _own_keys(text: str, dotted: str) -> set[str]:
    """The keys that the mapping at ``dotted`` states itself (not through ``<<:``)."""
    node = yaml.compose(text)
    for part in dotted.split("."):
        node = next(value for key, value in node.value if key.value == part)
    return {key.value for key, _ in node.value} - {"<<"}


@pytest.mark.parametrize("variant", sorted(REPO_SETTINGS))
def test_each_variant_reads_the_whole_recipe_merged(variant):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(_section(raw, variant)) == set(TrainConfig.model_fields)
    assert _section(raw, variant) == REPO_SETTINGS[variant]
    typed = load_params(REPO / "params.yaml")
    loaded = {"train.finetune": typed.train["finetune"], "train.scratch": typed.train["scratch"],
              "pretrain.train": typed.pretrain.train}
    assert loaded[variant] == TrainConfig.model_validate(REPO_SETTINGS[variant])


def test_the_recipe_is_stated_once_and_variants_list_only_their_changes():
    text = (REPO / "params.yaml").read_text()
    raw = yaml.safe_load(text)
    changed = {k for k, v in raw["train"]["finetune"].items() if raw["train"]["scratch"][k] != v}
    assert changed == {"init", "lr", "head_lr_mult"}
    assert raw["train_defaults"] == raw["train"]["scratch"] == raw["pretrain"]["train"]
    own = {name: _own_keys(text, name) for name in REPO_SETTINGS}
    assert own == {"train.finetune": {"init", "lr", "head_lr_mult"}, "train.scratch": set(), "pretrain.train": set()}
    assert text.count("The book sums the per-example loss") == 1


def test_the_demo_overrides_give_the_demo_its_former_settings(tmp_path):
    path = tmp_path / "params.yaml"
    overrides = load_params(REPO / "params.yaml").demo.overrides
    write_params(REPO / "params.yaml", path, overrides)
    raw = yaml.safe_load(path.read_text())
    assert {name: _section(raw, name) for name in DEMO_SETTINGS} == DEMO_SETTINGS
    assert load_params(path).model.train_crop == 64
    assert load_params(path).study.enabled and load_params(path).study.fractions == (0.25, 0.5, 1.0)
    assert load_params(path).study.seeds == (0, 1)
    # Each value once: no variant's own override repeats what it gets from train_defaults.
    repeated = [key for key, value in overrides.items() if key.startswith(("train.", "pretrain.train."))
                and raw["train_defaults"][key.rpartition(".")[2]] == value]
    assert repeated == []


def test_ruamel_edits_keep_the_merge(tmp_path):
    """A default set on train_defaults reaches every variant after a reload; a key set on one
    variant becomes that variant's own key (the merge line stays)."""
    path = tmp_path / "params.yaml"
    write_params(REPO / "params.yaml", path, {"train.scratch.epochs": 2, "train_defaults.batch_size": 64})
    text = path.read_text()
    assert text.count("<<: *train_defaults") == 3
    assert _own_keys(text, "train.scratch") == {"epochs"} and _own_keys(text, "pretrain.train") == set()
    params = load_params(path)
    assert [params.train["scratch"].epochs, params.train["finetune"].epochs, params.pretrain.train.epochs] == [2, 5, 5]
    assert {params.train["scratch"].batch_size, params.train["finetune"].batch_size,
            params.pretrain.train.batch_size} == {64}


@pytest.mark.parametrize(
    ("line", "named", "not_named"),
    [
        # A typo in the defaults is named there (and in each variant that merges it) ...
        ("  init: scratch ", ["train_defaults.epoch", "train.scratch.epoch", "pretrain.train.epoch"], []),
        # ... a typo in one variant only there.
        ("    init: pretrained", ["train.finetune.epoch"], ["train_defaults.epoch", "train.scratch.epoch"]),
    ],
)
def test_unknown_training_keys_are_named_where_they_are(tmp_path, line, named, not_named):
    path = tmp_path / "params.yaml"
    indent = line[: len(line) - len(line.lstrip())]
    path.write_text((REPO / "params.yaml").read_text().replace(line, f"{indent}epoch: 5\n{line}", 1))
    with pytest.raises(ConfigError) as caught:
        load_params(path)
    for key in named:
        assert f"{key}: unknown key" in str(caught.value)
    for key in not_named:
        assert key not in str(caught.value)


@pytest.mark.parametrize(("content", "accepted"), [
    (None, True),  # missing: the pretrain stage may still make it; the train stage checks
    (b"\xff\xd8\xff\xe0 a JPEG", False),
    (b"just text", False),
    ("torch", True),
])
def test_a_local_weights_file_must_be_one_torch_wrote(tmp_path, content, accepted):
    path = tmp_path / "params.yaml"
    write_params(REPO / "params.yaml", path, {"model.weights": "weights.pt"})
    if content == "torch":
        import torch

        torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "weights.pt")
    elif content is not None:
        (tmp_path / "weights.pt").write_bytes(content)
    if accepted:
        assert load_params(path).model.weights == "weights.pt"
        return
    with pytest.raises(ConfigError, match="model.weights: .*weights.pt is not a PyTorch state_dict file") as caught:
        load_params(path)
    assert "weights_only" not in str(caught.value)  # not torch's advice to unpickle anything
