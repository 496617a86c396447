"""The unmodified E2B JavaScript SDKs (`e2b` and `@e2b/code-interpreter` from npm, versions pinned in
tests/e2e/js/package.json) through the gateway, driven by node: create, commands (a failing one is
CommandExitError, a timed-out one TimeoutError), files, get_info, list, kill, the code
interpreter (state across runs, an error's name, the default context listed), and auto-pause with
auto-resume (the timeout pauses, a file read wakes it on the same workspace).

The packages are installed once into a cache outside the repository, keyed by package.json."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from e2elib import Gateway

from chartlib import CACHE

JS_DIR = Path(__file__).parent / "js"
NPM_TIMEOUT_S = 600
RUN_TIMEOUT_S = 300


def _node_modules() -> Path:
    """node_modules for js/package.json, installed on first use (npm from the registry)."""
    manifest = (JS_DIR / "package.json").read_bytes()
    home = CACHE / f"npm-e2e-{hashlib.sha256(manifest).hexdigest()[:16]}"
    modules = home / "node_modules"
    if (modules / "e2b" / "package.json").exists() and (modules / "@e2b" / "code-interpreter").exists():
        return modules
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm not found: the JS SDK e2e test needs node and npm")
    staging = home.with_name(home.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copy(JS_DIR / "package.json", staging / "package.json")
    print(f"[js-sdk] npm install into {home} (first run only)", file=sys.stderr)
    subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--omit=dev"],
        cwd=staging,
        check=True,
        timeout=NPM_TIMEOUT_S,
    )
    shutil.rmtree(home, ignore_errors=True)
    staging.rename(home)  # whole or not at all: an interrupted install is never taken for a cache
    return modules


def _run_smoke(gateway: Gateway, modules: Path) -> dict[str, Any]:
    node = shutil.which("node")
    assert node is not None, "node not found"
    env = {
        **os.environ,
        "NODE_PATH": str(modules),
        "E2B_API_URL": gateway.url,
        "E2B_SANDBOX_URL": gateway.url,
        "E2B_API_KEY": gateway.api_key,
    }
    env.pop("E2B_DOMAIN", None)
    # ESM resolves packages next to the script, not through NODE_PATH: run a copy beside the modules.
    script = modules.parent / "sdk_smoke.mjs"
    shutil.copy(JS_DIR / "sdk_smoke.mjs", script)
    result = subprocess.run(
        [node, str(script)], env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
    )
    assert result.returncode == 0, f"node failed:\n{result.stderr[-4000:]}"
    seen: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return seen


@pytest.mark.timeout(NPM_TIMEOUT_S + RUN_TIMEOUT_S)
def test_the_js_sdks_work_through_the_gateway(gateway: Gateway) -> None:
    seen = _run_smoke(gateway, _node_modules())
    assert seen["stdout"] == "hello from user\n" and seen["exitCode"] == 0
    assert seen["failedCommand"] == 3  # CommandExitError with the exit code
    assert seen["timedOut"] == "TimeoutError", seen["timedOut"]
    assert seen["read"] == "written by the JS SDK\n" and seen["listed"] == ["js.txt"]
    assert seen["state"] == "running" and seen["metadata"] == {"suite": "js"}
    assert seen["sandboxId"] in seen["listedIds"]
    assert seen["killed"] is True
    assert seen["codeText"] == "42" and seen["codeStdout"] == "43\n"
    assert seen["codeError"] == "NameError"
    assert "python" in seen["contexts"]
    assert seen["lifecycle"] == {"autoResume": True, "onTimeout": "pause"}
    assert seen["woken"] == "kept across the pause\n" and seen["wokenState"] == "running"
