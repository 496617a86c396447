#!/usr/bin/env python3
"""A local Kubernetes node whose pods really run: each container from the project's images under crun.

    python3 hack/container_node.py --kubeconfig K --state-dir D [--node-name N] [--pod-cidr C] [--ca-bundle F]
    python3 hack/container_node.py --state-dir D --cleanup      # stop and remove whatever a dead node left

`hack/cluster up --node containers` starts it. It registers a Node, watches the pods bound to it and
does what a kubelet does for them, on loopback, without a kubelet (a kubelet rewrites kernel
settings and root cgroups of a shared host):

- the image comes from the local image store that hack/build-images fills (never pulled: an image
  that is not there is `ErrImageNeverPull`);
- each container runs under crun from its own overlay over the image's shared, read-only rootfs,
  with the pod's command/args, env (fieldRef too), user and groups, capabilities, no-new-privileges,
  seccomp (RuntimeDefault = a deny list of the syscalls containers never need), read-only root,
  volumes (the workspace claim's host-path directory, emptyDirs, memory-backed emptyDirs),
  /etc/hosts, and a memory cgroup with the memory limit nested under this process's own memory
  cgroup; process and file limits are rlimits (the pids cgroup is at its hierarchy root here);
- pods share the host's network namespace; each gets an address of the node's loopback pod CIDR,
  and the node tells the agent to bind it (SANDBOX_AGENT_HOST), so sandboxes do not collide on ports;
  /etc/resolv.conf carries the host's name servers (as a kubelet's --resolv-conf for dnsPolicy Default);
- with --ca-bundle, that file is bind-mounted read-only over /etc/ssl/certs/ca-certificates.crt in
  every container whose image has that path, as a node image that trusts a corporate CA would do;
- status is the container's: Running when started, Ready from the readiness probe, restarts per
  restartPolicy and the liveness probe, terminated with exit code and reason (OOMKilled from the
  cgroup's OOM counter, Error, Completed);
- deleting a pod stops its container (SIGTERM, the grace period, SIGKILL) before the pod goes away.

Everything it makes (containers, mounts, cgroups, directories) lives under --state-dir and its own
cgroup; mounts live in the node's private mount namespace, so they go when it does. Standard
library only, like hack/cluster.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import hashlib
import http.client
import ipaddress
import json
import os
import queue
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

CACHE = Path(os.environ.get("SANDBOX_OPERATOR_CACHE", Path.home() / ".cache" / "sandbox-operator"))
DEFAULT_IMAGE_STORE = Path(os.environ.get("SANDBOX_IMAGE_STORE", CACHE / "images"))
DEFAULT_NODE_NAME = "container-node-0"
DEFAULT_POD_CIDR = "127.3.0.0/16"
# Pods have no pids field; like the kubelet's --pod-max-pids, one limit for every pod (an rlimit:
# RLIMIT_NPROC counts the uid's processes and threads).
DEFAULT_POD_MAX_PIDS = 1024
POD_MAX_OPEN_FILES = 65536
# Capacity advertised: a test node, overcommitted on purpose (sandboxes request == limit).
CAPACITY = {"cpu": "32", "memory": "64Gi", "pods": "64", "ephemeral-storage": "200Gi"}
HEARTBEAT_SECONDS = 10.0
IMAGE_RETRY_SECONDS = 2.0
RESTART_BACKOFF_INITIAL, RESTART_BACKOFF_MAX = 1.0, 60.0
# When the node itself stops (hack/cluster down), containers get at most this long.
NODE_SHUTDOWN_GRACE_SECONDS = 3.0
# The agent's bind address on this node: pods share the host network namespace.
AGENT_HOST_ENV = "SANDBOX_AGENT_HOST"
# Where a container's trusted CAs are (Debian's bundle); --ca-bundle replaces it read-only.
CA_BUNDLE_PATH = "/etc/ssl/certs/ca-certificates.crt"
# The host's resolver configuration: pods share its network namespace, so its name servers work.
HOST_RESOLV_CONF = Path("/etc/resolv.conf")
# What a pod gets when the host names no server (systemd-resolved's stub, reachable on the host).
FALLBACK_NAMESERVER = "127.0.0.53"
# Docker's default capability set: what a container has unless the pod drops it.
DEFAULT_CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)
# RuntimeDefault here: allow everything but what a container never needs (kernel modules, keyring,
# namespaces, mounts, bpf, perf, clock and reboot). Docker's profile is an allow list; this deny
# list covers its escape-relevant part and stays small enough to read.
SECCOMP_DENIED = (
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "query_module",
    "quotactl",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "syslog",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "vm86",
    "vm86old",
)
CLONE_NEWNS = 0x00020000


def log(message: str) -> None:
    stamp = datetime.now().strftime("%H:%M:%S.%f")[:-3]
    print(f"{stamp} [container-node] {message}", file=sys.stderr, flush=True)


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------
# pure parts: quantities, image store, the OCI runtime spec, pod status


_SUFFIXES = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "m": 10**-3,
}


def parse_quantity(text: str) -> float:
    """A Kubernetes quantity ("512Mi", "1G", "250m", "1e3") as a number."""
    text = str(text).strip()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if text.endswith(suffix) and text[: -len(suffix)]:
            return float(text[: -len(suffix)]) * _SUFFIXES[suffix]
    return float(text)


@dataclass(frozen=True)
class Image:
    ref: str
    rootfs: Path
    config: dict[str, Any]  # the OCI image config's "config" object (Entrypoint, Cmd, Env, User, WorkingDir)


class ImageNotPresent(Exception):
    """The pod's image is not in the local store."""


def find_image(store: Path, ref: str) -> Image:
    """The image `ref` from the store that hack/build-images writes (index.json → directory)."""
    try:
        index = json.loads((store / "index.json").read_text())
    except (OSError, ValueError) as error:
        raise ImageNotPresent(f"no image store at {store} ({error}); run hack/build-images") from error
    candidates = [ref]
    if "/" not in ref.split(":")[0]:
        candidates.append(f"docker.io/library/{ref}")
    for candidate in candidates:
        directory = (index.get("images") or {}).get(candidate)
        if directory and (store / directory / "rootfs").is_dir():
            try:
                config = json.loads((store / directory / "config.json").read_text())
            except (OSError, ValueError) as error:
                raise ImageNotPresent(f"image {ref}: unreadable config in {store / directory}: {error}") from error
            return Image(ref=candidate, rootfs=store / directory / "rootfs", config=config.get("config") or {})
    raise ImageNotPresent(f'image "{ref}" is not in the local image store {store}; build it with hack/build-images')


def command_line(container: dict[str, Any], image: Image) -> list[str]:
    """Kubernetes' rule: command replaces the entrypoint (and drops the image's Cmd), args replace Cmd."""
    entrypoint = list(image.config.get("Entrypoint") or [])
    cmd = list(image.config.get("Cmd") or [])
    if container.get("command"):
        return [*container["command"], *(container.get("args") or [])]
    if container.get("args"):
        return [*entrypoint, *container["args"]]
    return [*entrypoint, *cmd]


class ConfigError(Exception):
    """The pod cannot be turned into a container (CreateContainerConfigError)."""


class NotReadyYet(Exception):
    """Something the container needs is not there yet (a claim not bound): ContainerCreating, retried."""


def field_ref(pod: dict[str, Any], path: str, pod_ip: str, host_ip: str) -> str:
    meta, spec = pod["metadata"], pod.get("spec") or {}
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": host_ip,
        "status.hostIPs": host_ip,
    }
    if path in simple:
        return str(simple[path])
    for prefix, source in (("metadata.labels['", "labels"), ("metadata.annotations['", "annotations")):
        if path.startswith(prefix) and path.endswith("']"):
            return str((meta.get(source) or {}).get(path[len(prefix) : -2], ""))
    raise ConfigError(f"unsupported fieldRef {path!r}")


