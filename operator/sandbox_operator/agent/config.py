"""Agent configuration: command-line flags with environment-variable defaults (the operator's contract)."""

from __future__ import annotations

import argparse
import os
import pwd
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sandbox_operator.api.names import AGENT_TOKEN_ENV, ENVD_PORT, INTERPRETER_PORT

DEFAULT_MAX_OUTPUT_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_CONCURRENT_EXECUTIONS = 64
DEFAULT_MAX_UPLOAD_BYTES = 1024 * 1024 * 1024
DEFAULT_MAX_RPC_BODY_BYTES = 8 * 1024 * 1024
# Slow clients (docs/agent.md, "Limits"): seconds from a request's first byte to the end of its
# headers; an idle connection (none begun since it opened or since the last response; longer than the
# gateway's 60 s client pool, so the gateway closes first); a body read whole, or a pause in a
# streamed one.
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_KEEPALIVE_TIMEOUT = 75.0
DEFAULT_BODY_TIMEOUT = 60.0

# Never handed to user processes or kernels, whichever layer (the agent's environment, /init's
# envVars, a request's envs) would set them: they would let sandboxed code call the agent and mint
# signed URLs.
SECRET_ENV_VARS = frozenset({AGENT_TOKEN_ENV})


def without_secrets(env: Mapping[str, str]) -> dict[str, str]:
    """`env` less SECRET_ENV_VARS: the last step of every environment the agent hands to a child."""
    return {key: value for key, value in env.items() if key not in SECRET_ENV_VARS}


@dataclass(frozen=True)
class AgentConfig:
    host: str = "0.0.0.0"
    envd_port: int = ENVD_PORT
    interpreter_port: int = INTERPRETER_PORT
    workdir: Path = field(default_factory=lambda: default_workdir({}))
    sandbox_id: str = ""
    access_token: str | None = None
    execution_timeout: float = 0.0
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    max_concurrent_executions: int = DEFAULT_MAX_CONCURRENT_EXECUTIONS
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_rpc_body_bytes: int = DEFAULT_MAX_RPC_BODY_BYTES
    prewarm_kernel: bool = False
    enable_interpreter: bool = True
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT


def default_workdir(env: Mapping[str, str]) -> Path:
    """SANDBOX_WORKDIR, else /home/user when it exists (the images), else the current user's home."""
    configured = env.get("SANDBOX_WORKDIR")
    if configured:
        return Path(configured)
    image_home = Path("/home/user")
    if image_home.is_dir():
        return image_home
    try:
        return Path(pwd.getpwuid(os.getuid()).pw_dir)
    except KeyError:  # a uid without a passwd entry (any runAsUser works)
        return Path(env.get("HOME") or Path.cwd())


def _env_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError as error:
        raise SystemExit(f"{name} must be a number, got {raw!r}") from error
    if value < 0:
        raise SystemExit(f"{name} must not be negative, got {raw!r}")
    return value


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    return int(_env_float(env, name, float(default)))


def _env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    return raw in {"1", "true", "yes", "on"}


def parse_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> AgentConfig:
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(
        prog="sandbox-agent",
        description="In-sandbox agent: envd-compatible API and code interpreter for the E2B SDKs.",
    )
    parser.add_argument("--host", default=env.get("SANDBOX_AGENT_HOST", "0.0.0.0"), help="bind address")
    parser.add_argument("--envd-port", type=int, default=_env_int(env, "SANDBOX_ENVD_PORT", ENVD_PORT))
    parser.add_argument(
        "--interpreter-port",
        type=int,
        default=_env_int(env, "SANDBOX_INTERPRETER_PORT", INTERPRETER_PORT),
        help="code interpreter port; 0 disables the separate listener",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="workspace and default user's home")
    parser.add_argument(
        "--execution-timeout",
        type=float,
        default=_env_float(env, "SANDBOX_EXECUTION_TIMEOUT", 0.0),
        help="seconds a process or code execution may run; 0 = no limit",
    )
    parser.add_argument(
        "--max-output-bytes",
        type=int,
        default=_env_int(env, "SANDBOX_MAX_OUTPUT_BYTES", DEFAULT_MAX_OUTPUT_BYTES),
        help="output kept per execution before truncation; 0 = no limit",
    )
    parser.add_argument(
        "--max-concurrent-executions",
        type=int,
        default=_env_int(env, "SANDBOX_MAX_CONCURRENT_EXECUTIONS", DEFAULT_MAX_CONCURRENT_EXECUTIONS),
        help="processes plus code executions running at once; 0 = no limit",
    )
    parser.add_argument(
        "--max-upload-bytes",
        type=int,
        default=_env_int(env, "SANDBOX_MAX_UPLOAD_BYTES", DEFAULT_MAX_UPLOAD_BYTES),
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=_env_float(env, "SANDBOX_HEADER_TIMEOUT", DEFAULT_HEADER_TIMEOUT),
        help="seconds from a request's first byte to the end of its headers; 0 = no limit",
    )
    parser.add_argument(
        "--keepalive-timeout",
        type=float,
        default=_env_float(env, "SANDBOX_KEEPALIVE_TIMEOUT", DEFAULT_KEEPALIVE_TIMEOUT),
        help="seconds an idle connection is kept (also the wait for a first request)",
    )
    parser.add_argument(
        "--body-timeout",
        type=float,
        default=_env_float(env, "SANDBOX_BODY_TIMEOUT", DEFAULT_BODY_TIMEOUT),
        help="seconds a body read whole may take, and a streamed body may pause; 0 = no limit",
    )
    parser.add_argument(
        "--prewarm-kernel",
        action=argparse.BooleanOptionalAction,
        default=_env_bool(env, "SANDBOX_PREWARM_KERNEL", False),
        help="start the default Python kernel at startup instead of on first use",
    )
    args = parser.parse_args(argv)
    workdir: Path = args.workdir if args.workdir is not None else default_workdir(env)
    token = env.get(AGENT_TOKEN_ENV) or None
    return AgentConfig(
        host=args.host,
        envd_port=args.envd_port,
        interpreter_port=args.interpreter_port,
        workdir=workdir.resolve(),
        sandbox_id=env.get("SANDBOX_ID", ""),
        access_token=token,
        execution_timeout=max(0.0, args.execution_timeout),
        max_output_bytes=max(0, args.max_output_bytes),
        max_concurrent_executions=max(0, args.max_concurrent_executions),
        max_upload_bytes=max(0, args.max_upload_bytes),
        prewarm_kernel=args.prewarm_kernel,
        header_timeout=max(0.0, args.header_timeout),
        keepalive_timeout=args.keepalive_timeout if args.keepalive_timeout > 0 else DEFAULT_KEEPALIVE_TIMEOUT,
        body_timeout=max(0.0, args.body_timeout),
    )
