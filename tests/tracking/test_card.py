"""The model card's parts that need no registry: what differs from train_defaults, and the
judgment lines the gate adds (replaced, never piled up)."""

from __future__ import annotations

from conftest import REPO

from finetune.core.config import load_params
from finetune.demo.workspace import write_params
from finetune.tracking.card import changed_settings, with_judgment
from finetune.evaluate.report import study_verdict

CARD = "**finetune** from run `abc` · data `h.dir` (DVC hash of data/hotdog) · commit `c0ffee`\n\nChosen: because."


def test_the_card_lists_only_what_the_variant_changes_and_the_chosen_lr():
    params = load_params(REPO / "params.yaml")
    changed = changed_settings(params, "finetune", {"lr": 1.5e-4})
    assert changed["init"] == "pretrained" and changed["lr"] == 1.5e-4
    assert "epochs" not in changed and "batch_size" not in changed  # the defaults, not repeated
    assert "init" not in changed_settings(params, "scratch", {})  # scratch is train_defaults' own init


def test_each_decision_replaces_the_last_and_the_study_line_sits_before_it():
    first = with_judgment(CARD, "promoted 2026-12-07: production none → v1: no production version yet", None)
    assert first == CARD + "\n\n**Gate:** promoted 2026-12-07: production none → v1: no production version yet"
    second = with_judgment(first, "refused 2026-12-08: production v2 → v2: gain too small", "fine-tuning wins.")
    assert second == CARD + "\n\n**Study:** fine-tuning wins.\n\n**Gate:** refused 2026-12-08: production v2 → v2: gain too small"
    assert with_judgment(second, "promoted later", None) == CARD + "\n\n**Gate:** promoted later"


def test_no_study_line_unless_a_study_ran(tmp_path):
    write_params(REPO / "params.yaml", tmp_path / "params.yaml", {})
    params = load_params(tmp_path / "params.yaml")
    assert not params.study.enabled and study_verdict(params, tmp_path) is None
    write_params(REPO / "params.yaml", tmp_path / "params.yaml", {"study.enabled": True})
    enabled = load_params(tmp_path / "params.yaml")
    assert study_verdict(enabled, tmp_path) is None  # no study ran yet
    summary = tmp_path / enabled.study.plots / "summary.json"  # what the study_report stage writes
    summary.parent.mkdir(parents=True)
    summary.write_text('{"verdict": "fine-tuning wins at every size.", "rows": []}')
    assert study_verdict(enabled, tmp_path) == "fine-tuning wins at every size."
    assert study_verdict(params, tmp_path) is None  # study.enabled: false, whatever a past run left
