"""Which OS user an operation runs as, and the per-sandbox state set through /init."""

from __future__ import annotations

import base64
import binascii
import os
import pwd
from dataclasses import dataclass, field
from pathlib import Path

from .config import AgentConfig

# The SDK's default username for old envd versions; it means "the sandbox's default user".
SDK_DEFAULT_USERNAME = "user"


# Linux's PATH_MAX and NAME_MAX: longer is ENAMETOOLONG at every call, so a request error.
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255


class PathError(ValueError):
    """A path no file can have (a NUL byte): the request is wrong (400 / invalid_argument)."""


def check_path_text(path: str, what: str = "path") -> str:
    """`path` when the OS can take it; PathError for a NUL byte, text that has no file-name bytes
    (open() would raise ValueError) or a name too long for Linux."""
    if "\x00" in path:
        raise PathError(f"{what} must not contain a NUL byte")
    try:
        encoded = os.fsencode(path)
    except UnicodeError as error:
        raise PathError(f"{what} is not a valid file name") from error
    if len(encoded) >= MAX_PATH_BYTES or any(len(part) > MAX_NAME_BYTES for part in encoded.split(b"/")):
        raise PathError(f"{what} is too long (a name over {MAX_NAME_BYTES} bytes or {MAX_PATH_BYTES} in all)")
    return path


class UserError(Exception):
    """A requested user that cannot be used; status is the HTTP status envd answers with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class UserContext:
    name: str
    uid: int
    gid: int
    home: Path
    # True when the agent must switch to this user (it runs as root and the user differs).
    switch: bool

    def resolve(self, path: str) -> Path:
        """Absolute path for an SDK path: relative paths and ~ resolve against the user's home.
        PathError for a path no file can have."""
        check_path_text(path)
        if path == "~" or path.startswith("~/"):
            path = str(self.home) + path[1:]
        resolved = Path(path)
        if not resolved.is_absolute():
            resolved = self.home / resolved
        return Path(os.path.normpath(resolved))


@dataclass
class SandboxState:
    """Mutable sandbox-wide settings; /init may change them after start."""

    config: AgentConfig
    access_token: str | None
    env_vars: dict[str, str] = field(default_factory=dict)
    default_user: str | None = None
    default_workdir: Path | None = None

    @property
    def workdir(self) -> Path:
        return self.default_workdir or self.config.workdir

    def user(self, requested: str | None) -> UserContext:
        """The user for a request (None = default user)."""
        my_name = current_user_name()
        name = requested or self.default_user
        if name and "\x00" in name:
            raise UserError("invalid user name: it contains a NUL byte", 400)
        if not name or name == my_name or (name == SDK_DEFAULT_USERNAME and not _user_exists(name)):
            return UserContext(my_name, os.getuid(), os.getgid(), self.config.workdir, switch=False)
        try:
            entry = pwd.getpwnam(name)
        except KeyError as error:
            raise UserError(f"error looking up user '{name}': unknown user {name}", 401) from error
        if os.getuid() != 0:
            raise UserError(f"cannot act as user '{name}': the agent runs as non-root user '{my_name}'", 403)
        home = self.config.workdir if name == self.default_user else Path(entry.pw_dir)
        return UserContext(entry.pw_name, entry.pw_uid, entry.pw_gid, home, switch=True)


def current_user_name() -> str:
    """The agent's user name; its uid as text when /etc/passwd has no entry for it (a template's
    runAsUser need not exist in the image)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def username_from_basic_auth(header: str | None) -> str | None:
    """Authorization: Basic base64("<user>:") → user (the SDK's way to pick a user)."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.partition(":")[0] or None
