"""Rendering the Helm chart and finding the chart checkers (helm, kube-score, kubeconform) that
hack/build-tools builds into the cache; shared by tests/unit/chart and tests/integration."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from testlib import REPO

CHART = REPO / "charts" / "sandbox-operator"
EVERYTHING_ON = CHART / "ci" / "everything-on-values.yaml"
CACHE = Path(os.environ.get("SANDBOX_OPERATOR_CACHE", Path.home() / ".cache" / "sandbox-operator"))
# A helm built from source defaults to Kubernetes v1.20 offline, below the chart's floor.
KUBE_VERSION = "1.36.3"


def cached_binary(name: str) -> str:
    """A tool from the build-tools cache (else PATH); fails with how to get it."""
    cached = CACHE / "bin" / name
    found = str(cached) if cached.exists() else shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found: run hack/build-tools (it builds {name} into the cache)")
    return found


def helm_template(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`helm template` of the chart as release sbx in sandbox-system, without a cluster."""
    result = subprocess.run(
        [
            cached_binary("helm"),
            "template",
            "sbx",
            str(CHART),
            "--namespace",
            "sandbox-system",
            "--kube-version",
            KUBE_VERSION,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"helm template {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def documents(manifest: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(manifest) if doc]


def find(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> list[dict[str, Any]]:
    """The documents of a kind (of one app.kubernetes.io/component, when given)."""
    return [
        doc
        for doc in docs
        if doc["kind"] == kind
        and (component is None or (doc["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == component)
    ]


# --- kubeconform schemas, generated offline ------------------------------------------------------
# kubeconform looks a kind's schema up as {{ .ResourceKind }}{{ .KindSuffix }}.json, e.g.
# deployment-apps-v1.json, service-v1.json, sandboxtemplate-sandbox-v1alpha1.json. Its default
# location is on the internet; these are made from the local API server's OpenAPI (built-in kinds)
# and from crds/ (ours), strict like kubeconform's own: an object that lists its properties refuses
# others, as the API server's field validation does.

JSON = dict[str, Any]
SCHEMA_LOCATION = "{{ .ResourceKind }}{{ .KindSuffix }}.json"
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
_STRING_OR_INTEGER: JSON = {"oneOf": [{"type": "string"}, {"type": "integer"}]}
_STRING_OR_NUMBER: JSON = {"oneOf": [{"type": "string"}, {"type": "number"}]}
_SPECIAL = {
    "io.k8s.apimachinery.pkg.util.intstr.IntOrString": _STRING_OR_INTEGER,
    "io.k8s.apimachinery.pkg.api.resource.Quantity": _STRING_OR_NUMBER,
}


def schema_file_name(api_version: str, kind: str) -> str:
    """The file kubeconform reads for a kind (registry.schemaPath: the group's first label)."""
    group, _, version = api_version.rpartition("/")
    suffix = f"-{group.split('.')[0].lower()}-{version.lower()}" if group else f"-{version.lower()}"
    return f"{kind.lower()}{suffix}.json"


def strict(node: JSON) -> JSON:
    """A copy of an OpenAPI (v2 or CRD v3) schema as strict JSON Schema: int-or-string and
    nullable spelt out, listed properties closed, extensions dropped."""
    if node.get("format") == "int-or-string" or node.get("x-kubernetes-int-or-string"):
        return {**_STRING_OR_INTEGER, **({"description": node["description"]} if "description" in node else {})}
    out: JSON = {}
    for key, value in node.items():
        if key.startswith("x-") or key == "nullable":
            continue
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {name: strict(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = strict(value)
        elif key in ("allOf", "anyOf", "oneOf") or (key == "items" and isinstance(value, list)):
            out[key] = [strict(sub) for sub in value]
        else:
            out[key] = value
    open_ended = node.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and "additionalProperties" not in out and not open_ended:
        out["additionalProperties"] = False
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def _reachable(definitions: dict[str, JSON], root: str) -> set[str]:
    seen: set[str] = set()
    stack = [root]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        refs = re.findall(r'"\$ref": "#/definitions/([^"]+)"', json.dumps(definitions[name]))
        stack.extend(refs)
    return seen


def _definitions(definitions: dict[str, JSON], names: set[str]) -> JSON:
    return {name: _SPECIAL.get(name) or strict(definitions[name]) for name in sorted(names)}


def builtin_schemas(openapi_v2: JSON, into: Path, skip_groups: set[str]) -> list[str]:
    """One schema file per kind of the API server's OpenAPI v2 document (but those of skip_groups);
    returns the file names."""
    definitions: dict[str, JSON] = openapi_v2["definitions"]
    written = []
    for name, definition in definitions.items():
        for gvk in definition.get("x-kubernetes-group-version-kind") or []:
            if gvk["group"] in skip_groups:
                continue
            api_version = f"{gvk['group']}/{gvk['version']}" if gvk["group"] else gvk["version"]
            file_name = schema_file_name(api_version, gvk["kind"])
            document = {
                "$schema": "http://json-schema.org/draft-07/schema#",
                "$ref": f"#/definitions/{name}",
                "definitions": _definitions(definitions, _reachable(definitions, name)),
            }
            (into / file_name).write_text(json.dumps(document))
            written.append(file_name)
    return written


def crd_schemas(crds: list[JSON], openapi_v2: JSON, into: Path) -> list[str]:
    """One schema file per version of each CRD, from its openAPIV3Schema; metadata is the API
    server's ObjectMeta (a CRD's schema may only say little about it)."""
    definitions: dict[str, JSON] = openapi_v2["definitions"]
    meta = _definitions(definitions, _reachable(definitions, OBJECT_META))
    written = []
    for crd in crds:
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            root = strict(version["schema"]["openAPIV3Schema"])
            root["properties"]["metadata"] = {"$ref": f"#/definitions/{OBJECT_META}"}
            root["properties"].setdefault("apiVersion", {"type": "string"})
            root["properties"].setdefault("kind", {"type": "string"})
            file_name = schema_file_name(f"{group}/{version['name']}", kind)
            (into / file_name).write_text(
                json.dumps({"$schema": "http://json-schema.org/draft-07/schema#", **root, "definitions": meta})
            )
            written.append(file_name)
    return written
