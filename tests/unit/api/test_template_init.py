"""No shipped template starts the sandbox without an init (docs/agent.md, "Running as a container").

A pod's `command` replaces the image's ENTRYPOINT (`tini -- sandbox-agent`). PID 1 must reap the
orphans user commands leave, or their zombies use up the pids limit. Allowed: no command (the image's
tini), a command that starts with tini, or `sandbox-agent` itself, which acts as its own init at PID 1.
Anything else (`bash -c ...`, `python -m ...`) would leave an unreaping PID 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "examples"
CHART_VALUES = REPO / "charts" / "sandbox-operator" / "values.yaml"
INIT_COMMANDS = frozenset({"tini", "tini-static", "sandbox-agent"})


def keeps_an_init(command: list[str] | None) -> bool:
    return not command or Path(command[0]).name in INIT_COMMANDS


def shipped_templates() -> list[tuple[str, dict[str, Any]]]:
    """(where, template spec) for every example SandboxTemplate and every chart `templates` value."""
    found: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and document.get("kind") == "SandboxTemplate":
                found.append((f"{path.name}:{document['metadata']['name']}", document["spec"]))
    values = yaml.safe_load(CHART_VALUES.read_text())
    for name, spec in (values.get("templates") or {}).items():
        found.append((f"values.yaml:templates.{name}", spec))
    return found


def test_the_rule() -> None:
    assert keeps_an_init(None)
    assert keeps_an_init([])
    assert keeps_an_init(["/usr/bin/tini", "--", "sandbox-agent"])
    assert keeps_an_init(["sandbox-agent"])
    assert keeps_an_init(["/usr/local/bin/sandbox-agent", "--prewarm-kernel"])
    assert not keeps_an_init(["bash", "-c", "sandbox-agent"])
    assert not keeps_an_init(["python", "-m", "sandbox_operator.agent"])


def test_templates_are_found() -> None:
    names = [where for where, _ in shipped_templates()]
    assert "sandboxtemplate-code-interpreter.yaml:code-interpreter" in names
    assert "values.yaml:templates.base" in names


@pytest.mark.parametrize(("where", "spec"), [pytest.param(w, s, id=w) for w, s in shipped_templates()])
def test_no_shipped_template_bypasses_an_init(where: str, spec: dict[str, Any]) -> None:
    assert keeps_an_init(spec.get("command")), f"{where}: command {spec.get('command')} bypasses an init"


def test_the_code_interpreter_example_keeps_the_images_tini() -> None:
    # The image's ENTRYPOINT is `tini -- sandbox-agent`; the example used to replace it.
    spec = dict(shipped_templates())["sandboxtemplate-code-interpreter.yaml:code-interpreter"]
    assert "command" not in spec
