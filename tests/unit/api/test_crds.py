"""The generated CRDs: up to date, structural, typed, and carrying the rules the issue asks for."""

from __future__ import annotations

import copy
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import V1CustomResourceDefinition
from pydantic import ValidationError

from chartlib import SCHEMA_LOCATION, cached_binary, schema_file_name, strict
from sandbox_operator.api import KINDS, Condition, Sandbox, SandboxPool, SandboxTemplate
from sandbox_operator.api.crdgen import (
    SchemaError,
    build_crd,
    build_crds,
    default_output_dirs,
    main,
    render,
    structural,
)

REPO = Path(__file__).resolve().parents[3]
# crds/ and the Helm chart's copy: both generated, both checked.
CRD_DIRS = [REPO / "crds", REPO / "charts" / "sandbox-operator" / "crds"]
GENERATED = build_crds()


def _schema(kind: type[Any]) -> dict[str, Any]:
    schema: dict[str, Any] = build_crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from _nodes(child, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from _nodes(node[key], f"{path}[*]")


def test_generator_writes_both_crd_directories() -> None:
    assert list(default_output_dirs()) == CRD_DIRS


@pytest.mark.parametrize("crd_dir", CRD_DIRS, ids=lambda path: str(path.relative_to(REPO)))
@pytest.mark.parametrize("name", sorted(GENERATED))
def test_crds_directory_matches_the_models(crd_dir: Path, name: str) -> None:
    path = crd_dir / name
    assert path.exists(), f"{path} missing: run python -m sandbox_operator.api.crdgen"
    assert path.read_text() == render(GENERATED[name]), f"{path} drifted: run python -m sandbox_operator.api.crdgen"


@pytest.mark.parametrize("crd_dir", CRD_DIRS, ids=lambda path: str(path.relative_to(REPO)))
def test_no_stray_crd_files(crd_dir: Path) -> None:
    assert sorted(path.name for path in crd_dir.glob("*.yaml")) == sorted(GENERATED)


def test_check_mode_reports_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--output", str(tmp_path), "--check"]) == 1
    assert main(["--output", str(tmp_path)]) == 0
    assert main(["--output", str(tmp_path), "--check"]) == 0
    (tmp_path / "sandbox.dev_sandboxes.yaml").write_text("# edited by hand\n")
    assert main(["--output", str(tmp_path), "--check"]) == 1
    assert "sandbox.dev_sandboxes.yaml is out of date" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_crd_passes_the_typed_kubernetes_model(name: str) -> None:
    # kubernetes>=37 models are pydantic with extra="forbid": unknown or mistyped keys fail here.
    crd = V1CustomResourceDefinition.model_validate(yaml.safe_load((CRD_DIRS[0] / name).read_text()))
    schema = crd.spec.versions[0].var_schema
    assert schema is not None and schema.open_apiv3_schema is not None
    assert schema.open_apiv3_schema.properties is not None
    assert schema.open_apiv3_schema.properties["spec"].type == "object"


@pytest.mark.parametrize("bad", [{"const": "x"}, {"examples": ["x"]}, {"$defs": {}}, {"exclusiveMinimum": 0}])
def test_typed_lint_catches_non_openapi_keys(bad: dict[str, Any]) -> None:
    crd = copy.deepcopy(GENERATED["sandbox.dev_sandboxes.yaml"])
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["kind"].update(bad)
    with pytest.raises(ValidationError):
        V1CustomResourceDefinition.model_validate(crd)


@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.__name__)
def test_schema_is_structural_and_described(kind: type[Any]) -> None:
    for path, node in _nodes(_schema(kind)):
        # List items and map values are described by their field; the API server forbids
        # anything on metadata but the types of name and generateName.
        if not path.endswith("[*]") and not path.startswith(".metadata"):
            assert node.get("description"), f"{path}: no description"
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path}: no type"
        for forbidden in ("$ref", "$defs", "title", "const", "examples", "uniqueItems", "nullable", "allOf"):
            assert forbidden not in node, f"{path}: {forbidden}"
        assert not isinstance(node.get("additionalProperties"), bool), f"{path}: additionalProperties bool"
        assert "default" not in node or node["default"] is not None, f"{path}: default null"
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string"), f"{path}: anyOf outside int-or-string"
        if node.get("type") == "string" and "enum" not in node and "format" not in node and path.startswith(".spec"):
            assert "maxLength" in node, f"{path}: strings need maxLength for CEL cost estimation"
        if node.get("type") == "array" and path.startswith(".spec"):
            assert "maxItems" in node, f"{path}: arrays need maxItems"
    assert "x-kubernetes-preserve-unknown-fields" not in yaml.safe_dump(_schema(kind))