def container_env(
    pod: dict[str, Any],
    container: dict[str, Any],
    image: Image,
    pod_ip: str,
    host_ip: str,
    lookup: Any = None,
) -> list[str]:
    """The process environment: image Env, then the container's env (later wins), as the kubelet does.

    `lookup(kind, namespace, name, key)` resolves secretKeyRef/configMapKeyRef values."""
    env: dict[str, str] = {}
    for item in image.config.get("Env") or []:
        key, _, value = item.partition("=")
        env[key] = value
    env["HOSTNAME"] = (pod.get("spec") or {}).get("hostname") or pod["metadata"]["name"]
    namespace = pod["metadata"].get("namespace", "default")
    for item in container.get("env") or []:
        name = item["name"]
        if "value" in item:
            env[name] = str(item["value"])
            continue
        source = item.get("valueFrom") or {}
        if "fieldRef" in source:
            env[name] = field_ref(pod, source["fieldRef"]["fieldPath"], pod_ip, host_ip)
        elif "secretKeyRef" in source or "configMapKeyRef" in source:
            kind = "secrets" if "secretKeyRef" in source else "configmaps"
            ref: dict[str, Any] = source.get("secretKeyRef") or source.get("configMapKeyRef") or {}
            value = lookup(kind, namespace, ref["name"], ref["key"]) if lookup else None
            if value is None:
                if ref.get("optional"):
                    continue
                raise ConfigError(f'{kind[:-1]} "{ref["name"]}" key "{ref["key"]}" not found')
            env[name] = value
        elif "resourceFieldRef" in source:
            resource = source["resourceFieldRef"]["resource"]
            kind, _, what = resource.partition(".")
            amount = ((container.get("resources") or {}).get(kind) or {}).get(what, "0")
            env[name] = str(int(parse_quantity(amount)))
        else:
            env[name] = ""
    # Pods share the host network namespace here: the agent binds the pod's own address.
    env[AGENT_HOST_ENV] = pod_ip
    return [f"{key}={value}" for key, value in env.items()]


def _security(pod: dict[str, Any], container: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    return (pod.get("spec") or {}).get("securityContext") or {}, container.get("securityContext") or {}


def process_user(pod: dict[str, Any], container: dict[str, Any], image: Image) -> dict[str, Any]:
    pod_security, security = _security(pod, container)
    uid = security.get("runAsUser", pod_security.get("runAsUser"))
    gid = security.get("runAsGroup", pod_security.get("runAsGroup"))
    image_user = str(image.config.get("User") or "")
    if uid is None and image_user:
        user, _, group = image_user.partition(":")
        if not user.isdigit() or (group and not group.isdigit()):
            raise ConfigError(f"image user {image_user!r} is not numeric; set runAsUser")
        uid = int(user)
        if gid is None and group:
            gid = int(group)
    uid = int(uid or 0)
    gid = int(gid if gid is not None else 0)
    if security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) and uid == 0:
        raise ConfigError("container has runAsNonRoot and image will run as root")
    groups = [gid]
    if pod_security.get("fsGroup") is not None:
        groups.append(int(pod_security["fsGroup"]))
    groups += [int(g) for g in pod_security.get("supplementalGroups") or []]
    return {"uid": uid, "gid": gid, "additionalGids": sorted(set(groups))}


def capabilities(container: dict[str, Any]) -> list[str]:
    caps = (container.get("securityContext") or {}).get("capabilities") or {}
    drop = {("CAP_" + c.upper()).replace("CAP_CAP_", "CAP_") for c in caps.get("drop") or []}
    add = [("CAP_" + c.upper()).replace("CAP_CAP_", "CAP_") for c in caps.get("add") or []]
    if "CAP_ALL" in drop:
        kept: list[str] = []
    else:
        kept = [c for c in DEFAULT_CAPABILITIES if c not in drop]
    return list(dict.fromkeys([*kept, *add]))


def seccomp_profile(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, Any] | None:
    pod_security, security = _security(pod, container)
    profile = security.get("seccompProfile") or pod_security.get("seccompProfile") or {}
    if profile.get("type") != "RuntimeDefault":
        return None  # Unconfined (the kubelet's default too); Localhost profiles are not supported here
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [{"names": list(SECCOMP_DENIED), "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
    }


@dataclass(frozen=True)
class VolumeSource:
    """Where a pod volume lives on the host: a directory to bind, or a tmpfs."""

    path: Path | None
    tmpfs_size: int | None = None
    read_only: bool = False


def pod_resolv_conf(host: str) -> str:
    """A pod's /etc/resolv.conf from the host's: its nameserver, search and options lines (the pod
    shares the host's network namespace, so they work there); systemd-resolved's stub when it names
    no server."""
    kept: list[str] = []
    for line in host.splitlines():
        words = line.split()
        if len(words) > 1 and words[0] in ("nameserver", "search", "options"):
            kept.append(" ".join(words))
    if not any(line.startswith("nameserver") for line in kept):
        kept.insert(0, f"nameserver {FALLBACK_NAMESERVER}")
    return "\n".join(kept) + "\n"


def image_has(image: Image, path: str) -> bool:
    """Whether the image's rootfs has `path` (a file or a symlink: a mount needs it to exist)."""
    target = image.rootfs / path.lstrip("/")
    return target.is_symlink() or target.is_file()


def memory_limit(container: dict[str, Any]) -> int | None:
    limit = ((container.get("resources") or {}).get("limits") or {}).get("memory")
    return int(parse_quantity(limit)) if limit else None


def runtime_spec(
    pod: dict[str, Any],
    container: dict[str, Any],
    image: Image,
    *,
    rootfs: Path,
    env: list[str],
    volumes: dict[str, VolumeSource],
    etc_files: dict[str, Path],
    cgroup_dir: Path | None,
    max_pids: int,
    max_open_files: int = POD_MAX_OPEN_FILES,
    ca_bundle: Path | None = None,
) -> dict[str, Any]:
    """The OCI runtime config for one container of `pod` (pure: no I/O). `ca_bundle`, when given, is
    bound read-only over CA_BUNDLE_PATH (the caller passes it only when the image has that path)."""
    args = command_line(container, image)
    if not args:
        raise ConfigError("no command specified: neither the container nor the image has one")
    pod_security, security = _security(pod, container)
    caps = capabilities(container)
    privileged = bool(security.get("privileged"))
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
    ]
    if cgroup_dir is not None:
        # The container sees its own memory cgroup (usage, limit, OOM count) as cgroup v1 does in Docker.
        mounts += [
            {
                "destination": "/sys/fs/cgroup",
                "type": "tmpfs",
                "source": "cgroup",
                "options": ["nosuid", "noexec", "nodev", "mode=755", "size=64k"],
            },
            {
                "destination": "/sys/fs/cgroup/memory",
                "type": "bind",
                "source": str(cgroup_dir),
                "options": ["rbind", "ro", "nosuid", "noexec", "nodev"],
            },
        ]
    for destination, source in etc_files.items():
        mounts.append({"destination": destination, "type": "bind", "source": str(source), "options": ["rbind", "rw"]})
    if ca_bundle is not None:
        # Before the volumes: a pod that mounts its own CAs (a ConfigMap over /etc/ssl/certs) wins.
        mounts.append(
            {
                "destination": CA_BUNDLE_PATH,
                "type": "bind",
                "source": str(ca_bundle),
                "options": ["rbind", "ro", "nosuid", "noexec", "nodev"],
            }
        )
    for mount in container.get("volumeMounts") or []:
        volume = volumes.get(mount["name"])
        if volume is None:
            raise ConfigError(f'volume "{mount["name"]}" is not defined by the pod')
        read_only = bool(mount.get("readOnly")) or volume.read_only
        if volume.path is None:
            size = f",size={volume.tmpfs_size}" if volume.tmpfs_size else ""
            mounts.append(
                {
                    "destination": mount["mountPath"],
                    "type": "tmpfs",
                    "source": "tmpfs",
                    "options": ["nosuid", "nodev", *(["ro"] if read_only else []), f"mode=1777{size}"],
                }
            )
            continue
        source = volume.path / mount["subPath"] if mount.get("subPath") else volume.path
        mounts.append(
            {
                "destination": mount["mountPath"],
                "type": "bind",
                "source": str(source),
                "options": ["rbind", "ro" if read_only else "rw", "nosuid", "nodev"],
            }
        )
    no_new_privileges = security.get("allowPrivilegeEscalation") is False
    process: dict[str, Any] = {
        "terminal": False,
        "user": process_user(pod, container, image),
        "args": args,
        "env": env,
        "cwd": container.get("workingDir") or image.config.get("WorkingDir") or "/",
        "capabilities": {kind: caps for kind in ("bounding", "effective", "permitted")}
        | {"inheritable": [], "ambient": []},
        "rlimits": [
            {"type": "RLIMIT_NOFILE", "hard": max_open_files, "soft": max_open_files},
            {"type": "RLIMIT_NPROC", "hard": max_pids, "soft": max_pids},
        ],
        "noNewPrivileges": no_new_privileges,
        "oomScoreAdj": 1000 if memory_limit(container) else 0,
    }
    linux: dict[str, Any] = {
        "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
        "maskedPaths": [
            "/proc/acpi",
            "/proc/kcore",
            "/proc/keys",
            "/proc/latency_stats",
            "/proc/timer_list",
            "/proc/sched_debug",
            "/proc/scsi",
            "/sys/firmware",
        ],
        "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
    }
    if not privileged:
        profile = seccomp_profile(pod, container)
        if profile is not None:
            linux["seccomp"] = profile
    del pod_security
    return {
        "ociVersion": "1.0.2",
        "process": process,
        "root": {"path": str(rootfs), "readonly": bool(security.get("readOnlyRootFilesystem"))},
        "hostname": ((pod.get("spec") or {}).get("hostname") or pod["metadata"]["name"])[:63],
        "mounts": mounts,
        "linux": linux,
    }


