"""The chart's monitoring objects (monitoring.prometheusRule, monitoring.dashboard), without a cluster:
promtool accepts the rendered alert rules, the dashboard is valid Grafana JSON, and every metric the
rules and the dashboard query is one docs/metrics.md documents (a renamed metric breaks this test,
not a production alert that silently never fires). Off by default: nothing renders without them."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from chartlib import EVERYTHING_ON, cached_binary, documents, helm_template
from testlib import REPO

HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


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
