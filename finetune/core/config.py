"""Typed view of params.yaml: the pipeline's only configuration.

Every section is a frozen pydantic model that rejects unknown keys, so a typo in params.yaml
(or in `dvc exp run -S`) is an error that names the key instead of a silently ignored setting.
No defaults live here: params.yaml holds every value.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from finetune.core.errors import ConfigError
from finetune.model.archs import ARCHS, unfreeze_problem

PARAMS_FILE = Path("params.yaml")
Positive = Annotated[int, Field(ge=1)]
_UNION_BRANCH = re.compile(r"constrained-int|int|float|str|bool|literal\[.*\]")

_HEX_LENGTHS = {"sha1": 40, "sha256": 64}


@dataclass(frozen=True)
class Checksum:
    """An expected digest of a file, e.g. ``sha1:fba4...``."""

    algorithm: str
    hexdigest: str

    @classmethod
    def parse(cls, text: str) -> Checksum:
        """Parse ``<algorithm>:<hex>``; raise ValueError saying the accepted forms."""
        algorithm, _, hexdigest = text.strip().partition(":")
        algorithm, hexdigest = algorithm.lower(), hexdigest.lower()
        length = _HEX_LENGTHS.get(algorithm)
        if length is None or not re.fullmatch(rf"[0-9a-f]{{{length}}}", hexdigest):
            raise ValueError(
                f"{text!r} is not a checksum: write sha1:<40 hex digits> or sha256:<64 hex digits>"
            )
        return cls(algorithm, hexdigest)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hexdigest}"


class Section(BaseModel):
    """Base of every params.yaml section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class DataConfig(Section):
    """``data:`` where the dataset comes from and where it goes."""

    url: str = Field(min_length=1)
    checksum: Checksum | None
    dir: Path
    downloads: Path
    max_unpacked_mb: float = Field(gt=0)
    timeout_s: float = Field(gt=0)
    retries: int = Field(ge=0)
    backoff_s: float = Field(ge=0)

    @field_validator("checksum", mode="before")
    @classmethod
    def _parse_checksum(cls, value: Any) -> Checksum | None:
        if value is None or isinstance(value, Checksum):
            return value
        return Checksum.parse(str(value))


class DemoConfig(Section):
    """``demo:`` the offline demo's workspace and generated dataset."""

    workspace: Path
    num_classes: int = Field(ge=2)
    train_per_class: int = Field(ge=1)
    test_per_class: int = Field(ge=1)
    min_side: int = Field(ge=16)
    max_side: int = Field(ge=16)
    seed: int
    source_classes: int = Field(ge=3)  # the generated source dataset (2 would be hot dogs again)
    source_train_per_class: int = Field(ge=1)
    source_test_per_class: int = Field(ge=1)
    overrides: dict[str, Any]  # dotted params keys set in the demo workspace (CPU-sized training)

    @model_validator(mode="after")
    def _sides_ordered(self) -> DemoConfig:
        if self.max_side < self.min_side:
            raise ValueError(f"max_side ({self.max_side}) is below min_side ({self.min_side})")
        return self


class ExpectedCounts(Section):
    """Images per class that a split is expected to hold exactly (a warning-level check)."""

    train: int = Field(ge=1)
    test: int = Field(ge=1)


