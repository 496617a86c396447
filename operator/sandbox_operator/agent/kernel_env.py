"""Environment variables for one execution (`run_code(..., envs=...)`), in each kernel's language.

The agent runs `apply` silently before the user's code and `restore` after it, so the variables are
seen by that execution only and the context's earlier values come back. Java has no mutable
process environment: as E2B's own interpreter does, its envs are system properties
(`System.getProperty`). Pure functions: the agent's interpreter sends the code.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class EnvCode:
    """Code that sets the variables (saving what was there) and code that puts the saved back."""

    apply: str
    restore: str


def _literal(value: str) -> str:
    """A double-quoted string literal that Python, JavaScript, R and Java all read back as `value`
    (JSON's escapes: \\", \\\\, \\n, \\uXXXX; never \\/)."""
    return json.dumps(value)


def _python(env: Mapping[str, str]) -> EnvCode:
    apply = (
        "import os as _e2b_os\n"
        f"_e2b_saved_env = {{k: _e2b_os.environ.get(k) for k in {list(env)!r}}}\n"
        f"_e2b_os.environ.update({dict(env)!r})"
    )
    restore = (
        "for _e2b_k, _e2b_v in _e2b_saved_env.items():\n"
        "    _e2b_os.environ.pop(_e2b_k, None) if _e2b_v is None "
        "else _e2b_os.environ.__setitem__(_e2b_k, _e2b_v)\n"
        "del _e2b_saved_env"
    )
    return EnvCode(apply, restore)


def _javascript(env: Mapping[str, str]) -> EnvCode:
    # Deno's kernel: process.env reads Deno.env. `void 0` keeps the cell from having a result.
    entries = "{" + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in env.items()) + "}"
    apply = (
        f"globalThis.__e2bSavedEnv = Object.fromEntries(Object.keys({entries}).map((k) => [k, Deno.env.get(k)]));\n"
        f"for (const [k, v] of Object.entries({entries})) Deno.env.set(k, v);\nvoid 0"
    )
    restore = (
        "for (const [k, v] of Object.entries(globalThis.__e2bSavedEnv ?? {})) "
        "v === undefined ? Deno.env.delete(k) : Deno.env.set(k, v);\n"
        "delete globalThis.__e2bSavedEnv;\nvoid 0"
    )
    return EnvCode(apply, restore)


def _r(env: Mapping[str, str]) -> EnvCode:
    names = "c(" + ", ".join(_literal(k) for k in env) + ")"
    values = "c(" + ", ".join(f"{_literal(k)} = {_literal(v)}" for k, v in env.items()) + ")"
    apply = f".e2b_saved_env <- Sys.getenv({names}, unset = NA, names = TRUE)\ndo.call(Sys.setenv, as.list({values}))"
    restore = (
        "for (.e2b_k in names(.e2b_saved_env)) {\n"
        "  if (is.na(.e2b_saved_env[[.e2b_k]])) Sys.unsetenv(.e2b_k)\n"
        "  else do.call(Sys.setenv, setNames(list(.e2b_saved_env[[.e2b_k]]), .e2b_k))\n"
        "}\nrm(.e2b_saved_env, .e2b_k)"
    )
    return EnvCode(apply, restore)


def _bash(env: Mapping[str, str]) -> EnvCode:
    names = " ".join(env)
    # declare -p prints what was set (exported or not) as code that sets it again; unset ones print nothing.
    apply = f"__e2b_saved_env=$(declare -p {names} 2>/dev/null)\n" + "\n".join(
        f"export {k}={shlex.quote(v)}" for k, v in env.items()
    )
    restore = f'unset {names}\neval "$__e2b_saved_env"\nunset __e2b_saved_env'
    return EnvCode(apply, restore)


def _java(env: Mapping[str, str]) -> EnvCode:
    saves = "".join(f"__e2bSavedEnv.put({_literal(k)}, System.getProperty({_literal(k)}));" for k in env)
    sets = "".join(f"System.setProperty({_literal(k)}, {_literal(v)});" for k, v in env.items())
    apply = f"var __e2bSavedEnv = new java.util.HashMap<String, String>();{saves}{sets}"
    restore = (
        "for (var __e2bEntry : __e2bSavedEnv.entrySet()) { if (__e2bEntry.getValue() == null) "
        "System.clearProperty(__e2bEntry.getKey()); else System.setProperty(__e2bEntry.getKey(), "
        "__e2bEntry.getValue()); }"
    )
    return EnvCode(apply, restore)


_BUILDERS = {"python": _python, "javascript": _javascript, "r": _r, "bash": _bash, "java": _java}


def env_code(language: str, env: Mapping[str, str]) -> EnvCode | None:
    """The code for a canonical language (interpreter.LANGUAGE_ALIASES), None for one without it.
    Names are the SDK's (checked by the caller to be environment variable names)."""
    builder = _BUILDERS.get(language)
    return builder(env) if builder is not None and env else None