def test_structural_rewrites() -> None:
    defs = {"Mode": {"enum": ["a", "b"], "title": "Mode", "type": "string"}}
    node = {
        "type": "object",
        "title": "X",
        "additionalProperties": False,
        "properties": {
            "mode": {
                "anyOf": [{"$ref": "#/$defs/Mode"}, {"type": "null"}],
                "default": None,
                "description": "m",
            },
            "fixed": {"const": "v", "description": "f"},
            "count": {"type": "integer", "exclusiveMinimum": 0, "description": "c"},
            "tags": {"type": "array", "uniqueItems": True, "items": {"type": "string"}, "description": "t"},
        },
    }
    out = structural(node, defs)
    assert out == {
        "type": "object",
        "properties": {
            "mode": {"description": "m", "type": "string", "enum": ["a", "b"]},
            "fixed": {"description": "f", "type": "string", "enum": ["v"]},
            "count": {"description": "c", "type": "integer", "minimum": 0, "exclusiveMinimum": True},
            "tags": {
                "description": "t",
                "type": "array",
                "x-kubernetes-list-type": "set",
                "items": {"type": "string"},
            },
        },
    }


def test_structural_refuses_undescribed_fields_and_unions() -> None:
    with pytest.raises(SchemaError, match="needs a description"):
        structural({"type": "object", "properties": {"x": {"type": "string"}}}, {})
    with pytest.raises(SchemaError, match="unions are not structural"):
        structural({"anyOf": [{"type": "string"}, {"type": "integer"}]}, {})


def test_structural_inlines_all_of_and_keeps_int_or_string_and_map_values() -> None:
    defs = {"Limit": {"type": "integer", "exclusiveMaximum": 10, "description": "from the def"}}
    out = structural(
        {
            "type": "object",
            "properties": {
                "limit": {"allOf": [{"$ref": "#/$defs/Limit"}], "description": "d"},
                "size": {
                    "anyOf": [{"type": "integer"}, {"type": "string", "pattern": "x"}],
                    "x-kubernetes-int-or-string": True,
                    "description": "s",
                },
                "labels": {"type": "object", "additionalProperties": {"type": "string"}, "description": "l"},
            },
        },
        defs,
    )
    assert out["properties"] == {
        "limit": {"description": "d", "type": "integer", "maximum": 10, "exclusiveMaximum": True},
        "size": {
            "description": "s",
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
        },
        "labels": {"description": "l", "type": "object", "additionalProperties": {"type": "string"}},
    }


def test_structural_refuses_untyped_nodes() -> None:
    assert structural({"enum": ["a"]}, {}) == {"type": "string", "enum": ["a"]}
    with pytest.raises(SchemaError, match="<root>: schema node has no type"):
        structural({"enum": [1, "a"]}, {})
    with pytest.raises(SchemaError, match=r"\.x: schema node has no type"):
        structural({"type": "object", "properties": {"x": {"description": "x"}}}, {})


def _rules(node: dict[str, Any]) -> list[str]:
    return [rule["message"] for rule in node.get("x-kubernetes-validations", [])]


