"""The model card: the registered version's description (Markdown, as the MLflow UI shows it
on the version's page). What the version is and how it was judged, in a reviewer's order:
where it came from (variant, run, data version, commit), its settings that differ from
``train_defaults``, validation and test accuracy with their uncertainty, why it was chosen, and
then, added by the gate, the study's verdict (when a study ran) and the gate's decision.
"""

from __future__ import annotations

from finetune.core.config import Params
from finetune.evaluate.metrics import uncertainty_words, validation_uncertainty

DECISION_HEADING = "**Gate:**"  # the card's last line, replaced at each decision on the version


def changed_settings(params: Params, variant: str, info: dict) -> dict:
    """The variant's training settings that differ from train_defaults (the lr its search chose
    included), as ``{key: value}``."""
    defaults, mine = params.train_defaults.model_dump(), params.train[variant].model_dump()
    changed = {k: v for k, v in mine.items() if v != defaults.get(k)}
    if info.get("lr") is not None and info["lr"] != mine.get("lr"):
        changed["lr"] = info["lr"]  # chosen on validation by search@<variant>
    return changed


def model_card(params: Params, tags: dict, info: dict, test: dict, reason: str) -> str:
    """The card of a new version: ``tags`` its version tags (variant, run_id, data_version,
    git_commit), ``info`` model.pt's info (validation scores), ``test`` the variant's entry of
    the evaluate metrics, ``reason`` why register chose it."""
    variant = tags["variant"]
    settings = ", ".join(f"`{k}: {v}`" for k, v in changed_settings(params, variant, info).items()) or "none"
    lines = [f"**{variant}** from run `{tags['run_id']}` · data `{tags['data_version']}` (DVC hash of "
             f"{params.data.dir}) · commit `{tags['git_commit']}`", "",
             f"Settings that differ from train_defaults: {settings}", "",
             "| accuracy | value |", "|---|---|"]
    if info.get("val_acc") is not None:
        lines.append(f"| validation | {uncertainty_words(float(info['val_acc']), validation_uncertainty(info))} |")
    if "accuracy" in test:
        interval = (f" (95% interval {test['accuracy_ci95_low']:.4f}–{test['accuracy_ci95_high']:.4f})"
                    if "accuracy_ci95_low" in test else "")
        lines.append(f"| test | {test['accuracy']:.4f}{interval} |")
    lines += ["", f"Chosen: {reason}."]
    return "\n".join(lines)


def with_judgment(card: str, decision: str, study: str | None) -> str:
    """``card`` with the study's verdict (when one ran) and ``decision`` (the gate's latest on
    this version) as its last lines, replacing the ones an earlier decision wrote."""
    kept = card.split(f"\n\n{DECISION_HEADING}")[0].split("\n\n**Study:**")[0]
    study_line = f"\n\n**Study:** {study}" if study else ""
    return f"{kept}{study_line}\n\n{DECISION_HEADING} {decision}".lstrip("\n")  # lstrip: a version without a card
