"""run_code and code contexts through the unmodified e2b-code-interpreter SDK."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest
from e2b import NotFoundException, SandboxException


def test_state_is_kept_across_calls(code_sandbox: Any) -> None:
    code_sandbox.run_code("counter = 40")
    execution = code_sandbox.run_code("counter += 2\nprint('side', 'effect')\ncounter")
    assert execution.text == "42"
    assert execution.logs.stdout == ["side effect\n"]
    assert execution.error is None
    assert execution.execution_count is not None and execution.execution_count >= 2


def test_error_carries_name_value_and_traceback(code_sandbox: Any) -> None:
    execution = code_sandbox.run_code("def f():\n    raise ValueError('bad value')\nf()")
    assert execution.error is not None
    assert (execution.error.name, execution.error.value) == ("ValueError", "bad value")
    plain = re.sub(r"\x1b\[[0-9;]*m", "", execution.error.traceback)
    assert "raise ValueError('bad value')" in plain
    assert execution.results == []


def test_stderr_and_callbacks(code_sandbox: Any) -> None:
    seen: list[str] = []
    execution = code_sandbox.run_code(
        "import sys\nsys.stderr.write('warn\\n')", on_stderr=lambda message: seen.append(message.line)
    )
    assert execution.logs.stderr == ["warn\n"]
    assert seen == ["warn\n"]


def test_matplotlib_chart_comes_back_as_png(code_sandbox: Any) -> None:
    execution = code_sandbox.run_code(
        "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [3, 1, 2])\nplt.title('t')\nplt.show()"
    )
    assert execution.error is None
    pngs = [result.png for result in execution.results if result.png]
    assert len(pngs) == 1
    assert base64.b64decode(pngs[0]).startswith(b"\x89PNG\r\n\x1a\n")


def test_html_result_from_display(code_sandbox: Any) -> None:
    execution = code_sandbox.run_code("from IPython.display import HTML, display\ndisplay(HTML('<b>bold</b>'))")
    assert [result.html for result in execution.results] == ["<b>bold</b>"]
    assert execution.results[0].is_main_result is False


def test_env_vars_apply_to_one_call_only(code_sandbox: Any) -> None:
    with_env = code_sandbox.run_code("import os\nos.environ.get('ONLY_NOW')", envs={"ONLY_NOW": "yes"})
    without = code_sandbox.run_code("os.environ.get('ONLY_NOW', 'unset')")
    assert (with_env.text, without.text) == ("yes", "unset")


def test_separate_contexts_have_separate_state(code_sandbox: Any, agent: Any) -> None:
    context = code_sandbox.create_code_context(cwd=str(agent.workdir))
    try:
        assert context.language == "python"
        assert context.id in [listed.id for listed in code_sandbox.list_code_contexts()]
        code_sandbox.run_code("isolated = 1", context=context)
        assert code_sandbox.run_code("'isolated' in dir()", context=context).text == "True"
        assert code_sandbox.run_code("'isolated' in dir()").text == "False"
        code_sandbox.restart_code_context(context)
        assert code_sandbox.run_code("'isolated' in dir()", context=context).text == "False"
    finally:
        code_sandbox.remove_code_context(context)
    assert context.id not in [listed.id for listed in code_sandbox.list_code_contexts()]


def test_unknown_context_is_not_found(code_sandbox: Any) -> None:
    with pytest.raises(NotFoundException):
        code_sandbox.remove_code_context("no-such-context")


def test_language_without_kernel_is_a_clear_error(code_sandbox: Any) -> None:
    with pytest.raises(SandboxException, match=r"not available|unsupported language"):
        code_sandbox.run_code("1", language="r")


async def test_async_sdk_runs_code(sdk_options: dict[str, Any]) -> None:
    from e2b_code_interpreter import AsyncSandbox

    sandbox = await AsyncSandbox.create(**sdk_options)
    execution = await sandbox.run_code("6 * 7")
    assert execution.text == "42"