class ValidateConfig(Section):
    """``validate:`` the checks the dataset must pass before anything trains on it."""

    index: Path
    files: Path
    report: Path
    metrics: Path  # the headline numbers (dvc metrics show); the report holds the detail
    docs: Path
    gx_dir: Path
    on_failure: Literal["stop", "quarantine"]
    min_classes: int = Field(ge=2)
    min_images_per_class: int = Field(ge=1)
    expected_per_class: ExpectedCounts | None
    min_side: int = Field(ge=1)
    max_aspect_ratio: float = Field(ge=1)
    max_pixels: int = Field(ge=1)
    max_class_ratio: float = Field(ge=1)
    extensions: tuple[str, ...] = Field(min_length=1)
    workers: int = Field(ge=0)

    @field_validator("extensions")
    @classmethod
    def _dotted_lower(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [ext for ext in value if not re.fullmatch(r"\.[a-z0-9]+", ext)]
        if bad:
            raise ValueError(f"extensions must look like .jpg (a dot, lower case); fix {bad}")
        return value


class ModelConfig(Section):
    """``model:`` the network, where its starting weights come from, and its preprocessing."""

    arch: str
    weights: str = Field(min_length=1)  # imagenet | none | path to a state_dict file
    train_crop: int = Field(ge=16)
    test_resize: int = Field(ge=16)
    test_crop: int = Field(ge=16)
    resize_mode: Literal["squash", "aspect"]

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        if value not in ARCHS:
            raise ValueError(f"{value!r} is not an architecture the factory builds; use one of {sorted(ARCHS)} "
                             "(or add a row to ARCHS in finetune/model/archs.py)")
        return value

    @model_validator(mode="after")
    def _crop_fits(self) -> ModelConfig:
        if self.test_crop > self.test_resize:
            raise ValueError(f"test_crop ({self.test_crop}) is larger than test_resize ({self.test_resize})")
        return self


class EarlyStopping(Section):
    """``early_stopping:`` stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs."""

    patience: int = Field(ge=1)
    min_delta: float = Field(ge=0)


class TrainConfig(Section):
    """``train.<variant>:`` how one variant trains (fine-tune, scratch, ...); also ``train_defaults:``,
    the recipe that every variant and ``pretrain.train`` merge before their own keys."""

    init: Literal["pretrained", "scratch"]
    strategy: Literal["full", "freeze", "gradual"]
    epochs: Positive | Literal["auto"]  # auto: about auto_steps optimizer steps (finetune/train/recipe.py)
    batch_size: Positive | Literal["auto"]  # auto: train images / 8, at most the book's 128
    min_steps: int = Field(ge=0)  # a training planned with fewer optimizer steps warns before it starts
    auto_steps: int = Field(ge=1)  # epochs: auto trains about this many optimizer steps
    diverge_loss: float = Field(gt=1)  # an epoch's train loss above this x ln(classes) has diverged
    judge_epochs: bool  # false: only a non-finite loss fails an epoch (smoke tests on a handful of images)
    loss: Literal["mean", "sum"]
    lr: float = Field(gt=0)
    head_lr_mult: float | None = Field(gt=0)
    weight_decay: float = Field(ge=0)
    momentum: float = Field(ge=0, lt=1)
    schedule: Literal["none", "cosine", "step"]
    step_epochs: int = Field(ge=1)
    step_gamma: float = Field(gt=0, le=1)
    unfreeze: dict[int, str]  # gradual: epoch (1-based) -> block unfrozen at its start
    unfreeze_lr_mult: float = Field(gt=0)
    device: str
    precision: Literal["auto", "fp32", "bf16", "fp16"]
    channels_last: bool
    seed: int
    deterministic: bool
    workers: int | Literal["auto"]
    max_steps: int | None = Field(ge=1)  # per epoch; for smoke tests, null = the whole epoch
    decode_cache: bool  # read images decoded once (cache:) and augment uint8 tensors
    augment_on: Literal["auto", "cpu", "device"]  # train crop + flip: loader workers or batched on the device
    compile: bool | Literal["auto"]  # torch.compile; auto: when the planned work repays it (train/compiling.py)
    cached_features: bool  # frozen epochs train the head on backbone features computed once per view
    feature_views: int = Field(ge=1)  # augmented views per train image for cached features
    nproc_per_node: int = Field(ge=1)  # > 1: DistributedDataParallel over this many processes (torchrun)
    checkpoint_every_s: float = Field(ge=0)  # a checkpoint after the epoch that ends this long after the last
    val_fraction: float = Field(ge=0, lt=1)  # of each train class, held out to watch; 0: no validation split
    monitor: Literal["val_acc", "val_loss"]  # what selection and early stopping watch
    select: Literal["best", "last"]  # the weights kept: the best epoch by `monitor`, or the last
    early_stopping: EarlyStopping | None  # null: train every epoch
    test_each_epoch: bool  # also score the test split every epoch (the book's plot); never used to decide

    @model_validator(mode="after")
    def _watching_needs_validation(self) -> TrainConfig:
        if self.val_fraction == 0 and (self.select == "best" or self.early_stopping is not None):
            raise ValueError("select: best and early_stopping watch a validation split: set val_fraction above 0 "
                             "(e.g. 0.1), or select: last and early_stopping: null")
        return self

    @model_validator(mode="after")
    def _gradual_plan(self) -> TrainConfig:
        # The block names depend on model.arch: Params checks them (unfreeze_problem).
        last = self.epochs if isinstance(self.epochs, int) else float("inf")
        bad = {e: b for e, b in self.unfreeze.items() if not 1 < e <= last}
        if bad:
            raise ValueError(f"unfreeze entries {bad}: use epochs 2..{self.epochs} -> a block of model.arch")
        return self


class PretrainConfig(Section):
    """``pretrain:`` the optional source model (step 1 of the recipe) for users without ImageNet
    weights: a dataset of the same layout (``data``, fetched like data:) and how to train on it."""

    data: DataConfig | None
    train: TrainConfig

    @model_validator(mode="after")
    def _source_starts_from_scratch(self) -> PretrainConfig:
        # The source model is what stands in for ImageNet weights: it starts from random weights
        # (finetune/stages/pretrain.py). Starting it from model.weights would read the stage's own
        # output when that names models/source/model.pt, as it does once pretraining is in use.
        if self.train.init != "scratch":
            raise ValueError(
                f"pretrain.train.init is {self.train.init!r}, but the pretrain stage always trains the source "
                "model from random weights: it is what fine-tuning starts from when ImageNet weights cannot be "
                "had, and model.weights (what `pretrained` starts from) then names its own output, "
                "models/source/model.pt. Set `init: scratch` under pretrain.train in params.yaml (it is "
                "inherited from train_defaults unless pretrain.train sets it); to fine-tune from ImageNet "
                "weights, set init: pretrained under train.<variant> instead.")
        return self


class SearchConfig(Section):
    """``search:`` the same learning-rate search for every variant, chosen on validation only."""

    enabled: bool  # false: each variant trains with its own lr as written
    budget: int = Field(ge=1)  # trainings per variant, folds included
    lr_step: float = Field(gt=1)  # neighbouring lrs of the grid differ by this factor
    min_val_per_class: int = Field(ge=2)  # a smaller validation split: k-fold cross-validation instead
    folds: int = Field(ge=2)
    workers: int | Literal["auto"]  # trials trained at once; auto: one per GPU, one per 4 CPU cores
    out: Path  # folder: <variant>.json, the chosen values and every trial



class CacheConfig(Section):
    """``cache:`` where and how images are kept decoded between epochs, variants and runs."""

    dir: Path  # one folder per data version and sizes; not tracked, rebuilt when missing
    short_side: int | None = Field(ge=16)  # train images' shorter side; null: model.test_resize
    workers: int | Literal["auto"]  # processes that decode


class EvaluateConfig(Section):
    """``evaluate:`` the test-split evaluation of every variant and the comparison of two."""

    challenger: str  # the variant under test (fine-tuned) ...
    baseline: str  # ... and the one it is compared with (scratch)
    batch_size: int = Field(ge=1)
    device: str
    workers: int | Literal["auto"]
    metrics: Path  # dvc metrics JSON
    report: Path  # Markdown
    plots: Path  # folder: dvc plots data (CSV) and PNGs
    errors_shown: int = Field(ge=1)  # misclassified test images in the error grid
    chance_p: float = Field(gt=0, lt=1)  # above chance: exact binomial test vs the majority class, p below this

    @model_validator(mode="after")
    def _two_variants(self) -> EvaluateConfig:
        if self.challenger == self.baseline:
            raise ValueError(f"challenger and baseline are both {self.challenger!r}: name two variants of train:")
        return self


class StudyConfig(Section):
    """``study:`` the compared variants retrained over seeds and nested fractions of the train split."""

    enabled: bool  # false: the study stages only write a note (dvc repro stays as fast as without them)
    seeds: tuple[int, ...] = Field(min_length=1)
    fractions: tuple[float, ...] = Field(min_length=1)  # of each train class (after validation is held out)
    runs: Path  # folder: one JSON per seed (the study@<seed> stages' outputs)
    metrics: Path  # dvc metrics JSON
    plots: Path  # folder: learning-curve data (CSV) and PNG
    report: Path  # Markdown

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < f <= 1 for f in value) or list(value) != sorted(set(value)):
            raise ValueError(f"fractions must be increasing, each in (0, 1], e.g. [0.25, 0.5, 1.0]; got {list(value)}")
        return value

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(value)) != len(value):
            raise ValueError(f"seeds repeat: {list(value)}; each seed is one repetition")
        return value


