"""The cluster DNS pods every sandbox's egress reaches: kube-system/k8s-app=kube-dns unless the
operator's --dns-namespace and --dns-pod-label (the chart's networkPolicy.dns) say otherwise."""

from __future__ import annotations

import pytest
from resources_factories import sandbox, template

from sandbox_operator.__main__ import build_parser
from sandbox_operator.api.names import DEFAULT_DNS_NAMESPACE, DEFAULT_DNS_POD_LABELS
from sandbox_operator.resources import build_network_policy


def _dns_peer(**selector: object) -> object:
    policy = build_network_policy(sandbox(), template(), gateway_namespace="sandbox-system", **selector)  # type: ignore[arg-type]
    dns = policy["spec"]["egress"][0]
    assert {(port["protocol"], port["port"]) for port in dns["ports"]} == {("UDP", 53), ("TCP", 53)}
    (peer,) = dns["to"]
    return peer


def test_default_dns_selector_is_kube_dns_in_kube_system() -> None:
    assert _dns_peer() == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
    }


def test_a_configured_dns_selector_replaces_the_default() -> None:
    peer = _dns_peer(dns_namespace="dns-system", dns_pod_labels={"app.kubernetes.io/name": "coredns"})
    assert peer == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "dns-system"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "coredns"}},
    }


def test_dns_flags_parse() -> None:
    defaults = build_parser().parse_args(["run"])
    assert defaults.dns_namespace == DEFAULT_DNS_NAMESPACE and defaults.dns_pod_labels == []
    assert DEFAULT_DNS_POD_LABELS == (("k8s-app", "kube-dns"),)
    args = build_parser().parse_args(
        ["run", "--dns-namespace=dns-system", "--dns-pod-label=app.kubernetes.io/name=coredns", "--dns-pod-label=a=b"]
    )
    assert args.dns_namespace == "dns-system"
    assert args.dns_pod_labels == [("app.kubernetes.io/name", "coredns"), ("a", "b")]


@pytest.mark.parametrize("bad", ["coredns", "=coredns"])
def test_a_dns_label_without_a_key_is_refused(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", f"--dns-pod-label={bad}"])
    assert "expected KEY=VALUE" in capsys.readouterr().err
