"""hack/build-images' pure parts: the store keys, what a Dockerfile copies, the leak check, the index."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("build_images", str(REPO / "hack" / "build-images"))
    spec = importlib.util.spec_from_loader("build_images", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_images"] = module
    loader.exec_module(module)
    return module


bi = _load()
BASE, CODE_INTERPRETER, OPERATOR = bi.IMAGES


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A checkout with what the Dockerfiles copy."""
    (tmp_path / "images" / "sandbox").mkdir(parents=True)
    shutil.copy(REPO / "images" / "sandbox" / "Dockerfile", tmp_path / "images" / "sandbox" / "Dockerfile")
    shutil.copy(REPO / "Dockerfile", tmp_path / "Dockerfile")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\nversion = "0.1.0"\n')
    (tmp_path / "README.md").write_text("# x\n")
    package = tmp_path / "operator" / "sandbox_operator"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "agent.py").write_text("print('agent')\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.md").write_text("not copied\n")
    return tmp_path


def key(repo: Path, image: object = BASE, base: str = "0" * 16, script: bytes = b"script") -> str:
    dockerfile = repo / ("Dockerfile" if image is OPERATOR else "images/sandbox/Dockerfile")
    result: str = bi.image_key(repo, image, dockerfile, base, script)
    return result


def test_key_is_stable_and_16_hex(repo: Path) -> None:
    first = key(repo)
    assert first == key(repo)
    assert len(first) == 16 and int(first, 16) >= 0


def test_key_changes_with_every_input(repo: Path) -> None:
    before = key(repo)
    (repo / "operator" / "sandbox_operator" / "agent.py").write_text("print('changed')\n")
    after_source = key(repo)
    assert after_source != before
    (repo / "operator" / "sandbox_operator" / "new_untracked.py").write_text("")
    after_new_file = key(repo)
    assert after_new_file != after_source
    (repo / "README.md").write_text("# y\n")
    after_readme = key(repo)
    assert after_readme != after_new_file
    with open(repo / "images" / "sandbox" / "Dockerfile", "a") as f:
        f.write("# a comment is still a change\n")
    after_dockerfile = key(repo)
    assert after_dockerfile != after_readme
    assert key(repo, base="1" * 16) != after_dockerfile
    assert key(repo, script=b"other script") != after_dockerfile


def test_key_ignores_pycache_and_uncopied_files(repo: Path) -> None:
    before = key(repo)
    cache = repo / "operator" / "sandbox_operator" / "__pycache__"
    cache.mkdir()
    (cache / "agent.cpython-311.pyc").write_bytes(b"\0bytecode")
    (repo / "docs" / "notes.md").write_text("edited\n")
    assert key(repo) == before


def test_targets_of_one_dockerfile_have_their_own_keys(repo: Path) -> None:
    assert len({key(repo, BASE), key(repo, CODE_INTERPRETER), key(repo, OPERATOR)}) == 3


def test_copied_sources_of_the_real_dockerfiles() -> None:
    sandbox = (REPO / "images" / "sandbox" / "Dockerfile").read_text()
    operator = (REPO / "Dockerfile").read_text()
    assert bi.copied_sources(sandbox) == ["pyproject.toml", "README.md*", "operator"]
    assert bi.copied_sources(operator) == ["pyproject.toml", "README.md", "operator"]
    text = 'COPY --chown=1:1 a b/ \\\n  c/\nCOPY --from=wheel /wheels /wheels\nADD ["x y", "/z"]\n'
    assert bi.copied_sources(text) == ["a", "b/", "x y"]


def test_base_key_covers_the_script_and_mirror() -> None:
    one = bi.base_key(b"a", "http://m/debian", "http://m/debian-security")
    assert one == bi.base_key(b"a", "http://m/debian", "http://m/debian-security")
    assert one != bi.base_key(b"b", "http://m/debian", "http://m/debian-security")
    assert one != bi.base_key(b"a", "http://n/debian", "http://m/debian-security")


def test_leak_check_finds_the_machine_ca_and_pip_config(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc" / "ssl" / "certs").mkdir(parents=True)
    bundle = rootfs / "etc" / "ssl" / "certs" / "ca-certificates.crt"
    bundle.write_text("-----BEGIN CERTIFICATE-----\nDEBIANCA\n-----END CERTIFICATE-----\n")
    marker = [(bi.MACHINE_CA_DIR / "egress.crt", "MACHINEONLY")]
    bi.check_no_build_secrets(rootfs, marker)
    bundle.write_text(bundle.read_text() + "MACHINEONLY\n")
    with pytest.raises(bi.BuildError, match="leaked"):
        bi.check_no_build_secrets(rootfs, marker)
    bundle.write_text("DEBIANCA\n")
    (rootfs / "etc" / "pip.conf").write_text("[global]\ncert = /x\n")
    with pytest.raises(bi.BuildError, match="pip"):
        bi.check_no_build_secrets(rootfs, marker)


def test_index_is_replaced_whole(tmp_path: Path) -> None:
    assert bi.read_index(tmp_path) == {}
    bi.write_index(tmp_path, {"ghcr.io/sandbox-operator/sandbox-base:dev": "base-0123456789abcdef"})
    assert bi.read_index(tmp_path) == {"ghcr.io/sandbox-operator/sandbox-base:dev": "base-0123456789abcdef"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json"]
    (tmp_path / "index.json").write_text("{not json")
    assert bi.read_index(tmp_path) == {}


def test_refs() -> None:
    assert bi.image_refs(CODE_INTERPRETER, "0.1.0") == [
        "ghcr.io/sandbox-operator/sandbox-code-interpreter:dev",
        "ghcr.io/sandbox-operator/sandbox-code-interpreter:0.1.0",
    ]
    assert bi.project_version(REPO) == "0.1.0"
