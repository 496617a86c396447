"""Generate ``crds/*.yaml`` from the pydantic models.

    python -m sandbox_operator.api.crdgen            # rewrite crds/
    python -m sandbox_operator.api.crdgen --check    # exit 1 when crds/ differs from the models

pydantic emits JSON Schema 2020-12; a CRD needs a *structural* OpenAPI v3 schema. ``structural()``
rewrites one into the other (docs/kopf.md §4): ``$ref`` inlined, ``title`` dropped, ``Optional``
unwrapped (absent from ``required`` instead of ``null``), ``const`` → one-value ``enum``, numeric
``exclusiveMinimum`` → boolean form, ``uniqueItems`` → list-type set, ``default: null`` dropped.
It refuses to emit a node without a type or a property without a description.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from .names import GROUP, VERSION
from .v1alpha1 import KINDS, CrdInfo, _Resource

__all__ = ["build_crd", "build_crds", "crd_filename", "main", "render", "structural"]

JsonSchema = dict[str, Any]

_DROPPED_KEYS = frozenset({"title", "examples", "$schema"})
_HEADER = "# Generated from the models in operator/sandbox_operator/api/ by crdgen. Do not edit.\n"


class SchemaError(ValueError):
    """The models produce a schema the API server would refuse (or that lacks descriptions)."""


def _merge(base: JsonSchema, overlay: JsonSchema) -> JsonSchema:
    """Overlay field-level keys (description, default, rules) on an inlined definition."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if key == "x-kubernetes-validations":
            merged[key] = [*merged.get(key, []), *value]
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def structural(node: JsonSchema, defs: JsonSchema, path: str = "") -> JsonSchema:
    """Rewrite one pydantic JSON schema node (and its children) into a structural OpenAPI v3 node."""
    node = _inlined(node, defs, path)
    out: JsonSchema = {}
    for key, value in node.items():
        if not _dropped(key, value):
            _rewrite_key(out, key, value, defs, path)
    _infer_type(out, node, path)
    _require_descriptions(out, path)
    return _ordered(out)


def _inlined(node: JsonSchema, defs: JsonSchema, path: str) -> JsonSchema:
    """The node with its ``$ref``, single-branch ``allOf`` and ``Optional`` ``anyOf`` folded in."""
    node = dict(node)
    if "$ref" in node:
        name = node.pop("$ref").rsplit("/", 1)[-1]
        node = _merge(defs[name], node)
    if "allOf" in node and len(node["allOf"]) == 1:
        return _inlined(_merge(node.pop("allOf")[0], node), defs, path)
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        branches = [branch for branch in node.pop("anyOf") if branch.get("type") != "null"]
        if len(branches) != 1:
            raise SchemaError(f"{path or '<root>'}: unions are not structural: {branches}")
        # The field's own keys (description, default, rules) win over the branch's.
        return _inlined(_merge(branches[0], node), defs, path)
    return node


def _dropped(key: str, value: Any) -> bool:
    """Keys a structural schema has no use for."""
    if key in _DROPPED_KEYS or (key == "default" and value is None):
        return True
    # extra="forbid"; the API server refuses unknown fields on its own (strict validation).
    return key == "additionalProperties" and isinstance(value, bool)


def _rewrite_key(out: JsonSchema, key: str, value: Any, defs: JsonSchema, path: str) -> None:
    """Put one key of an inlined node into `out`, in its OpenAPI v3 form (children rewritten)."""
    if key == "const":
        out["enum"] = [value]
    elif key == "exclusiveMinimum" and not isinstance(value, bool):
        out["minimum"], out["exclusiveMinimum"] = value, True
    elif key == "exclusiveMaximum" and not isinstance(value, bool):
        out["maximum"], out["exclusiveMaximum"] = value, True
    elif key == "uniqueItems":
        out.setdefault("x-kubernetes-list-type", "set")
    elif key == "properties":
        out[key] = {name: structural(child, defs, f"{path}.{name}") for name, child in value.items()}
    elif key in {"items", "additionalProperties"}:
        out[key] = structural(value, defs, f"{path}[*]")
    elif key == "anyOf":  # int-or-string: branches are plain types
        out[key] = [{"type": branch["type"]} for branch in value]
    else:
        out[key] = copy.deepcopy(value)


def _infer_type(out: JsonSchema, node: JsonSchema, path: str) -> None:
    """A structural node needs a type: a string-only enum is a string; anything else untyped is refused."""
    if "type" in out or out.get("x-kubernetes-int-or-string"):
        return
    if "enum" in out and all(isinstance(item, str) for item in out["enum"]):
        out["type"] = "string"
    else:
        raise SchemaError(f"{path or '<root>'}: schema node has no type: {node}")


def _require_descriptions(out: JsonSchema, path: str) -> None:
    for name, child in out.get("properties", {}).items():
        if not child.get("description"):
            raise SchemaError(f"{path}.{name}: every field needs a description (Field(description=...))")


# Stable, readable key order in the YAML: what a node is, then how it is checked, then its children.
_KEY_ORDER = (
    "description",
    "type",
    "x-kubernetes-int-or-string",
    "anyOf",
    "format",
    "enum",
    "default",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "maxProperties",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "required",
    "properties",
    "items",
    "additionalProperties",
    "x-kubernetes-validations",
)


