"""A sandbox without its template (lifecycle.template): which sandboxes may keep a deleted template's
last version, and what a waiting sandbox reports."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from sandbox_operator.api.names import Reason
from sandbox_operator.lifecycle import EventType
from sandbox_operator.lifecycle.template import has_started, template_missing

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    ("status", "started"),
    [
        ({}, False),
        ({"phase": "Creating"}, False),
        ({"phase": "Creating", "startedAt": "2026-01-01T00:00:00Z"}, True),  # an Error retry
        ({"phase": "Running"}, True),
        ({"phase": "Suspended"}, True),  # created suspended: never ran, still past Creating
        ({"phase": "Error"}, True),
    ],
)
def test_has_started(status: dict[str, str], started: bool) -> None:
    assert has_started(status) is started


def test_a_new_sandbox_reports_the_missing_template() -> None:
    report = template_missing("python", {}, 3, NOW)
    assert report is not None
    message = 'SandboxTemplate "python" not found; waiting for it to be created'
    assert report.status["phase"] == "Creating"
    assert (report.status["reason"], report.status["message"]) == ("TemplateNotFound", message)
    assert report.status["observedGeneration"] == 3
    conditions = {c["type"]: c for c in report.status["conditions"]}
    assert {kind: (c["status"], c["reason"]) for kind, c in conditions.items()} == {
        "Ready": ("False", "TemplateNotFound"),
        "Reconciling": ("False", "TemplateNotFound"),
        "Stalled": ("True", "TemplateNotFound"),  # kstatus: Failed, so waits stop at once
    }
    assert {c["lastTransitionTime"] for c in conditions.values()} == {"2026-01-01T12:00:00Z"}
    assert {c["observedGeneration"] for c in conditions.values()} == {3}
    assert (report.event.type, report.event.reason, report.event.message) == (
        EventType.WARNING,
        Reason.TEMPLATE_NOT_FOUND,
        message,
    )


def test_the_phase_it_was_in_is_kept() -> None:
    report = template_missing("python", {"phase": "Running", "reason": "Started"}, 1, NOW)
    assert report is not None and report.status["phase"] == "Running"


def test_nothing_to_write_once_reported() -> None:
    first = template_missing("python", {}, 1, NOW)
    assert first is not None
    assert template_missing("python", first.status, 1, NOW) is None
    # Another template name is another message: reported again.
    assert template_missing("ruby", first.status, 1, NOW) is not None


def test_a_terminated_sandbox_keeps_its_final_reason() -> None:
    assert template_missing("python", {"phase": "Terminated", "reason": "MaxLifetime"}, 1, NOW) is None


def test_the_conditions_it_had_are_kept_and_restated() -> None:
    suspended = {"type": "Suspended", "status": "True", "reason": "SuspendRequested", "message": "m"}
    ready = {"type": "Ready", "status": "False", "reason": "Suspended", "lastTransitionTime": "2025-01-01T00:00:00Z"}
    report = template_missing("python", {"phase": "Suspended", "conditions": [ready, suspended]}, 2, NOW)
    assert report is not None
    conditions = {c["type"]: c for c in report.status["conditions"]}
    assert conditions["Suspended"] == suspended
    assert conditions["Ready"]["lastTransitionTime"] == "2025-01-01T00:00:00Z"  # False before and after
    assert conditions["Stalled"]["status"] == "True"


def test_a_report_without_stalled_or_of_an_older_generation_is_written_again() -> None:
    first = template_missing("python", {}, 1, NOW)
    assert first is not None
    older = {**first.status, "conditions": [c for c in first.status["conditions"] if c["type"] != "Stalled"]}
    assert template_missing("python", older, 1, NOW) is not None
    assert template_missing("python", first.status, 2, NOW) is not None
