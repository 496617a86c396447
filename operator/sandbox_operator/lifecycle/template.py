"""Decisions about a Sandbox's template before decide() can run: which version of the template a
sandbox reconciles against, and what a sandbox whose template is missing reports."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sandbox_operator.api import ConditionStatus, Phase
from sandbox_operator.api.names import ConditionType, Reason
from sandbox_operator.lifecycle.status import merge_conditions
from sandbox_operator.lifecycle.types import DecidedCondition, EmitEvent, EventType

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
    it says so already, or it is Terminated (its final reason — MaxLifetime, IdleTimeout... — stays).

    Nothing can start without the template, so the sandbox is Stalled (kstatus Failed) with reason
    TemplateNotFound until the template is created; the other conditions it had are kept.
    """
    message = f'SandboxTemplate "{template}" not found; waiting for it to be created'
    previous = current.get("conditions")
    previous = previous if isinstance(previous, list) else None
    stalled = next(
        (c for c in previous or () if isinstance(c, Mapping) and c.get("type") == ConditionType.STALLED), None
    )
    if (
        current.get("reason") == Reason.TEMPLATE_NOT_FOUND
        and current.get("message") == message
        and current.get("observedGeneration") == generation
        and stalled is not None
        and stalled.get("status") == ConditionStatus.TRUE
    ):
        return None
    if current.get("phase") == Phase.TERMINATED:
        return None
    where = Reason.TEMPLATE_NOT_FOUND.value
    conditions = (
        DecidedCondition(ConditionType.READY, ConditionStatus.FALSE, where, message),
        DecidedCondition(ConditionType.RECONCILING, ConditionStatus.FALSE, where, message),
        DecidedCondition(ConditionType.STALLED, ConditionStatus.TRUE, where, message),
    )
    status = {
        "phase": current.get("phase") or Phase.CREATING.value,
        "reason": where,
        "message": message,
        "observedGeneration": generation,
        "conditions": merge_conditions(previous, conditions, now, generation),
    }
    return TemplateMissing(status, EmitEvent(EventType.WARNING, Reason.TEMPLATE_NOT_FOUND, message))
