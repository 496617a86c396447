"""The kernel extension's pure parts (agent/kernel_display.py): telling library classes apart
without importing the library, and running a hook once a module is imported. The whole extension
runs in the code-interpreter image: tests/e2e/test_e2e_kernels.py."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import pytest

from sandbox_operator.agent.kernel_display import AfterImport, is_instance_of


def _class(module: str, name: str) -> type:
    return type(name, (), {"__module__": module})


@pytest.mark.parametrize("module", ["pandas", "pandas.core.frame"])  # pandas 3, pandas 2
def test_a_class_is_recognized_by_package_and_name_in_any_module_of_the_package(module: str) -> None:
    frame = _class(module, "DataFrame")
    assert is_instance_of(frame(), "pandas", "DataFrame")
    assert is_instance_of(type("Sub", (frame,), {})(), "pandas", "DataFrame")  # subclasses too


@pytest.mark.parametrize(
    ("module", "name"), [("pandasx", "DataFrame"), ("pandas", "Series"), ("mypandas", "DataFrame")]
)
def test_other_classes_are_not(module: str, name: str) -> None:
    assert not is_instance_of(_class(module, name)(), "pandas", "DataFrame")


def test_a_hook_runs_once_when_the_module_is_imported_and_then_leaves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "hookedpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "target.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen: list[ModuleType] = []
    hook = AfterImport("hookedpkg.target", seen.append)
    sys.meta_path.insert(0, hook)
    try:
        import hookedpkg.target  # type: ignore[import-not-found]

        assert seen == [hookedpkg.target] and hookedpkg.target.VALUE == 1  # after the module ran
        assert hook not in sys.meta_path
    finally:
        if hook in sys.meta_path:
            sys.meta_path.remove(hook)
        for name in ("hookedpkg.target", "hookedpkg"):
            sys.modules.pop(name, None)
