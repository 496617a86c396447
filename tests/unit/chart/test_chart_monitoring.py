"""The chart's monitoring objects (monitoring.prometheusRule, monitoring.dashboard), without a cluster:
promtool accepts the rendered alert rules, the dashboard is valid Grafana JSON, and every metric the
rules and the dashboard query is one docs/metrics.md documents (a renamed metric breaks this test,
not a production alert that silently never fires). Off by default: nothing renders without them.
`promtool test rules` runs the unit tests of tests/promtool/ (a case that fires and one that does not
for every alert) on the rendered rules; a deliberately wrong expectation shows the harness fails."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from chartlib import EVERYTHING_ON, cached_binary, documents, helm_template
from testlib import REPO

HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
PROMTOOL_TESTS = REPO / "tests" / "promtool"
# rules.yaml: the rendered rules, when someone runs promtool by hand (docs/metrics.md).
PROMTOOL_TEST_FILES = sorted(path for path in PROMTOOL_TESTS.glob("*.yaml") if path.name != "rules.yaml")


def monitoring_objects(*values: str) -> list[dict[str, Any]]:
    rendered = documents(helm_template(*values).stdout)
    return [
        d for d in rendered if d["kind"] == "PrometheusRule" or "grafana_dashboard" in d["metadata"].get("labels", {})
    ]


def documented_metrics() -> set[str]:
    text = (REPO / "docs" / "metrics.md").read_text()
    return set(re.findall(r"sandbox_(?:operator|gateway)_[a-z_]+", text))


def queried_metrics(text: str) -> set[str]:
    names = set(re.findall(r"sandbox_(?:operator|gateway)_[a-z_]+", text))
    return {_base(name) for name in names}


def _base(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def _documented(name: str, documented: set[str]) -> bool:
    # A counter is documented with or without its exposition suffix `_total`.
    return name in documented or name.removesuffix("_total") in documented or f"{name}_total" in documented


def test_monitoring_is_off_by_default() -> None:
    assert monitoring_objects() == []


def test_promtool_accepts_the_alert_rules(tmp_path: Path) -> None:
    (rule,) = [d for d in monitoring_objects("-f", str(EVERYTHING_ON)) if d["kind"] == "PrometheusRule"]
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    checked = subprocess.run(
        [cached_binary("promtool"), "check", "rules", str(rules)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout
    alerts = [r["alert"] for group in rule["spec"]["groups"] for r in group["rules"] if "alert" in r]
    assert alerts and all(
        r.get("annotations", {}).get("description") for g in rule["spec"]["groups"] for r in g["rules"]
    )


def test_rules_and_dashboard_query_only_documented_metrics() -> None:
    documented = documented_metrics()
    objects = monitoring_objects("-f", str(EVERYTHING_ON))
    assert {d["kind"] for d in objects} == {"PrometheusRule", "ConfigMap"}
    (dashboard,) = [d for d in objects if d["kind"] == "ConfigMap"]
    (board,) = (json.loads(text) for text in dashboard["data"].values())
    assert board["panels"], "the dashboard has panels"
    queried = queried_metrics(yaml.safe_dump([d.get("spec") or d.get("data") for d in objects]))
    assert queried, "the rules and the dashboard query our metrics"
    undocumented = sorted(name for name in queried if not _documented(name, documented))
    assert undocumented == [], f"queried but not in docs/metrics.md: {undocumented}"


# --- promtool test rules over tests/promtool ------------------------------------------------------
# Each file there names `rule_files: [rules.yaml]`, a file next to it: the rendered PrometheusRule's
# spec.groups (at EVERYTHING_ON, i.e. the chart's default thresholds and durations).


@pytest.fixture(scope="module")
def rendered_rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    (rule,) = [d for d in monitoring_objects("-f", str(EVERYTHING_ON)) if d["kind"] == "PrometheusRule"]
    rules: Path = tmp_path_factory.mktemp("promtool") / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    return rules


def promtool_test(rules: Path, into: Path, suites: dict[str, dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    """`promtool test rules` of test files (name: content) written into `into`, their rule_files
    pointed at the rendered rules."""
    files = []
    for name, suite in suites.items():
        assert suite["rule_files"] == ["rules.yaml"], f"{name}: rule_files must be [rules.yaml]"
        path = into / name
        path.write_text(yaml.safe_dump({**suite, "rule_files": [str(rules)]}, sort_keys=False))
        files.append(str(path))
    return subprocess.run(
        [cached_binary("promtool"), "test", "rules", *files], capture_output=True, text=True, timeout=120, check=False
    )


def load_suites() -> dict[str, dict[str, Any]]:
    return {path.name: yaml.safe_load(path.read_text()) for path in PROMTOOL_TEST_FILES}


def alert_cases(suites: dict[str, dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """alertname: (cases that expect it to fire, cases that expect it not to)."""
    cases: dict[str, tuple[int, int]] = {}
    for suite in suites.values():
        for group in suite["tests"]:
            for case in group.get("alert_rule_test", []):
                fires, quiet = cases.get(case["alertname"], (0, 0))
                cases[case["alertname"]] = (fires + 1, quiet) if case.get("exp_alerts") else (fires, quiet + 1)
    return cases


def test_promtool_unit_tests_of_the_alerts_pass(rendered_rules: Path, tmp_path: Path) -> None:
    suites = load_suites()
    assert suites, f"no promtool tests in {PROMTOOL_TESTS}"
    tested = promtool_test(rendered_rules, tmp_path, suites)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert tested.stdout.count("SUCCESS") == len(suites), tested.stdout + tested.stderr


def test_every_alert_has_a_firing_and_a_quiet_case(rendered_rules: Path) -> None:
    groups = yaml.safe_load(rendered_rules.read_text())["groups"]
    alerts = {r["alert"] for group in groups for r in group["rules"] if "alert" in r}
    assert len(alerts) == 8, sorted(alerts)
    cases = alert_cases(load_suites())
    assert set(cases) == alerts, "tests/promtool tests exactly the rendered alerts"
    untested = sorted(name for name, (fires, quiet) in cases.items() if not fires or not quiet)
    assert untested == [], f"alerts without a case that fires and one that does not: {untested}"


def test_promtool_fails_a_wrong_expectation(rendered_rules: Path, tmp_path: Path) -> None:
    """Negative control: the harness can fail. A firing SandboxCPUHigh expected as critical (it is a
    warning) and a quiet case of SandboxDiskHigh expected to fire must both be reported."""
    suites = load_suites()
    cpu, disk = suites["sandbox-cpu-high.yaml"], suites["sandbox-disk-high.yaml"]
    firing = next(c for g in cpu["tests"] for c in g["alert_rule_test"] if c["exp_alerts"])
    firing["exp_alerts"][0]["exp_labels"]["severity"] = "critical"
    quiet = next(c for g in disk["tests"] for c in g["alert_rule_test"] if not c["exp_alerts"])
    quiet["exp_alerts"] = [{"exp_labels": {"severity": "warning"}}]
    tested = promtool_test(rendered_rules, tmp_path, {"cpu.yaml": cpu, "disk.yaml": disk})
    output = tested.stdout + tested.stderr
    assert tested.returncode != 0, output
    assert output.count("FAILED") == 2, output
    assert "alertname: SandboxCPUHigh" in output and "alertname: SandboxDiskHigh" in output, output
    assert 'severity="critical"' in output, output


@pytest.mark.parametrize("name", [path.name for path in PROMTOOL_TEST_FILES])
def test_each_firing_expectation_is_needed(rendered_rules: Path, tmp_path: Path, name: str) -> None:
    """Expecting no alert where a file's cases expect one fails: each firing case really fires."""
    suite = load_suites()[name]
    for group in suite["tests"]:
        for case in group.get("alert_rule_test", []):
            case["exp_alerts"] = []
    tested = promtool_test(rendered_rules, tmp_path, {name: suite})
    assert tested.returncode != 0, tested.stdout + tested.stderr
    assert "FAILED" in tested.stdout + tested.stderr
