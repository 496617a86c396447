"""The rendered chart against the two checkers CI runs (both built by hack/build-tools):

- kubeconform -strict, with schemas made here and offline: the built-in kinds' from the local API
  server's OpenAPI (kubeconform's default schemas are on the internet), ours from crds/. Strict: a
  field the API does not know is an error, as with the API server's strict field validation.
- kube-score, with no CRITICAL finding. One check is ignored (docs/chart.md, "Conformance"):
  container-image-pull-policy wants Always; the chart pulls IfNotPresent, for immutable version tags.

Both run over the defaults and over ci/everything-on-values.yaml (every optional object on)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from chartlib import (
    EVERYTHING_ON,
    SCHEMA_LOCATION,
    builtin_schemas,
    cached_binary,
    crd_schemas,
    documents,
    helm_template,
)
from testlib import REPO, Cluster

# No schema offline: the Prometheus Operator's CRDs are not ours (promtool checks the rule's content).
PROMETHEUS_OPERATOR_KINDS = "monitoring.coreos.com/v1/ServiceMonitor,monitoring.coreos.com/v1/PrometheusRule"
KUBE_SCORE_IGNORED = ["container-image-pull-policy"]
RENDERS = {"defaults": [], "everything-on": ["-f", str(EVERYTHING_ON)]}


@pytest.fixture(scope="module")
def schema_dir(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    into = tmp_path_factory.mktemp("kubeconform-schemas")
    openapi = json.loads(cluster.kubectl("get", "--raw", "/openapi/v2", timeout=120).stdout)
    builtin = builtin_schemas(openapi, into, skip_groups={"sandbox.dev"})
    crds = [yaml.safe_load(path.read_text()) for path in sorted((REPO / "crds").glob("*.yaml"))]
    ours = crd_schemas(crds, openapi, into)
    assert {"deployment-apps-v1.json", "networkpolicy-networking-v1.json", "service-v1.json"} <= set(builtin)
    assert sorted(ours) == [
        "sandbox-sandbox-v1alpha1.json",
        "sandboxpool-sandbox-v1alpha1.json",
        "sandboxtemplate-sandbox-v1alpha1.json",
    ]
    return into


def kubeconform(schemas: Path, manifest: str) -> tuple[int, list[dict[str, Any]]]:
    result = subprocess.run(
        [
            cached_binary("kubeconform"),
            "-strict",
            "-verbose",
            "-output",
            "json",
            "-schema-location",
            str(schemas / SCHEMA_LOCATION),
            "-skip",
            PROMETHEUS_OPERATOR_KINDS,
            "-",
        ],
        input=manifest,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)["resources"]


@pytest.mark.parametrize("values", RENDERS.values(), ids=RENDERS.keys())
def test_chart_passes_kubeconform_strict(schema_dir: Path, values: list[str]) -> None:
    manifest = helm_template("--include-crds", *values).stdout
    code, resources = kubeconform(schema_dir, manifest)
    problems = [resource for resource in resources if resource["status"] not in ("statusValid", "statusSkipped")]
    assert code == 0 and not problems, json.dumps(problems, indent=2)
    checked = sorted(f"{r['kind']}/{r['name']}" for r in resources if r["status"] == "statusValid")
    expected = sorted(
        f"{doc['kind']}/{doc['metadata']['name']}"
        for doc in documents(manifest)
        if doc["kind"] not in ("ServiceMonitor", "PrometheusRule")
    )
    # Every document was validated against a schema (none skipped for want of one).
    assert checked == expected
    kinds = {name.split("/")[0] for name in checked}
    assert {
        "CustomResourceDefinition",
        "Deployment",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "SandboxTemplate",
    } <= kinds


def test_kubeconform_schemas_refuse_unknown_and_wrong_fields(schema_dir: Path) -> None:
    """The negative control: the generated schemas are strict, and ours are the CRDs'."""
    docs = documents(helm_template().stdout)
    (deployment,) = [doc for doc in docs if doc["kind"] == "Deployment" and "gateway" in doc["metadata"]["name"]]
    deployment["spec"]["replica"] = 2  # a typo of replicas
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    (template,) = [doc for doc in docs if doc["kind"] == "SandboxTemplate" and doc["metadata"]["name"] == "base"]
    template["spec"]["imagee"] = "typo"
    manifest = yaml.safe_dump_all([deployment, template])
    code, resources = kubeconform(schema_dir, manifest)
    assert code != 0
    # msg: the whole error (validationErrors holds only the top level of a $ref'd root's causes).
    errors = {r["kind"]: r["msg"] for r in resources}
    assert (
        "replica" in errors["Deployment"]
        and "/spec/template/spec/containers/0/ports/0/containerPort" in errors["Deployment"]
    ), errors
    assert "imagee" in errors["SandboxTemplate"], errors


@pytest.mark.parametrize("values", RENDERS.values(), ids=RENDERS.keys())
def test_chart_has_no_critical_kube_score_finding(values: list[str]) -> None:
    manifest = helm_template(*values).stdout
    ignored = [arg for check in KUBE_SCORE_IGNORED for arg in ("--ignore-test", check)]
    result = subprocess.run(
        [cached_binary("kube-score"), "score", "--output-format", "ci", *ignored, "-"],
        input=manifest,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = result.stdout.splitlines()
    assert any(line.startswith("[OK]") for line in lines), result.stdout + result.stderr
    critical = [line for line in lines if line.startswith("[CRITICAL]")]
    assert not critical and result.returncode == 0, "\n".join(critical) or result.stderr
    # No warning either: two operator replicas (leader election) and two gateways, rolled one by one.
    warnings = [line for line in lines if line.startswith("[WARNING]")]
    assert not warnings, "\n".join(warnings)
