"""Child names, labels and sandbox IDs."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from sandbox_operator.resources import child_names, sandbox_id_for
from sandbox_operator.resources.names import bounded_name, label_value

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
sandbox_names = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")


def test_short_names() -> None:
    names = child_names("demo")
    assert (names.pod, names.service, names.network_policy) == ("sbx-demo",) * 3
    assert names.pvc == "sbx-demo-workspace"
    assert names.hostname == "demo"


def test_long_names_are_truncated_with_a_hash() -> None:
    long_a, long_b = "a" * 60 + "x", "a" * 60 + "y"
    pod_a, pod_b = child_names(long_a).pod, child_names(long_b).pod
    assert len(pod_a) == 63 and len(pod_b) == 63
    assert pod_a != pod_b  # same prefix, different sandboxes
    assert pod_a.startswith("sbx-aaaa")
    assert child_names(long_a).pvc.endswith("-workspace")


@given(sandbox_names)
def test_every_child_name_is_a_dns_label(name: str) -> None:
    names = child_names(name)
    for child in (names.pod, names.pvc, names.service, names.network_policy, names.hostname):
        assert len(child) <= 63
        assert DNS_LABEL.match(child), child
    assert child_names(name) == names  # deterministic


def test_truncation_never_leaves_a_dash_before_the_hash() -> None:
    assert "--" not in bounded_name("sbx-", "a" * 54 + "-" * 9)


def test_long_template_names_become_valid_label_values() -> None:
    value = label_value("templates." + "x" * 250)
    assert len(value) <= 63
    assert re.match(r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$", value)
    assert label_value("python") == "python"


def test_sandbox_id_shape_and_stability() -> None:
    first = sandbox_id_for("team-a", "demo", "uid-1")
    assert re.fullmatch(r"[a-z0-9]{20}", first)
    assert sandbox_id_for("team-a", "demo", "uid-1") == first
    assert sandbox_id_for("team-a", "demo", "uid-2") != first  # re-created object, new ID
    assert sandbox_id_for("team-b", "demo", "uid-1") != first


@given(st.text(max_size=30), st.text(max_size=30), st.uuids().map(str))
def test_sandbox_id_is_always_e2b_shaped(namespace: str, name: str, uid: str) -> None:
    assert re.fullmatch(r"[a-z0-9]{20}", sandbox_id_for(namespace, name, uid))