def terminated_reason(exit_code: int, oom_killed: bool) -> str:
    if oom_killed:
        return "OOMKilled"
    return "Completed" if exit_code == 0 else "Error"


def should_restart(policy: str, exit_code: int) -> bool:
    return policy == "Always" or (policy == "OnFailure" and exit_code != 0)


def terminal_phase(exit_code: int) -> str:
    return "Succeeded" if exit_code == 0 else "Failed"


@dataclass
class Probe:
    """A readiness or liveness probe (httpGet or tcpSocket) with its thresholds."""

    kind: str  # "http" | "tcp"
    port: int
    path: str = "/"
    period: float = 10.0
    timeout: float = 1.0
    initial_delay: float = 0.0
    success_threshold: int = 1
    failure_threshold: int = 3

    @classmethod
    def parse(cls, body: dict[str, Any] | None, container: dict[str, Any]) -> Probe | None:
        if not body:
            return None
        action = body.get("httpGet") or body.get("tcpSocket")
        if action is None:
            return None  # exec and grpc probes are not supported here: treated as absent
        port = action.get("port")
        if isinstance(port, str) and not port.isdigit():
            named = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}
            port = named.get(port)
        if port is None:
            return None
        return cls(
            kind="http" if "httpGet" in body else "tcp",
            port=int(port),
            path=str(action.get("path") or "/"),
            period=float(body.get("periodSeconds", 10)),
            timeout=float(body.get("timeoutSeconds", 1)),
            initial_delay=float(body.get("initialDelaySeconds", 0)),
            success_threshold=int(body.get("successThreshold", 1)),
            failure_threshold=int(body.get("failureThreshold", 3)),
        )

    def check(self, host: str) -> bool:
        try:
            if self.kind == "tcp":
                with socket.create_connection((host, self.port), timeout=self.timeout):
                    return True
            connection = http.client.HTTPConnection(host, self.port, timeout=self.timeout)
            try:
                connection.request("GET", self.path, headers={"User-Agent": "kube-probe/container-node"})
                return 200 <= connection.getresponse().status < 400
            finally:
                connection.close()
        except OSError:
            return False


# ---------------------------------------------------------------------------------------------
# the API server (stdlib HTTP with the kubeconfig's token)


class Api:
    def __init__(self, kubeconfig: Path) -> None:
        config = json.loads(kubeconfig.read_text())  # hack/cluster writes JSON kubeconfigs
        cluster = config["clusters"][0]["cluster"]
        user = config["users"][0]["user"]
        parsed = urllib.parse.urlparse(cluster["server"])
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 443
        self.token = user["token"]
        self.tls = ssl.create_default_context()
        ca_file = tempfile.NamedTemporaryFile("wb", suffix=".crt", delete=False)  # noqa: SIM115
        ca_file.write(base64.b64decode(cluster["certificate-authority-data"]))
        ca_file.close()
        self.tls.load_verify_locations(ca_file.name)
        os.unlink(ca_file.name)
        self._local = threading.local()

    def _connection(self, timeout: float) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.host, self.port, context=self.tls, timeout=timeout)

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json", timeout: float = 15
    ) -> tuple[int, Any]:
        headers = {
            "Authorization": f"Bearer {self.token}",
            "Accept": "application/json",
            "User-Agent": "container-node",
        }
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        for attempt in range(2):
            connection = getattr(self._local, "connection", None)
            if connection is None:
                connection = self._local.connection = self._connection(timeout)
            try:
                connection.request(method, path, body=data, headers=headers)
                response = connection.getresponse()
                raw = response.read()
                try:
                    answer = json.loads(raw) if raw else None
                except ValueError:
                    answer = raw.decode(errors="replace")
                return response.status, answer
            except (OSError, http.client.HTTPException):
                connection.close()
                self._local.connection = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def watch(self, path: str, timeout: float) -> Iterator[dict[str, Any]]:
        connection = self._connection(timeout + 30)
        try:
            connection.request(
                "GET",
                path,
                headers={
                    "Authorization": f"Bearer {self.token}",
                    "Accept": "application/json",
                    "User-Agent": "container-node",
                },
            )
            response = connection.getresponse()
            if response.status != 200:
                raise OSError(f"watch {path}: HTTP {response.status} {response.read()[:300]!r}")
            while True:
                line = response.readline()
                if not line:
                    return
                if line.strip():
                    yield json.loads(line)
        finally:
            connection.close()


# ---------------------------------------------------------------------------------------------
# host side: cgroups, crun, IPs


CGROUP_ROOT_FILE = "cgroup-root"  # in the state dir: where this node's container cgroups are


def node_cgroup_root(node_name: str, state_dir: Path) -> Path:
    """The memory cgroup the node nests its containers under: named for the node *and* its state
    dir, so two local clusters at once (an e2e session's and a chaos test's, both
    `container-node-0`, both under this shell's cgroup) never clean up or remove each other's."""
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]
    return own_memory_cgroup() / f"sandbox-node-{node_name}-{digest}"


