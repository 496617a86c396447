"""The Argo CD health scripts and Flux health checks live once, in docs/gitops/; docs/operator.md
shows them verbatim (each block after a `<!-- verbatim: PATH -->` marker must equal that file)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from sandbox_operator.api.names import API_VERSION, GROUP

REPO = Path(__file__).resolve().parents[3]
GITOPS = REPO / "docs" / "gitops"
VERBATIM = re.compile(r"<!-- verbatim: (?P<path>\S+) -->\n```[a-z]*\n(?P<body>.*?)```\n", re.S)


def test_docs_show_every_gitops_file_verbatim() -> None:
    shown = {m["path"]: m["body"] for m in VERBATIM.finditer((REPO / "docs" / "operator.md").read_text())}
    files = {str(path.relative_to(REPO)) for path in GITOPS.rglob("*") if path.is_file()}
    assert set(shown) == files
    for path, body in shown.items():
        assert body == (REPO / path).read_text(), f"docs/operator.md shows an outdated {path}"


def test_argo_scripts_are_named_as_argo_cd_keys_them() -> None:
    names = sorted(path.name for path in (GITOPS / "argocd").glob("*.lua"))
    assert names == [f"{GROUP}_Sandbox.lua", f"{GROUP}_SandboxPool.lua"]


def test_flux_checks_cover_sandboxes_and_pools_with_all_three_expressions() -> None:
    checks = yaml.safe_load((GITOPS / "flux-health-check-exprs.yaml").read_text())["healthCheckExprs"]
    assert [(c["apiVersion"], c["kind"]) for c in checks] == [(API_VERSION, "Sandbox"), (API_VERSION, "SandboxPool")]
    for check in checks:
        assert set(check) == {"apiVersion", "kind", "inProgress", "failed", "current"}
        assert "Stalled" in check["failed"] and "Reconciling" in check["inProgress"]