class RegisterConfig(Section):
    """``register:`` the model registry: which variant becomes a version, and the promotion gate."""

    model_name: str = Field(min_length=1)
    metric: Literal["accuracy", "precision", "recall", "f1", "roc_auc", "log_loss"]
    min_improvement: float = Field(ge=0)  # production moves only for a gain of at least this (and > 0)
    record: Path  # the register stage's output: the version it made (JSON)


Port = Annotated[int, Field(ge=1, le=65535)]


class PortsConfig(Section):
    """``ports:`` where each server listens on 127.0.0.1 (make variables override one per command)."""

    ui: Port
    serve: Port
    prefect: Port
    s3: Port
    postgres: Port

    @model_validator(mode="after")
    def _distinct(self) -> PortsConfig:
        values = self.model_dump()
        for name, port in values.items():
            same = [other for other, p in values.items() if p == port and other != name]
            if same:
                raise ValueError(f"ports.{name} and ports.{same[0]} are both {port}: give each server its own port")
        return self


class ServeConfig(Section):
    """``serve:`` the REST endpoint of the production model (`make serve`)."""

    host: str
    max_image_mb: float = Field(gt=0)  # larger encoded images are refused (400), as are > validate.max_pixels
    max_pixels: int = Field(ge=1)  # the server refuses (400) an image whose header declares more, undecoded
    max_request_mb: float = Field(gt=0)  # a larger request body is refused (413) before it is read or parsed
    read_timeout_s: float = Field(gt=0)  # a request's head and body must arrive within it (else 408 or closed)
    keep_alive_s: int = Field(ge=1)  # an idle keep-alive connection is closed after it (uvicorn timeout_keep_alive)
    max_connections: int = Field(ge=1)  # open connections beyond it are answered 503 (uvicorn limit_concurrency)
    refresh_s: float = Field(ge=0)  # how often a served @alias is looked up and a moved one loaded; 0: never

    @model_validator(mode="after")
    def _one_image_fits_a_request(self) -> ServeConfig:
        # An image at max_image_mb arrives as base64 (4/3 of its size): a smaller body limit
        # would refuse with 413 images that the image limit says are fine.
        needed = self.max_image_mb * 4 / 3
        if self.max_request_mb < needed:
            raise ValueError(f"max_request_mb ({self.max_request_mb}) is below one image of max_image_mb "
                             f"({self.max_image_mb}) in base64 ({needed:.1f} MB): raise max_request_mb "
                             "or lower max_image_mb")
        return self