def own_memory_cgroup() -> Path:
    """This process's memory cgroup directory (v1 hierarchy, or the v2 unified one)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return Path("/sys/fs/cgroup") / line[3:].lstrip("/")
    raise RuntimeError("no memory cgroup found in /proc/self/cgroup")


class MemoryCgroup:
    """A memory cgroup for one container, nested under the node's own (never at a hierarchy root)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.v2 = (path.parent / "cgroup.controllers").exists() and not (path.parent / "memory.limit_in_bytes").exists()

    def create(self, limit: int | None) -> None:
        self.path.mkdir(exist_ok=True)
        if limit:
            name = "memory.max" if self.v2 else "memory.limit_in_bytes"
            (self.path / name).write_text(str(limit))
            if not self.v2:
                with contextlib.suppress(OSError):  # no swap on these machines: keep it that way
                    (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit))

    def oom_kills(self) -> int:
        name = "memory.events" if self.v2 else "memory.oom_control"
        try:
            for line in (self.path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def remove(self) -> None:
        deadline = time.monotonic() + 10
        while self.path.exists():
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    log(f"could not remove cgroup {self.path}")
                    return
                time.sleep(0.05)


class IpPool:
    """Pod addresses from the node CIDR; a freed address is reused last (a new pod must never be
    mistaken for the old one at the same address)."""

    def __init__(self, cidr: str) -> None:
        network = ipaddress.ip_network(cidr)
        self._free = [str(ip) for ip in list(network.hosts())[1:4096]]  # .1 is the node's
        self._used: set[str] = set()
        self._lock = threading.Lock()

    def take(self, preferred: str | None = None) -> str:
        with self._lock:
            if preferred and preferred in self._free:
                self._free.remove(preferred)
            else:
                if not self._free:
                    raise RuntimeError("no free pod address")
                preferred = self._free.pop(0)
            self._used.add(preferred)
            return preferred

    def give_back(self, ip: str) -> None:
        with self._lock:
            if ip in self._used:
                self._used.discard(ip)
                self._free.append(ip)


DISK_IMAGE_NAME = ".sandbox-disk.ext4"


class Disks:
    """Size-limited volumes: an ext4 image file per volume, loop-mounted once on the node and shared
    by every pod that uses it (a claim must never be mounted twice: that corrupts it)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._users: dict[Path, int] = {}
        self._lock = threading.Lock()

    def mountpoint(self, image: Path) -> Path:
        return self.root / hashlib.sha256(str(image).encode()).hexdigest()[:16]

    def attach(self, image: Path, size: int) -> Path:
        target = self.mountpoint(image)
        with self._lock:
            if self._users.get(image):
                self._users[image] += 1
                return target
            if not image.exists():
                with open(image, "wb") as sparse:
                    sparse.truncate(size)
                subprocess.run(
                    ["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", str(image)],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                fresh = True
            else:
                fresh = False
            target.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                ["mount", "-o", "loop,nosuid,nodev", str(image), str(target)],
                check=True,
                capture_output=True,
                text=True,
            )
            if fresh:
                shutil.rmtree(target / "lost+found", ignore_errors=True)  # not part of a workspace
            self._users[image] = 1
            return target

    def detach(self, image: Path) -> None:
        with self._lock:
            users = self._users.get(image, 0) - 1
            if users > 0:
                self._users[image] = users
                return
            self._users.pop(image, None)
            target = self.mountpoint(image)
            subprocess.run(["umount", str(target)], capture_output=True)
            with contextlib.suppress(OSError):
                target.rmdir()


def crun(state_root: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["crun", "--root", str(state_root), *args], capture_output=True, text=True, timeout=timeout)


def private_mount_namespace() -> None:
    """Enter a mount namespace of our own: overlay mounts go when the node does, and crun sees the
    cgroup v1 hierarchies only (it refuses hybrid mode, and it manages no cgroups here anyway)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS) failed (root is needed)")
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    if Path("/sys/fs/cgroup/unified").is_mount() and Path("/sys/fs/cgroup/memory").is_dir():
        subprocess.run(["umount", "-l", "/sys/fs/cgroup/unified"], check=False)


# ---------------------------------------------------------------------------------------------
# one pod


@dataclass
class ContainerRun:
    name: str
    process: subprocess.Popen[bytes] | None = None
    container_id: str = ""
    started_at: str = ""
    restart_count: int = 0
    ready: bool = False
    state: dict[str, Any] = field(default_factory=dict)
    last_state: dict[str, Any] = field(default_factory=dict)
    rootfs_mount: Path | None = None
    cgroup: MemoryCgroup | None = None


