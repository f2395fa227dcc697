"""Validation split, study subsets, best-epoch selection and early stopping."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import REPO
from torch import nn
from train.test_training import fit_tiny, make_project

from finetune.core.config import load_params
from finetune.demo.workspace import write_params
from finetune.core.errors import ConfigError
from finetune.train.callbacks import EpochStats
from finetune.train.checkpoints import load_checkpoint
from finetune.train.selection import Selection
from finetune.train.subsets import nested_subset, split_validation

LABELS = [0] * 30 + [1] * 50 + [2] * 20  # interleaved below, so order cannot stand in for class
MIXED = [LABELS[(7 * i) % len(LABELS)] for i in range(len(LABELS))]
CLASSES = ["a", "b", "c"]


@pytest.mark.parametrize(("fraction", "seed"), [(0.1, 0), (0.2, 3), (0.5, 1)])
def test_validation_split_is_stratified_disjoint_and_fixed_by_seed(fraction, seed):
    train, val = split_validation(MIXED, fraction, seed, CLASSES, "train.x.val_fraction")
    assert not set(train) & set(val) and sorted(train + val) == list(range(len(MIXED)))
    held, total = Counter(MIXED[i] for i in val), Counter(MIXED)
    assert all(held[c] == round(fraction * total[c]) for c in total)
    assert split_validation(MIXED, fraction, seed, CLASSES, "k") == (train, val)
    assert split_validation(MIXED, fraction, seed + 1, CLASSES, "k")[1] != val


def test_no_validation_split_keeps_every_train_image():
    assert split_validation(MIXED, 0, 0, CLASSES, "k") == (list(range(len(MIXED))), [])


@pytest.mark.parametrize(("labels", "fraction", "short"), [([0] * 10 + [1] * 40, 0.1, "'a' (10 train images) is 1"),
                                                          ([0] * 2 + [1] * 40, 0.9, "'a' (2 train images) is 2")])
def test_a_split_that_starves_a_class_names_the_key_and_the_class(labels, fraction, short):
    with pytest.raises(ConfigError, match="train.finetune.val_fraction") as err:
        split_validation(labels, fraction, 0, ["a", "b"], "train.finetune.val_fraction")
    assert short in str(err.value)


def test_study_subsets_are_nested_stratified_and_inside_the_train_part():
    train, val = split_validation(MIXED, 0.1, 0, CLASSES, "k")
    subsets = [nested_subset(MIXED, train, f, seed=4) for f in (0.1, 0.25, 0.5, 1.0)]
    for small, large in zip(subsets, subsets[1:], strict=False):
        assert set(small) < set(large)
    assert subsets[-1] == train and not set(subsets[0]) & set(val)
    assert Counter(MIXED[i] for i in subsets[1]) == {0: 7, 1: 12, 2: 5}  # ceil(0.25 x 27, 45, 18)
    assert nested_subset(MIXED, train, 0.25, seed=5) != subsets[1]


def stats(epoch: int, val_acc: float, val_loss: float = 1.0) -> EpochStats:
    return EpochStats(epoch, 1.0, 0.5, 10.0, 1.0, val_loss=val_loss, val_acc=val_acc)


def scripted(selection: Selection, accuracies: list[float]) -> tuple[nn.Linear, list[int]]:
    """Feed epochs whose weights are all ``epoch``; the epochs that ran before a stop."""
    model, ran = nn.Linear(2, 1), []
    for epoch, acc in enumerate(accuracies, 1):
        if selection.stopped_at is not None:
            break
        nn.init.constant_(model.weight, epoch)
        selection.update(stats(epoch, acc), model)
        ran.append(epoch)
    return model, ran


def test_select_best_restores_the_weights_of_the_best_epoch():
    selection = Selection("val_acc", keep_best=True, patience=None, min_delta=0.0)
    model, ran = scripted(selection, [0.5, 0.8, 0.6, 0.8, 0.7])
    selection.restore(model)
    # epochs 2 and 4 tie on accuracy and loss: the later one, which trained more, is kept
    assert ran == [1, 2, 3, 4, 5] and selection.selected_epoch(stats(5, 0.7)) == 4
    assert torch.equal(model.weight, torch.full((1, 2), 4.0))


def test_a_tie_on_accuracy_goes_to_the_lower_validation_loss_never_to_a_failed_epoch():
    selection = Selection("val_acc", keep_best=True, patience=None, min_delta=0.0)
    for epoch, (acc, loss) in enumerate([(0.5, 0.60), (0.5, 0.69), (0.5, 0.65)], 1):
        selection.update(stats(epoch, acc, loss), nn.Linear(2, 1))
    assert selection.best_epoch == 1  # the first epoch wins only by its lower loss
    collapsed = stats(4, 0.9, 0.1)
    collapsed.failure = "collapsed"
    selection.update(collapsed, nn.Linear(2, 1))
    assert selection.best_epoch == 1 and selection.stale == 3
    only_failed = Selection("val_acc", keep_best=True, patience=None, min_delta=0.0)
    only_failed.update(collapsed, nn.Linear(2, 1))
    assert only_failed.selected_epoch(collapsed) is None


def test_select_last_keeps_the_last_weights_and_val_loss_points_down():
    last = Selection("val_acc", keep_best=False, patience=None, min_delta=0.0)
    model, _ = scripted(last, [0.9, 0.1])
    last.restore(model)
    assert last.selected_epoch(stats(2, 0.1)) == 2 and torch.equal(model.weight, torch.full((1, 2), 2.0))
    by_loss = Selection("val_loss", keep_best=True, patience=None, min_delta=0.0)
    for epoch, loss in enumerate([0.9, 0.4, 0.6], 1):
        by_loss.update(stats(epoch, 0.5, loss), nn.Linear(2, 1))
    assert by_loss.best_epoch == 2


@pytest.mark.parametrize(("accuracies", "patience", "min_delta", "stopped"), [
    ([0.5, 0.6, 0.6, 0.59, 0.7], 2, 0.0, 4),  # epochs 3 and 4 bring nothing
    ([0.5, 0.6, 0.6, 0.61, 0.62, 0.63], 2, 0.02, 4),  # gains below min_delta count as none
    ([0.5, 0.6, 0.7, 0.8], 1, 0.0, None),  # always improving: never stops
])
def test_early_stopping_stops_at_the_right_epoch(accuracies, patience, min_delta, stopped):
    selection = Selection("val_acc", keep_best=True, patience=patience, min_delta=min_delta)
    _, ran = scripted(selection, accuracies)
    assert selection.stopped_at == stopped and ran[-1] == (stopped or len(accuracies))


def test_selection_state_survives_a_checkpoint_round_trip():
    selection = Selection("val_acc", keep_best=True, patience=3, min_delta=0.0)
    scripted(selection, [0.4, 0.7, 0.6])
    again = Selection("val_acc", keep_best=True, patience=3, min_delta=0.0)
    again.load_state_dict(selection.state_dict())
    model, _ = scripted(again, [])
    again.restore(model)
    assert (again.best_epoch, again.stale) == (2, 1) and torch.equal(model.weight, torch.full((1, 2), 2.0))


@pytest.mark.parametrize(("changes", "message"), [
    ({"val_fraction": 0}, "select: best and early_stopping watch a validation split"),
    ({"val_fraction": 1.0}, "val_fraction"),
    ({"early_stopping": {"patience": 0, "min_delta": 0}}, "early_stopping.patience"),
])
def test_selection_settings_are_checked(tmp_path, changes, message):
    write_params(REPO / "params.yaml", tmp_path / "params.yaml", {f"train.scratch.{k}": v for k, v in changes.items()})
    with pytest.raises(ConfigError, match=message):
        load_params(tmp_path / "params.yaml")


@pytest.mark.slow
def test_fit_stops_early_keeps_the_best_epoch_and_a_resume_trains_no_further(tmp_path):
    project = make_project(tmp_path / "p")
    model, run = fit_tiny(project, epochs=4, early_stopping={"patience": 1, "min_delta": 1.0})
    fitted = run()  # no epoch can gain a whole 1.0 of accuracy: stop after epoch 2
    assert [s.epoch for s in fitted.history] == [1, 2] and fitted.stopped_at == 2
    assert fitted.selected.epoch in (1, 2) and fitted.selected.val_acc is not None
    state = load_checkpoint(project / "models" / "t", "t")
    assert state["selection"]["stopped_at"] == 2 and state["selection"]["best_weights"] is not None
    model2, run2 = fit_tiny(project, epochs=4, early_stopping={"patience": 1, "min_delta": 1.0})
    resumed = run2(checkpoint=state)
    assert [s.epoch for s in resumed.history] == [1, 2] and resumed.selected.epoch == fitted.selected.epoch
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values(),
                                                 strict=True))