class RetrainConfig(Section):
    """``retrain:`` the scheduled retraining deployment (flows/retrain.py)."""

    cron: str = Field(min_length=9)  # five fields, e.g. "0 3 * * 1"
    timezone: str
    deployment: str = Field(min_length=1)
    if_running: Literal["wait", "skip"]  # a run that finds the workspace busy waits, or logs and skips
    wait_timeout_s: float | None = Field(gt=0)  # how long a waiting run waits for the lock; None: no limit

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError(f"{value!r} is not a cron expression: five fields, minute hour day month weekday")
        return value


class TimeoutsConfig(Section):
    """``timeouts:`` how long the flow lets each stage, the gate and itself run (tasks/dvc.py)."""

    stage_s: dict[str, float] = Field(min_length=1)  # by stage name before any @; ``other``: the rest
    gate_s: float = Field(gt=0)
    flow_s: float = Field(gt=0)
    grace_s: float = Field(gt=0, le=25)  # a Ctrl-C must end a flow within 30 s

    @field_validator("stage_s")
    @classmethod
    def _positive_with_other(cls, value: dict[str, float]) -> dict[str, float]:
        if "other" not in value:
            raise ValueError("needs an `other:` limit, for stages it does not name")
        bad = sorted(name for name, seconds in value.items() if not seconds > 0)
        if bad:
            raise ValueError(f"limits must be seconds above 0; fix {bad}")
        return value

    def for_stage(self, stage: str) -> float:
        """The limit of ``stage`` (``train@finetune``: the ``train`` limit)."""
        return self.stage_s.get(stage.partition("@")[0], self.stage_s["other"])


NotifyEvent = Literal["failure", "crash", "cancellation", "timeout", "promotion", "refusal"]


class NotifyConfig(Section):
    """``notify:`` the apprise URLs that hear of every end of a run (flows/notify.py)."""

    urls: tuple[str, ...]
    events: tuple[NotifyEvent, ...]
    timeout_s: float = Field(gt=0)

    @model_validator(mode="before")
    @classmethod
    def _no_webhook_url(cls, value: Any) -> Any:
        if isinstance(value, dict) and "webhook_url" in value:
            url = value["webhook_url"] or "https://host/path"
            scheme, _, rest = str(url).partition("://")
            raise ValueError(f"notify.webhook_url was replaced by notify.urls (apprise URLs): write urls: "
                             f"[{'jsons' if scheme == 'https' else 'json'}://{rest}] for the same JSON POST "
                             "(or urls: [] for none), and remove webhook_url")
        return value