class PodWorker(threading.Thread):
    """Runs one pod's containers and reports their status; one thread per pod."""

    def __init__(self, node: Node, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.node, self.uid = node, meta["uid"]
        self.namespace, self.pod_name = meta["namespace"], meta["name"]
        self.pod = pod
        self.updates: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.dir = node.state_dir / "pods" / self.uid
        self.ip = ""
        self.runs: dict[str, ContainerRun] = {}
        self.phase = "Pending"
        self.start_time = now_rfc3339()
        self.conditions_ready = False
        self.stopping = False
        self.disks: list[Path] = []  # disk images this pod attached (a volume with a size)
        self._last_status: Any = None

    # --- the thread

    def run(self) -> None:
        try:
            self._run()
        except Exception as error:
            log(f"{self.namespace}/{self.pod_name}: worker failed: {error!r}")
        finally:
            self._teardown()
            self.node.forget(self.uid)

    def _run(self) -> None:
        previous = self.pod.get("status") or {}
        self.ip = self.node.ips.take(previous.get("podIP"))
        self.dir.mkdir(parents=True, exist_ok=True)
        containers = (self.pod.get("spec") or {}).get("containers") or []
        self.runs = {c["name"]: ContainerRun(name=c["name"]) for c in containers}
        for status in previous.get("containerStatuses") or []:
            if status.get("name") in self.runs:
                self.runs[status["name"]].restart_count = int(status.get("restartCount") or 0)
        policy = (self.pod.get("spec") or {}).get("restartPolicy") or "Always"
        backoff: dict[str, float] = {}
        next_start: dict[str, float] = {}
        probes = {
            c["name"]: (Probe.parse(c.get("readinessProbe"), c), Probe.parse(c.get("livenessProbe"), c))
            for c in containers
        }
        probe_state: dict[str, dict[str, Any]] = {c["name"]: {} for c in containers}
        while True:
            if self._drain_updates():
                return  # deleted
            now = time.monotonic()
            for container in containers:
                name = container["name"]
                run = self.runs[name]
                if run.process is None:
                    if self.phase in ("Succeeded", "Failed") or now < next_start.get(name, 0):
                        continue
                    if self._start(container, run):
                        probe_state[name] = {
                            "since": time.monotonic(),
                            "ok": 0,
                            "fail": 0,
                            "next": 0.0,
                            "live_fail": 0,
                            "live_next": 0.0,
                        }
                    else:
                        next_start[name] = now + IMAGE_RETRY_SECONDS
                    continue
                code = run.process.poll()
                if code is not None:
                    self._finished(run, code)
                    if should_restart(policy, code):
                        delay = backoff.get(name, RESTART_BACKOFF_INITIAL)
                        backoff[name] = min(delay * 2, RESTART_BACKOFF_MAX)
                        next_start[name] = time.monotonic() + delay
                        run.restart_count += 1
                        run.state = {
                            "waiting": {
                                "reason": "CrashLoopBackOff",
                                "message": f"back-off {delay:.0f}s restarting failed container={name}",
                            }
                        }
                    continue
                readiness, liveness = probes[name]
                state = probe_state[name]
                self._probe(run, readiness, liveness, state)
            self._report()
            self._wait(0.1)

    def _drain_updates(self) -> bool:
        while True:
            try:
                update = self.updates.get_nowait()
            except queue.Empty:
                return self.stopping
            if update is None or update["metadata"].get("deletionTimestamp"):
                self.stopping = True
                grace = float(
                    (update or {}).get("metadata", {}).get("deletionGracePeriodSeconds")
                    or (self.pod.get("spec") or {}).get("terminationGracePeriodSeconds")
                    or 30
                )
                if self.node.stop.is_set():
                    grace = min(grace, NODE_SHUTDOWN_GRACE_SECONDS)
                self._stop_all(grace)
                if update is not None:
                    self._release_pod()
                return True
            if self._last_status is not None and _ready_of(update) != _ready_of(self._last_status):
                # Someone else rewrote the pod's readiness (the node lifecycle controller marks the pods
                # of a node that stopped reporting not ready): report ours again, as a kubelet's status
                # manager does when the API server's copy drifts from what it knows.
                self._last_status = None
            self.pod = update

    def _wait(self, seconds: float) -> None:
        try:
            update = self.updates.get(timeout=seconds)
        except queue.Empty:
            return
        self.updates.put(update)  # handled by the next drain, in order

    # --- containers

    def _start(self, container: dict[str, Any], run: ContainerRun) -> bool:
        name = container["name"]
        try:
            image = find_image(self.node.image_store, container["image"])
        except ImageNotPresent as error:
            run.state = {"waiting": {"reason": "ErrImageNeverPull", "message": str(error)}}
            self._report()
            return False
        try:
            spec, run_dir = self._prepare(container, run, image)
        except NotReadyYet as error:
            run.state = {"waiting": {"reason": "ContainerCreating", "message": str(error)}}
            self._report()
            return False
        except ConfigError as error:
            run.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(error)}}
            self._report()
            return False
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", "") or ""
            run.state = {"waiting": {"reason": "CreateContainerError", "message": f"{error} {detail}".strip()}}
            self._report()
            return False
        (run_dir / "config.json").write_text(json.dumps(spec, indent=1))
        (run_dir / "runtime.log").unlink(missing_ok=True)
        run.container_id = f"{self.uid[:18]}-{name[:20]}-{run.restart_count}"
        crun(self.node.crun_root, "delete", "-f", run.container_id)
        log_file = open(run_dir / "output.log", "ab")  # noqa: SIM115 - owned by the child
        assert run.cgroup is not None
        # The shell joins the container's memory cgroup, then becomes crun: the container inherits
        # it (crun manages no cgroups here). No preexec_fn: this process has threads.
        argv = [
            "sh",
            "-c",
            'echo $$ > "$0/cgroup.procs" && exec "$@"',
            str(run.cgroup.path),
            "crun",
            "--root",
            str(self.node.crun_root),
            "--cgroup-manager=disabled",
            f"--log=file:{run_dir / 'runtime.log'}",  # crun's own errors, apart from the container's output
            "run",
            "--bundle",
            str(run_dir),
            run.container_id,
        ]
        try:
            run.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            log_file.close()
        run.started_at = now_rfc3339()
        run.ready = False
        run.state = {"running": {"startedAt": run.started_at}}
        self.phase = "Running"
        log(f"{self.namespace}/{self.pod_name}: started {name} ({container['image']}) at {self.ip}")
        self._report()
        return True

    def _prepare(self, container: dict[str, Any], run: ContainerRun, image: Image) -> tuple[dict[str, Any], Path]:
        name = container["name"]
        run_dir = self.dir / "containers" / name
        run_dir.mkdir(parents=True, exist_ok=True)
        volumes = self._volumes()
        etc = self._etc_files()
        env = container_env(self.pod, container, image, self.ip, self.node.host_ip, self.node.lookup)
        # A fresh overlay per start (a restarted container starts from the image, as with a kubelet).
        self._unmount_rootfs(run)
        layer = run_dir / f"layer-{run.restart_count}"
        for part in ("upper", "work", "merged"):
            (layer / part).mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                f"lowerdir={image.rootfs},upperdir={layer / 'upper'},workdir={layer / 'work'}",
                str(layer / "merged"),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        run.rootfs_mount = layer / "merged"
        if run.cgroup is None:
            run.cgroup = MemoryCgroup(self.node.cgroup_root / f"{self.uid}-{name}")
        run.cgroup.create(memory_limit(container))
        spec = runtime_spec(
            self.pod,
            container,
            image,
            rootfs=layer / "merged",
            env=env,
            volumes=volumes,
            etc_files=etc,
            cgroup_dir=run.cgroup.path,
            max_pids=self.node.max_pids,
            # crun sets rlimits after giving up its privileges: no more than the node has itself.
            max_open_files=min(POD_MAX_OPEN_FILES, resource.getrlimit(resource.RLIMIT_NOFILE)[1]),
            ca_bundle=self.node.ca_bundle if self.node.ca_bundle and image_has(image, CA_BUNDLE_PATH) else None,
        )
        return spec, run_dir

    def _volumes(self) -> dict[str, VolumeSource]:
        pod_security = (self.pod.get("spec") or {}).get("securityContext") or {}
        fs_group = pod_security.get("fsGroup")
        volumes: dict[str, VolumeSource] = {}
        for volume in (self.pod.get("spec") or {}).get("volumes") or []:
            name = volume["name"]
            if "emptyDir" in volume:
                empty = volume["emptyDir"] or {}
                if empty.get("medium") == "Memory":
                    size = empty.get("sizeLimit")
                    volumes[name] = VolumeSource(None, int(parse_quantity(size)) if size else None)
                    continue
                path = self.dir / "volumes" / name
                if empty.get("sizeLimit"):
                    # The limit is enforced as a filesystem of that size (ENOSPC), not by eviction.
                    path.mkdir(parents=True, exist_ok=True)
                    path = self._attach(path / DISK_IMAGE_NAME, int(parse_quantity(empty["sizeLimit"])))
                    path.chmod(0o777)
                elif not path.exists():
                    path.mkdir(parents=True)
                    path.chmod(0o777)  # as the kubelet makes emptyDirs
                volumes[name] = VolumeSource(path)
            elif "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                path, capacity = self.node.claim_volume(self.namespace, claim)
                path.mkdir(parents=True, exist_ok=True)
                if capacity:
                    # The claim's size is real: its data lives in a filesystem of that size inside
                    # the host-path directory (deleted with the volume).
                    path = self._attach(path / DISK_IMAGE_NAME, capacity)
                if fs_group is not None:
                    apply_fs_group(path, int(fs_group))
                volumes[name] = VolumeSource(path, read_only=bool(volume["persistentVolumeClaim"].get("readOnly")))
            elif "hostPath" in volume:
                volumes[name] = VolumeSource(Path(volume["hostPath"]["path"]))
            elif {"projected", "configMap", "secret", "downwardAPI"} & volume.keys():
                path = self.dir / "volumes" / name
                self._write_files(path, volume)
                volumes[name] = VolumeSource(path, read_only=True)
            else:
                kinds = ", ".join(k for k in volume if k != "name")
                raise ConfigError(f'volume "{name}": {kinds} volumes are not supported by the container node')
        return volumes

    def _write_files(self, path: Path, volume: dict[str, Any]) -> None:
        """configMap, secret, downwardAPI and projected volumes (the service account token among
        them): files written once at start, as the kubelet does (it refreshes tokens; we do not)."""
        files: dict[str, str] = {}
        for source in volume_sources(volume):
            if "serviceAccountToken" in source:
                request = source["serviceAccountToken"]
                files[request.get("path", "token")] = self._service_account_token(request)
            for kind in ("configMap", "secret"):
                if kind in source:
                    files.update(self._object_files(kind, source[kind]))
            if "downwardAPI" in source:
                files.update(downward_api_files(source["downwardAPI"], self.pod, self.ip, self.node.host_ip))
        write_volume_files(path, files)

    def _service_account_token(self, request: dict[str, Any]) -> str:
        account = (self.pod.get("spec") or {}).get("serviceAccountName") or "default"
        body = token_request(request, self.pod_name, self.uid)
        code, answer = self.node.api.request(
            "POST", f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{account}/token", body
        )
        if code != 201:
            raise NotReadyYet(f"service account token for {account}: {code} {str(answer)[:200]}")
        token: str = answer["status"]["token"]
        return token

    def _object_files(self, kind: str, ref: dict[str, Any]) -> dict[str, str]:
        """The files a configMap or secret source projects; none for a missing optional one."""
        ref_name = ref.get("name") or ref.get("secretName")
        code, obj = self.node.api.request("GET", f"/api/v1/namespaces/{self.namespace}/{kind.lower()}s/{ref_name}")
        if code != 200:
            if ref.get("optional"):
                return {}
            raise NotReadyYet(f'{kind} "{ref_name}" not found')
        return object_files(kind, ref, obj)

    def _attach(self, image: Path, size: int) -> Path:
        if image not in self.disks:
            self.disks.append(image)
            return self.node.disks.attach(image, size)
        return self.node.disks.mountpoint(image)

    def _etc_files(self) -> dict[str, Path]:
        hostname = (self.pod.get("spec") or {}).get("hostname") or self.pod_name
        files = {
            "/etc/hosts": f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{self.ip}\t{hostname}\n",
            "/etc/hostname": f"{hostname}\n",
            "/etc/resolv.conf": self.node.resolv_conf,
        }
        paths: dict[str, Path] = {}
        for destination, content in files.items():
            path = self.dir / ("etc-" + destination.rsplit("/", 1)[1])
            path.write_text(content)
            path.chmod(0o644)
            paths[destination] = path
        return paths

    def _finished(self, run: ContainerRun, code: int) -> None:
        assert run.process is not None
        oom = run.cgroup.oom_kills() > 0 if run.cgroup else False
        exit_code = code if code >= 0 else 128 - code
        reason = terminated_reason(exit_code, oom)
        message = ""
        run_dir = self.dir / "containers" / run.name
        runtime_error = _tail(run_dir / "runtime.log")
        if exit_code != 0 and runtime_error:
            # crun could not start the process (no such executable, a bad mount, ...): as containerd
            # reports it, StartError with exit code 128 and the runtime's message.
            reason, exit_code, message = "StartError", 128, runtime_error
        elif exit_code != 0 and time.time() - _parse(run.started_at) < 2:
            message = _tail(run_dir / "output.log")
        log(f"{self.namespace}/{self.pod_name}: {run.name} exited {exit_code} ({reason})")
        terminated = {
            "exitCode": exit_code,
            "reason": reason,
            "startedAt": run.started_at,
            "finishedAt": now_rfc3339(),
            "containerID": f"crun://{run.container_id}",
        }
        if message:
            terminated["message"] = message
        run.process = None
        run.ready = False
        run.last_state = {"terminated": terminated}
        run.state = {"terminated": terminated}
        crun(self.node.crun_root, "delete", "-f", run.container_id)
        if run.cgroup is not None:
            run.cgroup.remove()  # a fresh one (and OOM count) per start
        policy = (self.pod.get("spec") or {}).get("restartPolicy") or "Always"
        if not should_restart(policy, exit_code) and all(r.process is None for r in self.runs.values()):
            codes = [int((r.state.get("terminated") or {}).get("exitCode", 0)) for r in self.runs.values()]
            self.phase = terminal_phase(max(codes))

    def _probe(self, run: ContainerRun, readiness: Probe | None, liveness: Probe | None, state: dict[str, Any]) -> None:
        now = time.monotonic()
        if readiness is None:
            run.ready = True
        elif now >= state.get("next", 0) and now - state["since"] >= readiness.initial_delay:
            state["next"] = now + readiness.period
            if readiness.check(self.ip):
                state["ok"], state["fail"] = state["ok"] + 1, 0
                if state["ok"] >= readiness.success_threshold:
                    run.ready = True
            else:
                state["ok"], state["fail"] = 0, state["fail"] + 1
                if state["fail"] >= readiness.failure_threshold:
                    run.ready = False
        if liveness is None or now < state.get("live_next", 0) or now - state["since"] < liveness.initial_delay:
            return
        state["live_next"] = now + liveness.period
        if liveness.check(self.ip):
            state["live_fail"] = 0
            return
        state["live_fail"] += 1
        if state["live_fail"] >= liveness.failure_threshold:
            log(f"{self.namespace}/{self.pod_name}: {run.name} failed its liveness probe; killing it")
            self.node.event(
                self.pod,
                "Unhealthy",
                f"Liveness probe failed {liveness.failure_threshold} times; "
                "the container will be restarted per restartPolicy",
                "Warning",
            )
            grace = float((self.pod.get("spec") or {}).get("terminationGracePeriodSeconds") or 30)
            self._stop_container(run, grace)
            state["live_fail"] = 0

    def _stop_container(self, run: ContainerRun, grace: float) -> None:
        """SIGTERM, `grace` seconds, SIGKILL; the pod loop records the end as for any exit."""
        if run.process is None:
            return
        crun(self.node.crun_root, "kill", run.container_id, "TERM")
        # SIGCONT too: a stopped (SIGSTOP) init would never see the SIGTERM.
        crun(self.node.crun_root, "kill", "--all", run.container_id, "CONT")
        try:
            run.process.wait(timeout=max(grace, 0.1))
        except subprocess.TimeoutExpired:
            crun(self.node.crun_root, "kill", "--all", run.container_id, "KILL")
            if run.cgroup is not None:
                for pid in run.cgroup.pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.process.wait(timeout=10)

    def _stop_all(self, grace: float) -> None:
        for run in self.runs.values():
            self._stop_container(run, grace)
            if run.process is not None:
                run.process.poll()
            run.process = None

    def _teardown(self) -> None:
        for run in self.runs.values():
            if run.process is not None:
                self._stop_container(run, 0)
            if run.container_id:
                crun(self.node.crun_root, "delete", "-f", run.container_id)
            self._unmount_rootfs(run)
            if run.cgroup is not None:
                run.cgroup.remove()
        for image in self.disks:
            self.node.disks.detach(image)
        self.disks.clear()
        if self.ip:
            self.node.ips.give_back(self.ip)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _unmount_rootfs(self, run: ContainerRun) -> None:
        if run.rootfs_mount is not None:
            subprocess.run(["umount", "-l", str(run.rootfs_mount)], capture_output=True)
            shutil.rmtree(run.rootfs_mount.parent, ignore_errors=True)
            run.rootfs_mount = None

    def _release_pod(self) -> None:
        """The containers are stopped: let the pod object go (the kubelet deletes with grace 0)."""
        path = f"/api/v1/namespaces/{self.namespace}/pods/{self.pod_name}"
        body = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": self.uid},
        }
        with contextlib.suppress(OSError, http.client.HTTPException):
            self.node.api.request("DELETE", path, body)

    # --- status

    def _report(self) -> None:
        statuses = []
        spec_containers = (self.pod.get("spec") or {}).get("containers") or []
        for container in spec_containers:
            run = self.runs[container["name"]]
            state = run.state or {"waiting": {"reason": "ContainerCreating"}}
            status: dict[str, Any] = {
                "name": run.name,
                "image": container["image"],
                "imageID": "",
                "ready": bool(run.ready and run.process is not None),
                "started": run.process is not None,
                "restartCount": run.restart_count,
                "state": state,
                "lastState": run.last_state if run.last_state and "terminated" not in state else {},
            }
            if run.container_id:
                status["containerID"] = f"crun://{run.container_id}"
            statuses.append(status)
        ready = bool(statuses) and all(s["ready"] for s in statuses)
        stamp = now_rfc3339()

        def condition(kind: str, ok: bool) -> dict[str, str]:
            return {"type": kind, "status": "True" if ok else "False"}

        body: dict[str, Any] = {
            "status": {
                "phase": self.phase,
                "hostIP": self.node.host_ip,
                "hostIPs": [{"ip": self.node.host_ip}],
                "podIP": self.ip,
                "podIPs": [{"ip": self.ip}],
                "startTime": self.start_time,
                "conditions": [
                    condition("PodScheduled", True),
                    condition("Initialized", True),
                    condition("ContainersReady", ready),
                    condition("Ready", ready),
                ],
                "containerStatuses": statuses,
            }
        }
        if body == self._last_status:
            return
        for item in body["status"]["conditions"]:
            item["lastTransitionTime"] = stamp
        path = f"/api/v1/namespaces/{self.namespace}/pods/{self.pod_name}/status"
        patch = {"metadata": {"uid": self.uid}, **body}
        try:
            code, answer = self.node.api.request("PATCH", path, patch, "application/strategic-merge-patch+json")
        except (OSError, http.client.HTTPException) as error:
            log(f"{self.namespace}/{self.pod_name}: status update failed: {error}")
            return
        if code == 200:
            for item in body["status"]["conditions"]:
                item.pop("lastTransitionTime", None)
            self._last_status = body
        elif code in (404, 409):
            self.updates.put(None)  # gone (or replaced): stop what runs
        else:
            log(f"{self.namespace}/{self.pod_name}: status update answered {code}: {str(answer)[:200]}")


