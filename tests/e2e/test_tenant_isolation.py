"""Tenant isolation at the agent: code in one tenant's sandbox cannot drive another tenant's agent
by its pod IP (the cluster may not enforce NetworkPolicy — this one does not), because every agent
requires its own access token, which only the gateway and the operator can derive. Real sandboxes
on the container node (pods share the host's loopback network here, the worst case), real gateway.
"""

from __future__ import annotations

import json
from typing import Any

from e2b import Sandbox
from e2elib import Gateway

from sandbox_operator.api.names import ENVD_PORT, INTERPRETER_PORT
from testlib import Cluster

PROBE = """
import json, sys, urllib.request, urllib.error
results = {}
for name, method, url, body in json.loads(sys.argv[1]):
    request = urllib.request.Request(url, data=body.encode() if body else None, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            results[name] = response.status
    except urllib.error.HTTPError as error:
        results[name] = error.code
    except OSError as error:
        results[name] = str(error)
print(json.dumps(results))
"""


def _pod_ip(cluster: Cluster, namespace: str, sandbox_id: str) -> str:
    items = (cluster.get_json("sandboxes", "-n", namespace) or {}).get("items", [])
    (body,) = [s for s in items if s["status"].get("sandboxID") == sandbox_id]
    return str(body["status"]["podIP"])


def test_a_sandbox_cannot_drive_another_tenants_agent(cluster: Cluster, gateway: Gateway) -> None:
    victim = Sandbox.create(template="base", timeout=120, **gateway.sdk())
    attacker = Sandbox.create(template="base", timeout=120, **gateway.sdk(gateway.other_key))
    try:
        victim.files.write("secret.txt", "tenant A's data\n")
        ip = _pod_ip(cluster, gateway.namespace, victim.sandbox_id)
        envd, interpreter = f"http://{ip}:{ENVD_PORT}", f"http://{ip}:{INTERPRETER_PORT}"
        start = json.dumps({"process": {"cmd": "/bin/sh", "args": ["-c", "touch /tmp/pwned"]}})
        probes: list[tuple[str, str, str, str]] = [
            ("health", "GET", f"{envd}/health", ""),  # open by design: a probe target
            ("read file", "GET", f"{envd}/files?path=secret.txt", ""),
            ("metrics", "GET", f"{envd}/agent/metrics", ""),
            ("run command", "POST", f"{envd}/process.Process/Start", start),
            ("init", "POST", f"{envd}/init", "{}"),
            ("execute code", "POST", f"{interpreter}/execute", json.dumps({"code": "open('/tmp/pwned2','w')"})),
        ]
        attacker.files.write("probe.py", PROBE)
        run = attacker.commands.run(f"python3 probe.py '{json.dumps(probes)}'", timeout=60)
        results: dict[str, Any] = json.loads(run.stdout)
        assert results.pop("health") in (200, 204), results
        assert results == {name: 401 for name, *_ in probes if name != "health"}, results
        # Nothing happened in the victim's sandbox, which still works through the gateway.
        check = victim.commands.run("ls /tmp/pwned /tmp/pwned2 2>&1 || true")
        assert "No such file" in check.stdout, check.stdout
        assert victim.files.read("secret.txt") == "tenant A's data\n"
    finally:
        attacker.kill()
        victim.kill()
