"""Notifications: every end of a run (failure, crash, cancellation, timeout) and the gate's
decisions (promotion, refusal), sent through apprise to ``notify.urls`` (Slack, Teams, e-mail,
ntfy, a JSON POST, ...) on the events ``notify.events`` lists."""

from __future__ import annotations

import logging

import apprise

from finetune.core.config import NotifyConfig

log = logging.getLogger(__name__)

# How each event shows in the services that mark a message's kind (colour, icon).
_KINDS = {"failure": apprise.NotifyType.FAILURE, "crash": apprise.NotifyType.FAILURE,
          "timeout": apprise.NotifyType.FAILURE, "cancellation": apprise.NotifyType.WARNING,
          "promotion": apprise.NotifyType.SUCCESS, "refusal": apprise.NotifyType.INFO}


def notify(cfg: NotifyConfig, event: str, payload: dict) -> bool:
    """Send ``event`` to every URL of ``cfg`` if it wants the event; whether all of them took it.
    ``payload``: ``message`` (what happened) and where (``workspace``, ``flow``, ``flow_run``).
    A failing or invalid URL is logged, never raised: it must not fail the pipeline."""
    if not cfg.urls or event not in cfg.events:
        return False
    sender = apprise.Apprise()
    for url in cfg.urls:
        service = apprise.Apprise.instantiate(url)
        if not service:
            log.warning("notify.urls: %r is not an apprise URL this apprise knows (see "
                        "https://github.com/caronc/apprise/wiki); fix it in params.yaml", redact(url))
            continue
        service.socket_connect_timeout = service.socket_read_timeout = cfg.timeout_s
        sender.add(service)
    if not len(sender):
        return False
    title = f"finetune {payload.get('flow', 'pipeline')}: {event}"
    delivered = bool(sender.notify(body=body(payload) or title, title=title, notify_type=_KINDS[event]))
    if not delivered or len(sender) < len(cfg.urls):
        log.warning("notify: %s (%s) did not reach every URL of notify.urls", title, event)
        return False
    return True


def body(payload: dict) -> str:
    """The message, then one ``name: value`` line for each other detail (the decision's keys)."""
    details = {key: value for key, value in payload.items() if key not in ("message", "decision")}
    details |= {f"decision.{key}": value for key, value in (payload.get("decision") or {}).items()}
    lines = [str(payload.get("message", ""))] + [f"{key}: {value}" for key, value in details.items()]
    return "\n".join(lines).strip()


def redact(url: str) -> str:
    """``url`` with what follows its scheme cut short: URLs carry tokens and passwords."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest[:4]}..." if sep else url[:8] + "..."