class Params(Section):
    """The whole of params.yaml."""

    data: DataConfig
    # ``validate:`` in the file; the attribute has a trailing _ because BaseModel has validate().
    validate_: ValidateConfig = Field(alias="validate")
    model: ModelConfig
    # The recipe that pretrain.train and every train.<variant> merge (YAML `<<: *train_defaults`,
    # resolved by the YAML loader, so each of those is validated whole); validated itself so that
    # a typo in it is named where it was made, not only as the same error in every variant.
    train_defaults: TrainConfig
    pretrain: PretrainConfig
    train: dict[str, TrainConfig] = Field(min_length=1)
    search: SearchConfig
    cache: CacheConfig
    evaluate: EvaluateConfig
    study: StudyConfig
    # ``register:`` in the file; BaseModel's metaclass (an ABCMeta) has register().
    register_: RegisterConfig = Field(alias="register")
    ports: PortsConfig
    serve: ServeConfig
    retrain: RetrainConfig
    timeouts: TimeoutsConfig
    notify: NotifyConfig
    demo: DemoConfig

    @model_validator(mode="after")
    def _unfreeze_blocks_of_the_arch(self) -> Params:
        plans = {"train_defaults": self.train_defaults, "pretrain.train": self.pretrain.train,
                 **{f"train.{name}": cfg for name, cfg in self.train.items()}}
        for key, cfg in plans.items():
            problem = unfreeze_problem(self.model.arch, cfg.unfreeze, f"{key}.unfreeze")
            if problem:
                raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _compared_variants_exist(self) -> Params:
        absent = [v for v in (self.evaluate.challenger, self.evaluate.baseline) if v not in self.train]
        if absent:
            raise ValueError(f"evaluate names variants {absent} that train: does not define ({sorted(self.train)})")
        return self


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Read and validate a params file; raise ConfigError naming the file, key and fix."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{path} not found. Run the command from the project root (where params.yaml is), "
            "or pass --params PATH."
        ) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}. Fix the syntax and rerun.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a YAML mapping of sections (data:, demo:, ...).")
    try:
        params = Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(path, err)) from None
    check_weights_file(params.model.weights, path.parent)
    return params


def check_weights_file(weights: str, project: Path, must_exist: bool = False) -> None:
    """A local ``model.weights`` that exists must be a file torch.save wrote (a zip holding
    ``data.pkl``, or the legacy pickle); checked in milliseconds, without torch, so a wrong file
    fails every stage before it does work. A missing file may still be made by the pretrain
    stage, so only ``must_exist`` (the train stage of a pretrained variant) refuses it."""
    path = project / weights
    if weights in ("imagenet", "none"):
        return
    if not path.is_file():
        if must_exist:
            raise ConfigError(f"model.weights file {path} does not exist. Fix the path in params.yaml, or use "
                              "imagenet or none (or run the pretrain stage first if it makes this file).")
        return
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"\x80"):
        return
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(name.endswith("data.pkl") for name in archive.namelist()):
                return
    raise ConfigError(f"model.weights: {path} is not a PyTorch state_dict file (not a file torch.save wrote). "
                      "Save one with torch.save(model.state_dict(), path), or set model.weights to imagenet or "
                      "none in params.yaml.")


def _describe(path: Path, err: ValidationError) -> str:
    """One line per invalid key: where it is, what is wrong (a key that takes a number or
    ``auto`` says both in one line)."""
    problems: dict[str, list[str]] = {}
    for problem in err.errors():
        # pydantic names the branch of a union (``constrained-int``, ``literal['auto']``) as a part of the key
        key = ".".join(str(part) for part in problem["loc"] if not _UNION_BRANCH.fullmatch(str(part)))
        if problem["type"] == "extra_forbidden":
            problems.setdefault(key, []).append("unknown key (a typo? remove it or fix its name)")
        elif problem["type"] == "missing":
            problems.setdefault(key, []).append("missing (params.yaml must set it)")
        elif isinstance(problem.get("input"), dict):  # a whole section's check: its message says it all
            problems.setdefault(key, []).append(problem["msg"].removeprefix("Value error, "))
        else:
            problems.setdefault(key, []).append(f"{problem['msg']} (got {problem.get('input')!r})")
    lines = [f"  {key}: {' | or: '.join(dict.fromkeys(found))}" for key, found in problems.items()]
    return f"{path} has invalid settings; fix these keys and rerun:\n" + "\n".join(lines)