def _ready_of(pod: dict[str, Any]) -> str | None:
    """The status of a pod's Ready condition (as the API server has it, or as last reported)."""
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return str(condition.get("status"))
    return None


def volume_sources(volume: dict[str, Any]) -> list[dict[str, Any]]:
    """A projected volume's sources; a configMap, secret or downwardAPI volume as a single source."""
    sources: list[dict[str, Any]] = (volume.get("projected") or {}).get("sources") or [
        {kind: volume[kind]} for kind in ("configMap", "secret", "downwardAPI") if kind in volume
    ]
    return sources


def token_request(request: dict[str, Any], pod_name: str, uid: str) -> dict[str, Any]:
    """The TokenRequest for a serviceAccountToken source, bound to the pod as the kubelet binds it."""
    return {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": [request["audience"]] if request.get("audience") else None,
            "expirationSeconds": int(request.get("expirationSeconds", 3600)),
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod_name, "uid": uid},
        },
    }


def object_files(kind: str, ref: dict[str, Any], obj: dict[str, Any]) -> dict[str, str]:
    """path → content for a configMap or secret `obj`: the `items` the source selects (keys the
    object lacks are skipped), else every key under its own name. Secret values are decoded."""
    data = dict(obj.get("data") or {})
    if kind == "secret":
        data = {k: base64.b64decode(v).decode(errors="replace") for k, v in data.items()}
    items = ref.get("items") or [{"key": k, "path": k} for k in data]
    return {item["path"]: data[item["key"]] for item in items if item["key"] in data}


