"""The GitHub Actions workflows (.github/workflows, docs/release.md): actionlint (built into the cache
by hack/build-tools) accepts them and rejects a broken one, their bash run: scripts parse, and the
release workflow builds and pushes every image the chart's default values use."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from chartlib import CHART, cached_binary
from testlib import REPO

WORKFLOWS = REPO / ".github" / "workflows"
RELEASE = WORKFLOWS / "release.yml"


def actionlint(*paths: Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [cached_binary("actionlint"), "-no-color", *map(str, paths)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def workflow_files() -> list[Path]:
    return sorted(WORKFLOWS.glob("*.yml"))


def load(path: Path) -> dict[Any, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), path
    return data


def steps(workflow: dict[Any, Any]) -> list[dict[str, Any]]:
    return [step for job in workflow["jobs"].values() for step in job.get("steps", [])]


def image_repository(image: str) -> str:
    """ghcr.io/x/y:1 or ghcr.io/x/y@sha256:... -> ghcr.io/x/y (a registry's port stays)."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return name[: len(name) - len(last)] + last.split(":", 1)[0]


def test_actionlint_accepts_the_workflows() -> None:
    files = workflow_files()
    assert {path.name for path in files} >= {"ci.yml", "release.yml"}
    result = actionlint(*files)
    assert result.returncode == 0, result.stdout + result.stderr


GOOD = """\
name: check
on:
  push:
    tags: ["v*"]
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v5
      - run: echo "${{ github.ref_name }}"
"""


@pytest.mark.parametrize(
    ("broken", "expected"),
    [
        (GOOD.replace("    runs-on:", "    run-on:"), "run-on"),
        (GOOD.replace("github.ref_name", "github.no_such_property"), "no_such_property"),
        (GOOD.replace("github.ref_name", "github.ref_name ||"), "unexpected end of input"),
    ],
    ids=["unknown-job-key", "undefined-property", "invalid-expression"],
)
def test_actionlint_rejects_a_broken_workflow(tmp_path: Path, broken: str, expected: str) -> None:
    good = tmp_path / "good.yml"
    good.write_text(GOOD)
    ok = actionlint(good, cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr  # the control: only the edit below breaks it
    bad = tmp_path / "bad.yml"
    bad.write_text(broken)
    result = actionlint(bad, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert expected in result.stdout, result.stdout


def test_bash_run_scripts_parse() -> None:
    """What actionlint's shellcheck rule would catch first, when shellcheck is not installed."""
    checked = 0
    for path in workflow_files():
        workflow = load(path)
        default_shell = (workflow.get("defaults") or {}).get("run", {}).get("shell", "bash")
        for step in steps(workflow):
            if "run" not in step or "bash" not in step.get("shell", default_shell):
                continue
            result = subprocess.run(["bash", "-n"], input=step["run"], capture_output=True, text=True, timeout=30)
            assert result.returncode == 0, f"{path.name}: {step.get('name', step['run'][:40])}: {result.stderr}"
            checked += 1
    assert checked >= 5


def build_images_module() -> ModuleType:
    name = "build_images_for_workflows"
    loader = importlib.machinery.SourceFileLoader(name, str(REPO / "hack" / "build-images"))
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module


def chart_default_images() -> set[str]:
    """The repositories of every image the chart's default values use."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    repos = {values["operator"]["image"]["repository"]}
    repos.add(values["gateway"]["image"]["repository"] or values["operator"]["image"]["repository"])
    repos |= {image_repository(spec["image"]) for spec in values["templates"].values()}
    return repos


def test_release_workflow_builds_and_pushes_every_chart_image() -> None:
    workflow = load(RELEASE)
    on: dict[str, Any] = workflow["on"] if "on" in workflow else workflow[True]  # YAML 1.1: a bare `on` is true
    assert on["push"]["tags"] == ["v*"]
    assert workflow["permissions"]["packages"] == "write"

    built = {image.repo for image in build_images_module().IMAGES}
    chart = chart_default_images()
    assert chart == {
        "ghcr.io/sandbox-operator/sandbox-operator",
        "ghcr.io/sandbox-operator/sandbox-base",
        "ghcr.io/sandbox-operator/sandbox-code-interpreter",
    }
    assert chart <= built, f"the chart uses images hack/build-images does not build: {sorted(chart - built)}"

    runs = {step.get("name", ""): step.get("run", "") for step in steps(workflow)}
    # Every target: hack/build-images with no target arguments.
    assert any(re.search(r"hack/build-images\s*$", run) for run in runs.values()), runs
    loop = re.search(r"^\s*for name in ([^;\n]+); do$", runs["Push the images"], re.MULTILINE)
    assert loop, runs["Push the images"]
    pushed = set(loop.group(1).split())
    assert pushed == {repo.rsplit("/", 1)[-1] for repo in built}
    assert {repo.rsplit("/", 1)[-1] for repo in chart} <= pushed
    push_image = 'buildah push --quiet "$REGISTRY/$name:$VERSION" "docker://$REGISTRY/$name:$VERSION"'
    assert push_image in runs["Push the images"]
    push_chart = 'helm push "$RUNNER_TEMP/dist/sandbox-operator-$VERSION.tgz" "oci://$REGISTRY/charts"'
    assert push_chart in runs["Push the chart"]


def test_image_repository() -> None:
    assert image_repository("ghcr.io/x/y:1.0") == "ghcr.io/x/y"
    assert image_repository("localhost:5000/y") == "localhost:5000/y"
    assert image_repository("localhost:5000/y:2@sha256:" + "0" * 64) == "localhost:5000/y"
