"""Decisions about a Sandbox's template before decide() can run: which version of the template a
sandbox reconciles against, and what a sandbox whose template is missing reports."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sandbox_operator.api import Phase
from sandbox_operator.api.names import ConditionType, Reason
from sandbox_operator.lifecycle.status import format_time
from sandbox_operator.lifecycle.types import EmitEvent, EventType

__all__ = ["TemplateMissing", "has_started", "template_missing"]


def has_started(status: Mapping[str, Any]) -> bool:
    """The sandbox got past Creating once (it ran, or was created suspended). Such a sandbox keeps the
    last version of its template when the template is deleted, like one that ran; a new one needs a
    live template."""
    return status.get("startedAt") is not None or status.get("phase") not in (None, Phase.CREATING)


@dataclass(frozen=True, slots=True)
class TemplateMissing:
    """What a sandbox without a template writes: a status merge patch and a Warning Event."""

    status: dict[str, Any]
    event: EmitEvent


def template_missing(
    template: str, current: Mapping[str, Any], generation: int | None, now: datetime
) -> TemplateMissing | None:
    """The report of a sandbox whose template does not exist, or None when there is nothing to write:
    it says so already, or it is Terminated (its final reason — MaxLifetime, IdleTimeout... — stays)."""
    message = f'SandboxTemplate "{template}" not found; waiting for it to be created'
    if current.get("reason") == Reason.TEMPLATE_NOT_FOUND and current.get("message") == message:
        return None
    if current.get("phase") == Phase.TERMINATED:
        return None
    status = {
        "phase": current.get("phase") or Phase.CREATING.value,
        "reason": Reason.TEMPLATE_NOT_FOUND.value,
        "message": message,
        "observedGeneration": generation,
        "conditions": [
            {
                "type": ConditionType.READY.value,
                "status": "False",
                "reason": Reason.TEMPLATE_NOT_FOUND.value,
                "message": message,
                "lastTransitionTime": format_time(now),
                "observedGeneration": generation,
            }
        ],
    }
    return TemplateMissing(status, EmitEvent(EventType.WARNING, Reason.TEMPLATE_NOT_FOUND, message))