def downward_api_files(source: dict[str, Any], pod: dict[str, Any], pod_ip: str, host_ip: str) -> dict[str, str]:
    """path → value for a downwardAPI source's fieldRef items (resourceFieldRef items are ignored)."""
    return {
        item["path"]: field_ref(pod, item["fieldRef"]["fieldPath"], pod_ip, host_ip)
        for item in source.get("items") or []
        if "fieldRef" in item
    }


def write_volume_files(path: Path, files: dict[str, str]) -> None:
    """Write `files` (relative path → content) under `path`; a path that leaves it is a ConfigError."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)
    for relative, content in files.items():
        target = path / relative
        if path not in target.resolve().parents:
            raise ConfigError(f"volume file path {relative!r} leaves the volume")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
        target.chmod(0o644)


def apply_fs_group(path: Path, gid: int) -> None:
    """What the kubelet does for fsGroup (OnRootMismatch): group-own the volume, setgid, group-writable."""
    info = path.stat()
    if info.st_gid == gid and info.st_mode & 0o2070 == 0o2070:
        return
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            target = Path(root) / name
            with contextlib.suppress(OSError):
                os.lchown(target, -1, gid)
                if not target.is_symlink():
                    mode = target.stat().st_mode
                    target.chmod(mode | 0o060 | (0o2000 if target.is_dir() else 0))
    os.chown(path, -1, gid)
    path.chmod(path.stat().st_mode | 0o2070)


def _parse(stamp: str) -> float:
    try:
        return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return 0.0


def _tail(path: Path, limit: int = 1024) -> str:
    try:
        data = path.read_bytes()[-limit:]
    except OSError:
        return ""
    return data.decode(errors="replace").strip()


# ---------------------------------------------------------------------------------------------
# the node


class Node:
    def __init__(self, args: argparse.Namespace) -> None:
        self.name: str = args.node_name
        self.state_dir = Path(args.state_dir).resolve()
        self.crun_root = self.state_dir / "crun"
        self.image_store = Path(args.image_store)
        self.cidr: str = args.pod_cidr
        self.ips = IpPool(self.cidr)
        self.host_ip = "127.0.0.1"
        self.max_pids: int = args.pod_max_pids
        self.ca_bundle: Path | None = Path(args.ca_bundle).resolve() if args.ca_bundle else None
        try:
            host_resolv = HOST_RESOLV_CONF.read_text()
        except OSError:
            host_resolv = ""
        self.resolv_conf = pod_resolv_conf(host_resolv)
        self.api = Api(Path(args.kubeconfig))
        self.cgroup_root = node_cgroup_root(self.name, self.state_dir)
        self.disks = Disks(self.state_dir / "disks")
        self.workers: dict[str, PodWorker] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()

    # --- API helpers

    def lookup(self, kind: str, namespace: str, name: str, key: str) -> str | None:
        code, body = self.api.request("GET", f"/api/v1/namespaces/{namespace}/{kind}/{name}")
        if code != 200:
            return None
        value = (body.get("data") or {}).get(key)
        if value is None:
            return None
        return base64.b64decode(value).decode() if kind == "secrets" else str(value)

    def claim_volume(self, namespace: str, claim: str) -> tuple[Path, int | None]:
        """The host-path directory of a bound claim and its capacity in bytes."""
        code, pvc = self.api.request("GET", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}")
        if code != 200:
            raise NotReadyYet(f'persistentvolumeclaim "{claim}" not found')
        volume = (pvc.get("spec") or {}).get("volumeName")
        if not volume or (pvc.get("status") or {}).get("phase") != "Bound":
            raise NotReadyYet(f'persistentvolumeclaim "{claim}" is not bound yet')
        code, pv = self.api.request("GET", f"/api/v1/persistentvolumes/{volume}")
        spec = (pv or {}).get("spec") or {} if code == 200 else {}
        host_path = (spec.get("hostPath") or {}).get("path")
        if not host_path:
            raise ConfigError(f'persistentvolume "{volume}" has no hostPath (only host-path volumes run here)')
        capacity = (spec.get("capacity") or {}).get("storage")
        return Path(host_path), int(parse_quantity(capacity)) if capacity else None

    def event(self, pod: dict[str, Any], reason: str, message: str, kind: str = "Normal") -> None:
        meta = pod["metadata"]
        body = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "kind": "Pod",
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
                "apiVersion": "v1",
            },
            "reason": reason,
            "message": message,
            "type": kind,
            "source": {"component": "kubelet", "host": self.name},
            "firstTimestamp": now_rfc3339(),
            "lastTimestamp": now_rfc3339(),
            "count": 1,
        }
        with contextlib.suppress(OSError, http.client.HTTPException):
            self.api.request("POST", f"/api/v1/namespaces/{meta['namespace']}/events", body)

    # --- lifecycle

    def register(self) -> None:
        labels = {
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "type": "containers",
        }
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.name, "labels": labels, "annotations": {"node.alpha.kubernetes.io/ttl": "0"}},
            "spec": {"podCIDR": self.cidr, "podCIDRs": [self.cidr]},
        }
        code, answer = self.api.request("POST", "/api/v1/nodes", body)
        if code not in (201, 409):
            raise RuntimeError(f"registering node {self.name} failed ({code}): {answer}")
        self.heartbeat()

    def heartbeat(self) -> None:
        stamp = now_rfc3339()
        ready = {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "container node is ready",
            "lastHeartbeatTime": stamp,
            "lastTransitionTime": stamp,
        }
        status = {
            "status": {
                "capacity": CAPACITY,
                "allocatable": CAPACITY,
                "conditions": [ready],
                "addresses": [
                    {"type": "InternalIP", "address": self.host_ip},
                    {"type": "Hostname", "address": self.name},
                ],
                "nodeInfo": {
                    "kubeletVersion": "container-node",
                    "containerRuntimeVersion": "crun",
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                    "osImage": "",
                    "kernelVersion": os.uname().release,
                    "kubeProxyVersion": "",
                    "machineID": "",
                    "systemUUID": "",
                    "bootID": "",
                },
            }
        }
        self.api.request("PATCH", f"/api/v1/nodes/{self.name}/status", status, "application/strategic-merge-patch+json")
        lease_path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.name}"
        micro = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": self.name, "leaseDurationSeconds": 40, "renewTime": micro},
        }
        code, _ = self.api.request("PATCH", lease_path, {"spec": lease["spec"]}, "application/merge-patch+json")
        if code == 404:
            self.api.request("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", lease)

    def forget(self, uid: str) -> None:
        with self.lock:
            self.workers.pop(uid, None)

    def dispatch(self, pod: dict[str, Any] | None, uid: str) -> None:
        with self.lock:
            worker = self.workers.get(uid)
            if worker is None:
                if pod is None or self.stop.is_set():
                    return
                if pod["metadata"].get("deletionTimestamp"):
                    # Never started here: nothing to stop, let it go.
                    PodWorker(self, pod)._release_pod()
                    return
                phase = (pod.get("status") or {}).get("phase")
                if phase in ("Succeeded", "Failed"):
                    return
                worker = self.workers[uid] = PodWorker(self, pod)
                worker.start()
                return
        worker.updates.put(pod)

    def sync(self) -> str:
        """List the node's pods, hand each to its worker, stop workers of pods that are gone."""
        selector = urllib.parse.quote(f"spec.nodeName={self.name}")
        code, listing = self.api.request("GET", f"/api/v1/pods?fieldSelector={selector}")
        if code != 200:
            raise OSError(f"listing pods failed ({code})")
        seen = set()
        for pod in listing.get("items") or []:
            seen.add(pod["metadata"]["uid"])
            self.dispatch(pod, pod["metadata"]["uid"])
        with self.lock:
            gone = [uid for uid in self.workers if uid not in seen]
        for uid in gone:
            self.dispatch(None, uid)
        return str(listing["metadata"]["resourceVersion"])

    def watch_pods(self) -> None:
        selector = urllib.parse.quote(f"spec.nodeName={self.name}")
        version = ""
        while not self.stop.is_set():
            try:
                if not version:
                    version = self.sync()
                path = (
                    f"/api/v1/pods?watch=1&fieldSelector={selector}&resourceVersion={version}"
                    f"&allowWatchBookmarks=true&timeoutSeconds=300"
                )
                for event in self.api.watch(path, 300):
                    if self.stop.is_set():
                        return
                    kind, pod = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":
                        version = ""  # expired: relist
                        break
                    version = pod.get("metadata", {}).get("resourceVersion", version)
                    if kind == "BOOKMARK":
                        continue
                    uid = pod["metadata"]["uid"]
                    self.dispatch(None if kind == "DELETED" else pod, uid)
            except (OSError, http.client.HTTPException, ValueError) as error:
                if self.stop.is_set():
                    return
                log(f"pod watch failed ({error}); relisting")
                version = ""
                self.stop.wait(1)

    def heartbeats(self) -> None:
        while not self.stop.wait(HEARTBEAT_SECONDS):
            try:
                self.heartbeat()
            except (OSError, http.client.HTTPException) as error:
                log(f"heartbeat failed: {error}")

    def shutdown(self) -> None:
        self.stop.set()
        with self.lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker.updates.put(None)
        for worker in workers:
            worker.join(timeout=60)
        cleanup(self.state_dir, self.cgroup_root)


