"""Notifications: a JSON POST to ``notify.webhook_url`` on the events ``notify.events`` lists."""

from __future__ import annotations

import logging

import requests

from finetune.config import NotifyConfig

log = logging.getLogger(__name__)


def notify(cfg: NotifyConfig, event: str, payload: dict) -> bool:
    """POST ``{"event": event, **payload}`` if a webhook is set and wants ``event``; whether it
    was delivered. A failing webhook is logged, never raised: it must not fail the pipeline."""
    if not cfg.webhook_url or event not in cfg.events:
        return False
    try:
        response = requests.post(cfg.webhook_url, json={"event": event, **payload}, timeout=cfg.timeout_s)
        response.raise_for_status()
    except requests.RequestException as err:
        log.warning("webhook %s (%s) failed: %s", cfg.webhook_url, event, err)
        return False
    return True