def _ordered(node: JsonSchema) -> JsonSchema:
    rank = {key: index for index, key in enumerate(_KEY_ORDER)}
    return dict(sorted(node.items(), key=lambda item: rank.get(item[0], len(rank))))


def _model_schema(model: type[Any]) -> JsonSchema:
    raw: JsonSchema = model.model_json_schema(by_alias=True, mode="validation", ref_template="#/$defs/{model}")
    defs = raw.pop("$defs", {})
    return structural(raw, defs, "")


def _printer_columns(info: CrdInfo) -> list[dict[str, Any]]:
    columns = []
    for column in info.printer_columns:
        entry: dict[str, Any] = {
            "name": column.name,
            "type": column.type,
            "jsonPath": column.json_path,
            "description": column.description,
        }
        if column.priority:
            entry["priority"] = column.priority
        columns.append(entry)
    return columns


def _part_schema(kind: type[_Resource], part: str) -> JsonSchema:
    """Schema of ``spec`` or ``status``, described by the model's docstring."""
    model = kind.model_fields[part].annotation
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise SchemaError(f"{kind.__name__}.{part} must be a pydantic model, not {model!r}")
    schema = _model_schema(model)
    schema["description"] = (model.__doc__ or "").strip()
    return _ordered(schema)


def build_crd(kind: type[_Resource]) -> dict[str, Any]:
    """The CustomResourceDefinition of one kind, as a plain dict."""
    info = kind.crd
    properties: dict[str, Any] = {
        "apiVersion": {"description": "API version of this object: sandbox.dev/v1alpha1.", "type": "string"},
        "kind": {"description": f"Kind of this object: {kind.__name__}.", "type": "string"},
        # No metadata.properties: offline validators made strict (kubeconform -strict over
        # openapi2jsonschema output) would close metadata to its declared names and refuse labels and
        # annotations. Name rules are CEL at the root (CrdInfo.root_rules, self.metadata.name).
        "metadata": {"type": "object"},
    }
    for part in ("spec", "status"):
        if part in kind.model_fields:
            properties[part] = _part_schema(kind, part)
    root: dict[str, Any] = {
        "description": info.description,
        "type": "object",
        "required": ["spec"],
        "properties": properties,
    }
    if info.root_rules:
        root["x-kubernetes-validations"] = [dict(rule) for rule in info.root_rules]

    version: dict[str, Any] = {
        "name": VERSION,
        "served": True,
        "storage": True,
        "schema": {"openAPIV3Schema": root},
        "additionalPrinterColumns": _printer_columns(info),
    }
    subresources: dict[str, Any] = {}
    if info.status_subresource:
        subresources["status"] = {}
    if info.scale:
        subresources["scale"] = dict(info.scale)
    if subresources:
        version["subresources"] = subresources

    names: dict[str, Any] = {
        "kind": kind.__name__,
        "listKind": f"{kind.__name__}List",
        "plural": info.plural,
        "singular": info.singular,
    }
    if info.short_names:
        names["shortNames"] = list(info.short_names)
    if info.categories:
        names["categories"] = list(info.categories)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{info.plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "sandbox-operator"},
        },
        "spec": {"group": GROUP, "names": names, "scope": info.scope, "versions": [version]},
    }


def build_crds() -> dict[str, dict[str, Any]]:
    """Every CRD of the API, keyed by file name."""
    return {crd_filename(kind): build_crd(kind) for kind in KINDS}


def crd_filename(kind: type[_Resource]) -> str:
    """``sandbox.dev_sandboxes.yaml`` (the controller-gen naming)."""
    return f"{GROUP}_{kind.crd.plural}.yaml"


def render(crd: dict[str, Any]) -> str:
    """The YAML text of one CRD, byte-for-byte what lives in crds/."""
    return _HEADER + yaml.safe_dump(crd, sort_keys=False, width=120, allow_unicode=True)


def default_output_dirs() -> tuple[Path, ...]:
    """``crds/`` at the repository root (three levels above the package) and the Helm chart's
    ``crds/``: both are written from the same models, so they cannot disagree."""
    root = Path(__file__).resolve().parents[3]
    return root / "crds", root / "charts" / "sandbox-operator" / "crds"


def _drifted(output: Path, rendered: dict[str, str]) -> Iterable[str]:
    for name, text in rendered.items():
        path = output / name
        if not path.exists() or path.read_text() != text:
            yield name
    for path in sorted(output.glob(f"{GROUP}_*.yaml")):
        if path.name not in rendered:
            yield path.name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox_operator.api.crdgen", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--output",
        type=Path,
        action="append",
        default=None,
        help="directory of the CRD YAML files (repeatable; default: crds/ and the Helm chart's crds/)",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if the directory differs from the models")
    args = parser.parse_args(argv)
    rendered = {name: render(crd) for name, crd in build_crds().items()}
    outputs: list[Path] = args.output or list(default_output_dirs())
    if args.check:
        stale = [output / name for output in outputs for name in _drifted(output, rendered)]
        for path in stale:
            print(f"{path} is out of date; run: python -m sandbox_operator.api.crdgen", file=sys.stderr)
        return 1 if stale else 0
    for output in outputs:
        output.mkdir(parents=True, exist_ok=True)
        for name in list(_drifted(output, rendered)):
            path = output / name
            if name in rendered:
                path.write_text(rendered[name])
                print(f"wrote {path}")
            else:
                path.unlink()
                print(f"removed stale {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