def test_sandbox_crd_shape() -> None:
    crd = build_crd(Sandbox)
    assert crd["metadata"]["name"] == "sandboxes.sandbox.dev"
    assert crd["spec"]["scope"] == "Namespaced"
    assert crd["spec"]["names"]["shortNames"] == ["sbx"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {column["name"]: column for column in version["additionalPrinterColumns"]}
    assert list(columns)[:6] == ["Phase", "Ready", "Reason", "Template", "Age", "Expires"]
    assert columns["Ready"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Reason"]["jsonPath"] == ".status.reason"
    assert columns["Expires"]["jsonPath"] == ".status.expiresAt"
    assert columns["Pod"]["priority"] == columns["IP"]["priority"] == 1
    spec = _schema(Sandbox)["properties"]["spec"]
    assert spec["required"] == ["template"]
    assert spec["properties"]["onIdle"]["default"] == "suspend"
    assert spec["properties"]["suspended"]["default"] is False
    # egress has no default: unset follows the template's network (api.resolve_egress).
    assert spec["properties"]["network"]["default"] == {}
    assert "default" not in spec["properties"]["network"]["properties"]["egress"]
    template_network = _schema(SandboxTemplate)["properties"]["spec"]["properties"]["network"]
    assert template_network["default"] == {} and "egressAllow" in template_network["properties"]
    assert "egressAllow is only used when egress is allowList" in _rules(template_network)
    timeouts = spec["properties"]["timeouts"]
    assert "timeouts.idle must not be longer than timeouts.maxLifetime (0 means no limit)" in _rules(timeouts)
    conditions = _schema(Sandbox)["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert any("at most 63 characters" in message for message in _rules(_schema(Sandbox)))


@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.__name__)
def test_every_crd_is_in_the_sandbox_operator_category(kind: type[Any]) -> None:
    names = build_crd(kind)["spec"]["names"]
    assert names["categories"] == ["sandbox-operator"]
    # kubectl expands a category before it resolves a name: one equal to a resource name would turn
    # `kubectl get sandbox NAME` into a get of all three kinds.
    every = [crd["spec"]["names"] for crd in GENERATED.values()]
    taken = {n for other in every for n in (other["plural"], other["singular"], *other.get("shortNames", []))}
    assert not set(names["categories"]) & taken


@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.__name__)
def test_metadata_declares_nothing_and_name_rules_are_cel_on_the_object(kind: type[Any]) -> None:
    # Offline strict validators (kubeconform -strict on openapi2jsonschema output) close an object
    # to its declared properties: a declared metadata.name would refuse labels and annotations.
    root = _schema(kind)
    assert root["properties"]["metadata"] == {"type": "object"}
    for rule in root.get("x-kubernetes-validations", []):
        # The API server refuses a fieldPath the schema does not declare.
        assert "fieldPath" not in rule or not rule["fieldPath"].startswith(".metadata"), rule
    if kind is Sandbox:
        rules = {rule["rule"]: rule["message"] for rule in root["x-kubernetes-validations"]}
        assert rules["size(self.metadata.name) <= 63"].startswith("metadata.name: ")


def _kubeconform_strict(schema: dict[str, Any], body: dict[str, Any], into: Path) -> subprocess.CompletedProcess[str]:
    """kubeconform -strict over the CRD's schema as openapi2jsonschema --strict writes it (every
    object with properties closed), metadata left as the CRD declares it."""
    (into / schema_file_name("sandbox.dev/v1alpha1", "Sandbox")).write_text(
        json.dumps({"$schema": "http://json-schema.org/draft-07/schema#", **strict(schema)})
    )
    return subprocess.run(
        [cached_binary("kubeconform"), "-strict", "-summary", "-schema-location", str(into / SCHEMA_LOCATION), "-"],
        input=json.dumps(body),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_offline_strict_validator_accepts_labels_and_annotations(tmp_path: Path) -> None:
    body = yaml.safe_load((REPO / "examples" / "sandbox-full.yaml").read_text())
    body["metadata"] |= {"labels": {"team": "a"}, "annotations": {"example.com/owner": "ci"}}
    accepted = _kubeconform_strict(_schema(Sandbox), body, tmp_path)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    # The negative control: the same check on a schema that declares metadata.name refuses the labels.
    closed = copy.deepcopy(_schema(Sandbox))
    closed["properties"]["metadata"] = {"type": "object", "properties": {"name": {"type": "string"}}}
    refused = _kubeconform_strict(closed, body, tmp_path)
    assert refused.returncode != 0 and "labels" in refused.stdout, refused.stdout + refused.stderr


def _condition_schema(kind: type[Any]) -> dict[str, Any]:
    node: dict[str, Any] = _schema(kind)["properties"]["status"]["properties"]["conditions"]["items"]
    return node


@pytest.mark.parametrize("kind", [Sandbox, SandboxPool], ids=lambda kind: kind.__name__)
def test_conditions_are_as_strict_as_metav1_condition(kind: type[Any]) -> None:
    condition = _condition_schema(kind)
    fields = condition["properties"]
    assert condition["required"] == ["type", "status", "reason", "message", "lastTransitionTime"]
    assert fields["type"]["pattern"] == (
        r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
    )
    assert fields["type"]["maxLength"] == 316
    assert fields["status"]["enum"] == ["True", "False", "Unknown"]
    assert fields["reason"]["pattern"] == r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
    assert (fields["reason"]["minLength"], fields["reason"]["maxLength"]) == (1, 1024)
    assert fields["message"]["maxLength"] == 32768
    assert fields["lastTransitionTime"]["format"] == "date-time"
    assert fields["observedGeneration"]["minimum"] == 0


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"type": "ready condition"}, "type"),
        ({"type": "x" * 317}, "type"),
        ({"status": "Yes"}, "status"),
        ({"reason": "Pod Ready"}, "reason"),
        ({"reason": ""}, "reason"),
        ({"reason": None}, "reason"),
        ({"message": None}, "message"),
        ({"lastTransitionTime": None}, "lastTransitionTime"),
        ({"observedGeneration": -1}, "observedGeneration"),
    ],
)
def test_the_condition_model_refuses_what_the_schema_refuses(patch: dict[str, Any], field: str) -> None:
    good = {
        "type": "sandbox.dev/Ready",
        "status": "True",
        "reason": "Filled",
        "message": "",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }
    assert Condition.model_validate(good).type == "sandbox.dev/Ready"
    body = {key: value for key, value in {**good, **patch}.items() if value is not None}
    with pytest.raises(ValidationError) as refused:
        Condition.model_validate(body)
    assert {error["loc"][0] for error in refused.value.errors()} == {field}


def test_template_and_pool_crd_shape() -> None:
    template = build_crd(SandboxTemplate)
    assert template["spec"]["scope"] == "Cluster"
    assert "subresources" not in template["spec"]["versions"][0]
    template_spec = _schema(SandboxTemplate)["properties"]["spec"]["properties"]
    assert template_spec["persistence"]["properties"]["mountPath"]["default"] == "/home/user"
    assert template_spec["timeouts"]["properties"]["idle"]["default"] == "30m"
    pool = build_crd(SandboxPool)
    assert pool["spec"]["versions"][0]["subresources"]["scale"] == {
        "specReplicasPath": ".spec.size",
        "statusReplicasPath": ".status.ready",
        "labelSelectorPath": ".status.selector",
    }
    pool_status = _schema(SandboxPool)["properties"]["status"]["properties"]
    assert pool_status["selector"]["type"] == "string"
    size = _schema(SandboxPool)["properties"]["spec"]["properties"]["size"]
    assert (size["minimum"], size["maximum"]) == (0, 1000)
