"""compile: auto compiles only when the planned work repays the compile; compiled graphs go to a
persistent inductor cache in the project's cache folder, marked warm once compiled."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from test_training import fit_tiny, make_project

from finetune.core.config import load_params
from finetune.evaluate.scoring import inference_network
from finetune.train.compiling import (
    INFERENCE_SHARE,
    break_even,
    compile_decision,
    compile_key,
    is_warm,
    mark_after_first_step,
    planned_images,
    should_compile,
    use_persistent_cache,
)
from finetune.train.distributed import SINGLE
from finetune.train.loaders import loaders
from finetune.train.loop import training_network
from finetune.train.runtime import Runtime, resolve_runtime

HOTDOG = 1_800 * 5  # the hot-dog train split less validation, the recipe's 5 epochs
IMAGENET = 1_281_167 * 5


@pytest.mark.parametrize(("images", "device", "warm", "compiles"), [
    (HOTDOG, "cuda", False, False),  # a hot-dog-sized training never repays a compile
    (HOTDOG, "cuda", True, False),  # not even from a warm cache
    (IMAGENET, "cuda", False, True),  # ImageNet for 5 epochs does
    (500_000, "cuda", False, False),  # between the break-evens: a cold compile does not pay ...
    (500_000, "cuda", True, True),  # ... a warm one does
    (IMAGENET, "cpu", False, False),  # auto leaves CPUs alone
    (IMAGENET, "mps", True, False),
])
def test_auto_compiles_when_the_planned_images_repay_it(images, device, warm, compiles):
    decided, reason = should_compile(images, device, warm)
    assert decided is compiles
    assert (f"{images:,}" in reason) if device == "cuda" else (device in reason)


def test_the_break_even_follows_the_measured_numbers_and_a_warm_cache_lowers_it():
    """The module's documented rule: compiling saves 1/12,057 - 1/15,961 s (20.3 µs) per training
    image, so a 45 s cold compile pays from 2,218,207 images (about 2.2 million), an 8 s warm one
    from 394,348, and inference (a third of a training step) needs three times as many."""
    assert break_even(warm=False) == 2_218_207
    assert break_even(warm=True) == 394_348
    assert break_even(warm=False, share=INFERENCE_SHARE) == 6_654_621
    assert break_even(warm=True, share=INFERENCE_SHARE) == 1_183_044
    # The decision flips exactly there: one image fewer does not repay the compile.
    assert should_compile(2_218_207, "cuda", False)[0] and not should_compile(2_218_206, "cuda", False)[0]
    assert should_compile(394_348, "cuda", True)[0] and not should_compile(394_347, "cuda", True)[0]


def test_the_reason_gives_the_saving_the_cost_and_the_break_even():
    """The logged reason states the planned images, the seconds they save, the compile's cost and
    the break-even, in words a person can check."""
    assert should_compile(HOTDOG, "cuda", False) == (False, (
        "compile: auto: 9,000 planned images save about 0.2 s, which would not repay a cold compile of about "
        "45 s (break-even 2,218,207 images)"))
    assert should_compile(500_000, "cuda", True) == (True, (
        "compile: auto: 500,000 planned images save about 10.1 s, which repay a warm (cached) compile of about "
        "8 s (break-even 394,348 images)"))
    assert should_compile(10**8, "cuda", False, INFERENCE_SHARE) == (True, (
        "compile: auto: 100,000,000 planned images save about 676.2 s, which repay a cold compile of about "
        "45 s (break-even 6,654,621 images)"))


@pytest.mark.parametrize(("setting", "device", "images", "compiles"), [
    (True, "cpu", 1, True), (False, "cuda", IMAGENET, False), ("auto", "cpu", IMAGENET, False),
    ("auto", "cuda", IMAGENET, True), ("auto", "cuda", HOTDOG, False)])
def test_true_and_false_are_respected(setting, device, images, compiles):
    assert compile_decision(setting, images, device, warm=False)[0] is compiles


def test_planned_images_count_what_one_process_trains():
    assert planned_images(1_800, 5, 128, None) == 9_000
    assert planned_images(1_800, 5, 128, 2) == 5 * 256  # max_steps batches per epoch
    assert planned_images(1_800, 3, 128, None, world=4) == 450 * 3  # each process its share
    assert planned_images(1_800, 0, 128, None) == 0


def test_evaluation_is_under_the_same_rule():
    model = torch.nn.Linear(2, 2)
    cpu = Runtime(torch.device("cpu"), None, False)
    assert inference_network(model, 10**9, cpu) is model  # auto never compiles on a CPU
    assert not should_compile(800, "cuda", False, INFERENCE_SHARE)[0]  # a hot-dog test split on a GPU
    assert should_compile(10**8, "cuda", False, INFERENCE_SHARE)[0]


@pytest.mark.slow
def test_the_inductor_cache_lives_in_the_projects_cache_folder(tmp_path, monkeypatch):
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        monkeypatch.setenv(name, "")  # so that the test's own settings are undone after it
        monkeypatch.delenv(name)
    project = make_project(tmp_path / "p")
    model, _ = fit_tiny(project, compile=True, device="cpu", epochs=3)
    params = load_params(project / "params.yaml")
    cfg = params.train["finetune"]
    data = loaders(params, cfg, project / params.data.dir, project / params.validate_.files, pin=False,
                   project=project)
    assert data.cache_dir == project / "data" / "decoded" and data.crop == 32
    runtime = resolve_runtime(cfg)
    key = compile_key(model, 32, cfg.batch_size, runtime.dtype, runtime.channels_last)
    assert not is_warm(data.cache_dir, key)
    network = training_network(model, runtime, cfg, SINGLE, data, epoch=1)
    assert network is not model  # compiled (lazily: nothing compiles until it is called)
    folder = project / "data" / "decoded" / "inductor"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder.resolve()) and folder.is_dir()
    assert os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] == os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] == "1"
    assert use_persistent_cache(data.cache_dir) == folder.resolve()


def test_a_compile_marks_its_shape_warm_after_the_first_step(tmp_path):
    model = torch.nn.Linear(2, 2)
    key = compile_key(model, 224, 128, torch.bfloat16, True)
    assert key != compile_key(model, 224, 64, torch.bfloat16, True) != compile_key(model, 160, 128, None, True)
    model.weight.requires_grad_(False)
    assert compile_key(model, 224, 128, torch.bfloat16, True) != key  # unfreezing changes the graph
    mark_after_first_step(model, tmp_path, key)
    model(torch.zeros(1, 2))
    assert not is_warm(tmp_path, key)  # the first step's backward may still compile
    model(torch.zeros(1, 2))
    assert is_warm(tmp_path, key) and not is_warm(tmp_path, "other") and not is_warm(None, key)


@pytest.mark.slow
def test_the_decision_is_logged_with_its_reason(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = make_project(tmp_path / "p")
    _, run = fit_tiny(project, compile="auto", device="cpu", epochs=1)
    with caplog.at_level(logging.INFO, logger="finetune.train.loop"):
        run()
    lines = [r.getMessage() for r in caplog.records if "compile" in r.getMessage()]
    assert lines == ["not compiling: compile: auto does not compile on cpu (compiling costs more than it saves there)"]
