"""The container node's pure parts: a pod (as the operator builds it) → the OCI runtime config."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from sandbox_operator.api import Sandbox, SandboxTemplate
from sandbox_operator.resources.builders import build_pod

REPO = Path(__file__).resolve().parents[3]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("container_node", REPO / "hack" / "container_node.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["container_node"] = module
    spec.loader.exec_module(module)
    return module


node = _load()

IMAGE_CONFIG = {
    "Entrypoint": ["/usr/bin/tini", "--", "sandbox-agent"],
    "Cmd": None,
    "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "SANDBOX_WORKDIR=/home/user", "LANG=C.UTF-8"],
    "User": "1000:1000",
    "WorkingDir": "/home/user",
}


def image(config: dict[str, Any] | None = None) -> Any:
    return node.Image(ref="ghcr.io/x/y:dev", rootfs=Path("/images/y/rootfs"), config=config or IMAGE_CONFIG)


def sandbox_pod(**container: Any) -> dict[str, Any]:
    """A sandbox pod as resources.builders.build_pod makes it (read-only root), with `container`
    fields replaced."""
    sandbox = Sandbox.from_body(
        {
            "apiVersion": "sandbox.dev/v1alpha1",
            "kind": "Sandbox",
            "metadata": {"name": "a", "namespace": "team-a", "uid": "6f1c2d3e-0000-4000-8000-00000000abcd"},
            "spec": {"template": "code-interpreter"},
        }
    )
    template = SandboxTemplate.from_body(
        {
            "metadata": {"name": "code-interpreter"},
            "spec": {"image": "ghcr.io/x/y:dev", "security": {"readOnlyRootFilesystem": True}},
        }
    )
    pod = build_pod(sandbox, template)
    pod["spec"]["containers"][0].update(container)
    return pod


def spec_for(pod: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    container = pod["spec"]["containers"][0]
    arguments: dict[str, Any] = {
        "rootfs": Path("/state/merged"),
        "env": node.container_env(pod, container, image(), "127.3.0.2", "127.0.0.1"),
        "volumes": {"workspace": node.VolumeSource(Path("/pv/w")), "tmp": node.VolumeSource(Path("/state/tmp"))},
        "etc_files": {"/etc/hosts": Path("/state/hosts")},
        "cgroup_dir": Path("/sys/fs/cgroup/memory/x"),
        "max_pids": 1024,
        **overrides,
    }
    result: dict[str, Any] = node.runtime_spec(pod, container, image(), **arguments)
    return result


def test_a_sandbox_pod_runs_as_its_security_context_says() -> None:
    pod = sandbox_pod()
    spec = spec_for(pod)
    process = spec["process"]
    assert process["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [1000]}
    assert process["args"] == ["/usr/bin/tini", "--", "sandbox-agent"]  # the image's entrypoint
    assert process["cwd"] == "/home/user"
    assert process["noNewPrivileges"] is True
    assert process["capabilities"]["bounding"] == [] and process["capabilities"]["effective"] == []
    assert {"type": "RLIMIT_NPROC", "hard": 1024, "soft": 1024} in process["rlimits"]
    assert spec["root"] == {"path": "/state/merged", "readonly": True}
    assert "seccomp" in spec["linux"] and "unshare" in spec["linux"]["seccomp"]["syscalls"][0]["names"]
    assert {ns["type"] for ns in spec["linux"]["namespaces"]} == {"pid", "ipc", "uts", "mount"}
    mounts = {m["destination"]: m for m in spec["mounts"]}
    assert mounts["/home/user"]["source"] == "/pv/w" and "rw" in mounts["/home/user"]["options"]
    assert mounts["/sys/fs/cgroup/memory"]["source"] == "/sys/fs/cgroup/memory/x"
    assert "ro" in mounts["/sys/fs/cgroup/memory"]["options"]
    assert spec["hostname"] == pod["spec"]["hostname"]
    json.dumps(spec)  # serialisable as config.json


def test_env_is_image_then_container_then_the_bind_address() -> None:
    pod = sandbox_pod(
        env=[{"name": "LANG", "value": "C"}, {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    )
    env = dict(item.split("=", 1) for item in spec_for(pod)["process"]["env"])
    assert env["LANG"] == "C"  # the container overrides the image
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    assert env["POD"] == pod["metadata"]["name"]
    assert env[node.AGENT_HOST_ENV] == "127.3.0.2"


def test_command_and_args_follow_kubernetes_rules() -> None:
    assert node.command_line({"command": ["sandbox-agent"]}, image()) == ["sandbox-agent"]
    assert node.command_line({"args": ["--x"]}, image()) == ["/usr/bin/tini", "--", "sandbox-agent", "--x"]
    with_cmd = image({**IMAGE_CONFIG, "Cmd": ["a"]})
    assert node.command_line({"command": ["b"]}, with_cmd) == ["b"]  # command drops the image's Cmd
    assert node.command_line({}, with_cmd) == ["/usr/bin/tini", "--", "sandbox-agent", "a"]


def test_bad_pods_are_config_errors_with_a_reason() -> None:
    root_pod = sandbox_pod(securityContext={"runAsNonRoot": True, "runAsUser": 0})
    with pytest.raises(node.ConfigError, match="runAsNonRoot"):
        spec_for(root_pod)
    no_command = image({"Env": []})
    pod = sandbox_pod()
    container = pod["spec"]["containers"][0]
    with pytest.raises(node.ConfigError, match="no command"):
        node.runtime_spec(
            pod,
            container,
            no_command,
            rootfs=Path("/r"),
            env=[],
            volumes={},
            etc_files={},
            cgroup_dir=None,
            max_pids=10,
        )
    with pytest.raises(node.ConfigError, match='volume "workspace"'):
        spec_for(pod, volumes={})
    with pytest.raises(node.ConfigError, match="fieldRef"):
        node.field_ref(pod, "status.nothing", "", "")


def test_capabilities_default_drop_and_add() -> None:
    assert node.capabilities({}) == list(node.DEFAULT_CAPABILITIES)
    kept = node.capabilities({"securityContext": {"capabilities": {"drop": ["NET_RAW"], "add": ["SYS_PTRACE"]}}})
    assert "CAP_NET_RAW" not in kept and kept[-1] == "CAP_SYS_PTRACE"
    assert node.capabilities({"securityContext": {"capabilities": {"drop": ["ALL"]}}}) == []


def test_termination_reasons_and_restart_policy() -> None:
    assert node.terminated_reason(137, oom_killed=True) == "OOMKilled"
    assert node.terminated_reason(137, oom_killed=False) == "Error"
    assert node.terminated_reason(0, oom_killed=False) == "Completed"
    assert not node.should_restart("Never", 1)
    assert node.should_restart("OnFailure", 1) and not node.should_restart("OnFailure", 0)
    assert node.should_restart("Always", 0)
    assert node.terminal_phase(0) == "Succeeded" and node.terminal_phase(2) == "Failed"


def test_quantities() -> None:
    assert node.parse_quantity("512Mi") == 512 * 2**20
    assert node.parse_quantity("1G") == 10**9
    assert node.parse_quantity("250m") == pytest.approx(0.25)
    assert node.parse_quantity("1024") == 1024


def test_image_store_lookup(tmp_path: Path) -> None:
    (tmp_path / "base-0123" / "rootfs").mkdir(parents=True)
    (tmp_path / "base-0123" / "config.json").write_text(json.dumps({"config": IMAGE_CONFIG}))
    (tmp_path / "index.json").write_text(json.dumps({"images": {"ghcr.io/x/base:dev": "base-0123"}}))
    found = node.find_image(tmp_path, "ghcr.io/x/base:dev")
    assert found.rootfs == tmp_path / "base-0123" / "rootfs" and found.config["User"] == "1000:1000"
    with pytest.raises(node.ImageNotPresent, match="hack/build-images"):
        node.find_image(tmp_path, "ghcr.io/x/other:dev")


def test_probe_parsing_resolves_named_ports() -> None:
    container = {"ports": [{"name": "envd", "containerPort": 49983}]}
    probe = node.Probe.parse({"httpGet": {"path": "/health", "port": "envd"}, "periodSeconds": 2}, container)
    assert probe is not None and (probe.kind, probe.port, probe.path, probe.period) == ("http", 49983, "/health", 2.0)
    assert node.Probe.parse({"exec": {"command": ["true"]}}, container) is None


def test_ip_pool_reuses_a_freed_address_last() -> None:
    pool = node.IpPool("127.3.0.0/29")
    first, second = pool.take(), pool.take()
    pool.give_back(first)
    assert pool.take() not in (first, second)  # a fresh one before the freed one


def test_volume_sources_of_projected_and_single_source_volumes() -> None:
    token = {"serviceAccountToken": {"path": "token"}}
    assert node.volume_sources({"name": "v", "projected": {"sources": [token]}}) == [token]
    assert node.volume_sources({"name": "v", "secret": {"secretName": "s"}}) == [{"secret": {"secretName": "s"}}]
    assert node.volume_sources({"name": "v", "downwardAPI": {"items": []}, "configMap": {"name": "c"}}) == [
        {"configMap": {"name": "c"}},
        {"downwardAPI": {"items": []}},
    ]


def test_token_request_is_bound_to_the_pod() -> None:
    body = node.token_request({"audience": "api", "expirationSeconds": "600"}, "p", "u-1")
    assert body["spec"] == {
        "audiences": ["api"],
        "expirationSeconds": 600,
        "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "p", "uid": "u-1"},
    }
    assert node.token_request({}, "p", "u-1")["spec"]["audiences"] is None
    assert node.token_request({}, "p", "u-1")["spec"]["expirationSeconds"] == 3600


def test_object_files_select_items_and_decode_secrets() -> None:
    config_map = {"data": {"a": "1", "b": "2"}}
    assert node.object_files("configMap", {"name": "c"}, config_map) == {"a": "1", "b": "2"}
    chosen = {"items": [{"key": "b", "path": "sub/b.txt"}, {"key": "missing", "path": "m"}]}
    assert node.object_files("configMap", chosen, config_map) == {"sub/b.txt": "2"}
    assert node.object_files("secret", {"secretName": "s"}, {"data": {"k": "aGk="}}) == {"k": "hi"}
    assert node.object_files("secret", {}, {}) == {}


def test_downward_api_files_read_field_refs() -> None:
    pod = {"metadata": {"name": "p", "labels": {"app": "x"}}, "spec": {}}
    source = {
        "items": [
            {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}},
            {"path": "app", "fieldRef": {"fieldPath": "metadata.labels['app']"}},
            {"path": "cpu", "resourceFieldRef": {"resource": "limits.cpu"}},
            {"path": "ip", "fieldRef": {"fieldPath": "status.podIP"}},
        ]
    }
    assert node.downward_api_files(source, pod, "10.0.0.2", "10.0.0.1") == {"name": "p", "app": "x", "ip": "10.0.0.2"}
    assert node.downward_api_files({}, pod, "", "") == {}


def test_volume_files_stay_inside_the_volume(tmp_path: Path) -> None:
    volume = tmp_path / "v"
    node.write_volume_files(volume, {"a": "1", "sub/b": "2"})
    assert (volume / "a").read_text() == "1" and (volume / "sub" / "b").read_text() == "2"
    assert (volume / "a").stat().st_mode & 0o777 == 0o644 and volume.stat().st_mode & 0o777 == 0o755
    with pytest.raises(node.ConfigError, match="leaves the volume"):
        node.write_volume_files(volume, {"../escape": "x"})
    assert not (tmp_path / "escape").exists()


def test_a_ca_bundle_is_bound_read_only_before_the_volumes() -> None:
    pod = sandbox_pod()
    assert node.CA_BUNDLE_PATH not in {m["destination"] for m in spec_for(pod)["mounts"]}
    mounts = spec_for(pod, ca_bundle=Path("/host/ca.crt"))["mounts"]
    destinations = [m["destination"] for m in mounts]
    ca = mounts[destinations.index(node.CA_BUNDLE_PATH)]
    assert ca == {
        "destination": "/etc/ssl/certs/ca-certificates.crt",
        "type": "bind",
        "source": "/host/ca.crt",
        "options": ["rbind", "ro", "nosuid", "noexec", "nodev"],
    }
    # A pod's own CA mount (a ConfigMap over /etc/ssl/certs) comes later, so it wins.
    assert destinations.index(node.CA_BUNDLE_PATH) < destinations.index("/home/user")


def test_only_an_image_with_the_bundle_path_gets_the_bundle(tmp_path: Path) -> None:
    with_bundle = node.Image(ref="a", rootfs=tmp_path / "a", config={})
    (tmp_path / "a" / "etc" / "ssl" / "certs").mkdir(parents=True)
    (tmp_path / "a" / "etc" / "ssl" / "certs" / "ca-certificates.crt").write_text("PEM")
    linked = node.Image(ref="b", rootfs=tmp_path / "b", config={})
    (tmp_path / "b" / "etc" / "ssl" / "certs").mkdir(parents=True)
    (tmp_path / "b" / "etc" / "ssl" / "certs" / "ca-certificates.crt").symlink_to("/etc/pki/tls/cert.pem")
    without = node.Image(ref="c", rootfs=tmp_path / "c", config={})
    (tmp_path / "c" / "etc" / "ssl" / "certs" / "ca-certificates.crt").mkdir(parents=True)  # a directory
    assert node.image_has(with_bundle, node.CA_BUNDLE_PATH)
    assert node.image_has(linked, node.CA_BUNDLE_PATH)  # resolved inside the container, not here
    assert not node.image_has(without, node.CA_BUNDLE_PATH)
    assert not node.image_has(node.Image(ref="d", rootfs=tmp_path / "d", config={}), node.CA_BUNDLE_PATH)


def test_a_pods_resolv_conf_is_the_hosts_name_servers() -> None:
    host = "# generated\nnameserver 10.255.255.53\n; comment\nsearch  corp.example\noptions ndots:2\nbogus\n"
    assert node.pod_resolv_conf(host) == "nameserver 10.255.255.53\nsearch corp.example\noptions ndots:2\n"
    assert node.pod_resolv_conf("") == "nameserver 127.0.0.53\n"
    assert node.pod_resolv_conf("search a\nnameserver\n") == "nameserver 127.0.0.53\nsearch a\n"


def test_two_nodes_of_one_name_never_share_a_container_cgroup(tmp_path: Path) -> None:
    # An e2e session's cluster and a chaos test's run at once, both `container-node-0` under this
    # process's cgroup: sharing the directory, one node's start-up cleanup killed the other's containers.
    first = node.node_cgroup_root("container-node-0", tmp_path / "a" / "node")
    second = node.node_cgroup_root("container-node-0", tmp_path / "b" / "node")
    assert first != second and first.parent == second.parent == node.own_memory_cgroup()
    assert first.name.startswith("sandbox-node-container-node-0-")
    assert node.node_cgroup_root("container-node-0", tmp_path / "a" / "node") == first  # stable for a state dir