def cleanup(state_dir: Path, cgroup_root: Path | None) -> list[str]:
    """Stop and remove every container, mount and cgroup a node with this state dir made."""
    removed: list[str] = []
    crun_root = state_dir / "crun"
    if crun_root.is_dir():
        listing = crun(crun_root, "list", "--quiet")
        for container in listing.stdout.split():
            crun(crun_root, "kill", "--all", container, "KILL")
            crun(crun_root, "delete", "-f", container)
            removed.append(f"container {container}")
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            target = line.split()[4]
            if target.startswith(str(state_dir) + "/"):
                subprocess.run(["umount", "-l", target], capture_output=True)
                removed.append(f"mount {target}")
    if cgroup_root is not None and cgroup_root.exists():
        for child in sorted(cgroup_root.iterdir()):
            if child.is_dir():
                MemoryCgroup(child).remove()
                removed.append(f"cgroup {child}")
        with contextlib.suppress(OSError):
            cgroup_root.rmdir()
    return removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="container-node", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kubeconfig", help="a kubeconfig as hack/cluster writes it (JSON, token)")
    parser.add_argument("--state-dir", required=True, help="containers, overlays and volumes live here")
    parser.add_argument("--node-name", default=DEFAULT_NODE_NAME)
    parser.add_argument("--pod-cidr", default=DEFAULT_POD_CIDR, help="loopback range pods get addresses from")
    parser.add_argument("--image-store", default=str(DEFAULT_IMAGE_STORE), help="what hack/build-images fills")
    parser.add_argument(
        "--pod-max-pids",
        type=int,
        default=DEFAULT_POD_MAX_PIDS,
        help="RLIMIT_NPROC of every container (the pids cgroup cannot be nested here)",
    )
    parser.add_argument(
        "--ca-bundle",
        help=f"a CA bundle (PEM) bind-mounted read-only over {CA_BUNDLE_PATH} in every container whose image "
        "has that path (the machine's CAs, when its network intercepts TLS)",
    )
    parser.add_argument("--cleanup", action="store_true", help="remove what a node of this state dir left, and exit")
    args = parser.parse_args(argv)
    if args.ca_bundle and not args.cleanup and not Path(args.ca_bundle).is_file():
        parser.error(f"--ca-bundle {args.ca_bundle}: no such file")
    if os.geteuid() != 0:
        print("container-node: must run as root (it starts containers with crun)", file=sys.stderr)
        return 1
    if shutil.which("crun") is None:
        print("container-node: crun not found; apt-get install -y crun", file=sys.stderr)
        return 1
    state_dir = Path(args.state_dir).resolve()
    cgroup_root = node_cgroup_root(args.node_name, state_dir)
    if args.cleanup:
        for item in cleanup(state_dir, cgroup_root):
            log(f"removed {item}")
        return 0
    if not args.kubeconfig:
        parser.error("--kubeconfig is required")
    state_dir.mkdir(parents=True, exist_ok=True)
    private_mount_namespace()
    cleanup(state_dir, cgroup_root)  # a previous node of this state dir that died
    cgroup_root.mkdir(exist_ok=True)
    (state_dir / CGROUP_ROOT_FILE).write_text(str(cgroup_root))  # for benchmarks that read the cgroups
    node = Node(args)
    node.register()
    trusted = f"; CAs from {node.ca_bundle}" if node.ca_bundle else ""
    log(f"node {node.name} registered (pods get {node.cidr}; images from {node.image_store}{trusted})")

    def on_signal(signum: int, _frame: Any) -> None:
        node.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threads = [
        threading.Thread(target=node.watch_pods, name="watch", daemon=True),
        threading.Thread(target=node.heartbeats, name="heartbeat", daemon=True),
    ]
    for thread in threads:
        thread.start()
    node.stop.wait()
    log("stopping: containers get their grace period")
    node.shutdown()
    log("stopped; no containers, mounts or cgroups left")
    return 0


if __name__ == "__main__":
    sys.exit(main())
