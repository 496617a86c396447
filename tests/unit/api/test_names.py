"""api.names: every name on the wire is defined there and nowhere else in the package."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from sandbox_operator.api import names

PACKAGE = Path(names.__file__).resolve().parent.parent
# Label keys and annotation keys: an optional DNS-subdomain prefix and a name (as the API server checks).
QUALIFIED_NAME = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9][-A-Za-z0-9_.]{0,62}$"
)
WIRE_NAME = re.compile(r"\bsandbox\.dev/[a-z]")


def _string_constants(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants that are not docstrings (text for humans may name a label) nor ``Literal[...]``
    types (a type cannot name a constant)."""
    docstrings: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "Literal":
            docstrings.update(id(inner) for inner in ast.walk(node.slice))
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            docstrings.add(id(node.value))  # attribute docstrings
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found.append((node.lineno, node.value))
    return found


def _package_sources() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if path != Path(names.__file__).resolve())


def test_no_module_spells_a_label_annotation_or_finalizer_of_its_own() -> None:
    offenders = []
    for path in _package_sources():
        for line, text in _string_constants(ast.parse(path.read_text())):
            # argparse help and log text may mention a label; keys and values are constants.
            if WIRE_NAME.search(text) and " " not in text:
                offenders.append(f"{path.relative_to(PACKAGE)}:{line}: {text!r}")
    assert offenders == [], "use sandbox_operator.api.names instead of:\n" + "\n".join(offenders)


def test_no_module_spells_an_agent_port_or_an_api_path() -> None:
    offenders = []
    for path in _package_sources():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in names.AGENT_PORTS and not isinstance(node.value, bool):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: port {node.value}")
        for line, text in _string_constants(tree):
            if text.startswith(("/api/v1/namespaces", "/apis/")):
                offenders.append(f"{path.relative_to(PACKAGE)}:{line}: {text!r}")
    assert offenders == [], "use sandbox_operator.api.names instead of:\n" + "\n".join(offenders)


def _public_strings() -> dict[str, str]:
    return {name: value for name, value in vars(names).items() if name.isupper() and isinstance(value, str)}


@pytest.mark.parametrize("suffix", ["_LABEL", "_ANNOTATION", "FINALIZER"])
def test_keys_are_valid_qualified_names(suffix: str) -> None:
    keys = {name: value for name, value in _public_strings().items() if name.endswith(suffix)}
    assert keys, suffix
    for name, value in keys.items():
        assert QUALIFIED_NAME.match(value), f"{name} = {value!r}"


def test_no_two_keys_share_a_value() -> None:
    keys = {name: value for name, value in _public_strings().items() if name.endswith(("_LABEL", "_ANNOTATION"))}
    assert len(set(keys.values())) == len(keys), keys


def test_every_public_name_has_a_one_line_doc() -> None:
    source = Path(names.__file__).read_text()
    tree = ast.parse(source)
    documented: set[str] = set()
    body = tree.body
    for node, following in zip(body, [*body[1:], None], strict=True):
        if isinstance(node, ast.AnnAssign | ast.Assign):
            target = node.target if isinstance(node, ast.AnnAssign) else node.targets[0]
            if (
                isinstance(target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
            ):
                documented.add(target.id)
        elif isinstance(node, ast.ClassDef) and ast.get_docstring(node):
            documented.add(node.name)
    resources = {name for name, value in vars(names).items() if isinstance(value, names.ApiResource)}
    missing = sorted(set(names.__all__) - documented - resources)
    assert missing == [], f"document these in api/names.py: {missing}"


def test_api_version_is_group_and_version() -> None:
    assert f"{names.GROUP}/{names.VERSION}" == names.API_VERSION


@pytest.mark.parametrize(
    ("resource", "namespace", "name", "subresource", "path"),
    [
        (names.SANDBOXES, "team-a", "s1", "status", "/apis/sandbox.dev/v1alpha1/namespaces/team-a/sandboxes/s1/status"),
        (names.SANDBOX_TEMPLATES, None, "base", "", "/apis/sandbox.dev/v1alpha1/sandboxtemplates/base"),
        (names.PODS, "team-a", "sbx-s1", "", "/api/v1/namespaces/team-a/pods/sbx-s1"),
        (names.NETWORK_POLICIES, "ns", "p", "", "/apis/networking.k8s.io/v1/namespaces/ns/networkpolicies/p"),
    ],
)
def test_resource_paths(
    resource: names.ApiResource, namespace: str | None, name: str, subresource: str, path: str
) -> None:
    assert resource.path(namespace, name, subresource) == path


def test_collections_namespaced_and_cluster_wide() -> None:
    assert names.PODS.collection("ns") == "/api/v1/namespaces/ns/pods"
    assert names.SANDBOXES.collection() == "/apis/sandbox.dev/v1alpha1/sandboxes"
