"""Per-execution environment variables in each kernel's language (agent/kernel_env.py). Python's and
bash's code is run for real here, the way a kernel runs it (apply, the user's code, restore, all in
one session); JavaScript (Deno) and R are run by the e2e kernel tests in the code-interpreter image."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sandbox_operator.agent.interpreter_errors import InterpreterError
from sandbox_operator.agent.interpreter_http import execute_request
from sandbox_operator.agent.kernel_env import env_code

# Values a naive quoting would break: quotes of both kinds, a backslash, a newline, `$(...)`, unicode.
AWKWARD = 'it\'s "quoted" \\ back\nslash $(echo injected) `id` é ✓'


def test_python_sets_for_one_execution_and_restores_what_was_there() -> None:
    code = env_code("python", {"ONLY_NOW": AWKWARD, "KEPT": "new"})
    assert code is not None
    script = "\n".join(
        [
            "import os",
            "os.environ['KEPT'] = 'old'",
            code.apply,
            "print(repr(os.environ['ONLY_NOW']), os.environ['KEPT'])",
            code.restore,
            "print('ONLY_NOW' in os.environ, os.environ['KEPT'])",
        ]
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [f"{AWKWARD!r} new", "False old"]


def test_bash_sets_for_one_execution_and_restores_what_was_there() -> None:
    code = env_code("bash", {"ONLY_NOW": AWKWARD, "KEPT": "new", "LOCAL": "exported now"})
    assert code is not None
    script = "\n".join(
        [
            "export KEPT=old",
            "LOCAL='not exported'",
            code.apply,
            'printf "%s|%s|%s\\n" "$ONLY_NOW" "$KEPT" "$(bash -c \'echo "$LOCAL"\')"',
            code.restore,
            'printf "%s|%s|%s|%s\\n" "${ONLY_NOW-unset}" "$KEPT" "$LOCAL" "$(bash -c \'echo "${LOCAL-unexported}"\')"',
        ]
    )
    env = {"PATH": os.environ["PATH"]}
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True, env=env).stdout
    assert out == f"{AWKWARD}|new|exported now\nunset|old|not exported|unexported\n"


@pytest.mark.parametrize(
    ("language", "sets", "restores"),
    [
        ("javascript", "Deno.env.set(k, v)", "Deno.env.delete(k)"),
        ("r", "do.call(Sys.setenv", "Sys.unsetenv"),
        ("java", 'System.setProperty("FOO", "a \\"b\\"")', "System.clearProperty"),
    ],
)
def test_other_languages_get_code_of_their_own(language: str, sets: str, restores: str) -> None:
    code = env_code(language, {"FOO": 'a "b"'})
    assert code is not None
    assert sets in code.apply and restores in code.restore
    assert '"FOO"' in code.apply and '"a \\"b\\""' in code.apply  # one literal form for all of them


def test_no_code_without_variables_or_for_an_unknown_language() -> None:
    assert env_code("python", {}) is None
    assert env_code("cobol", {"A": "b"}) is None


@pytest.mark.parametrize("name", ["", "1ABC", "A-B", "A B", "A=B", "$(id)", "A;B"])
def test_an_execution_refuses_a_name_no_kernel_could_set(name: str) -> None:
    with pytest.raises(InterpreterError, match="invalid environment variable name") as refused:
        execute_request({"code": "1", "env_vars": {name: "x"}})
    assert refused.value.status == 400


def test_an_execution_takes_portable_names() -> None:
    request = execute_request({"code": "1", "env_vars": {"_A1": "x", "abc": "y"}})
    assert request.env_vars == {"_A1": "x", "abc": "y"}
