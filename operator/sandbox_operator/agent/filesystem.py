"""filesystem.Filesystem: entry info, directory operations and watchers (blocking parts run in threads)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import os
import pwd
import secrets
import shutil
import stat
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Final, TypeVar

from .connect import ConnectError, JsonObject
from .inotify import DirectoryWatch, WatchEvent
from .protojson import format_timestamp
from .users import UserContext

METADATA_XATTR_PREFIX: Final = "user.e2b."
MAX_WATCHER_EVENTS: Final = 10_000
FILE_TYPE_FILE: Final = "FILE_TYPE_FILE"
FILE_TYPE_DIRECTORY: Final = "FILE_TYPE_DIRECTORY"
FILE_TYPE_SYMLINK: Final = "FILE_TYPE_SYMLINK"

T = TypeVar("T")


@lru_cache(maxsize=256)
def _owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@lru_cache(maxsize=256)
def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def read_metadata(path: Path) -> dict[str, str]:
    try:
        names = os.listxattr(path)
    except OSError:
        return {}
    metadata: dict[str, str] = {}
    for name in names:
        if name.startswith(METADATA_XATTR_PREFIX):
            with contextlib.suppress(OSError):
                metadata[name[len(METADATA_XATTR_PREFIX) :]] = os.getxattr(path, name).decode(errors="replace")
    return metadata


def write_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Replace the file's user metadata with exactly these keys (envd semantics)."""
    try:
        existing = [name for name in os.listxattr(path) if name.startswith(METADATA_XATTR_PREFIX)]
    except OSError as error:
        if error.errno in (errno.ENOTSUP, errno.EOPNOTSUPP) and not metadata:
            return
        raise
    for name in existing:
        if name[len(METADATA_XATTR_PREFIX) :] not in metadata:
            os.removexattr(path, name)
    for key, value in metadata.items():
        os.setxattr(path, METADATA_XATTR_PREFIX + key, value.encode())


def entry_info(path: Path, include_metadata: bool = True) -> JsonObject:
    """EntryInfo for path (proto3 JSON). Raises FileNotFoundError when it does not exist."""
    link = os.lstat(path)
    is_symlink = stat.S_ISLNK(link.st_mode)
    info = link
    symlink_target: str | None = None
    if is_symlink:
        # Absolute and resolved, like envd's (a relative readlink value means nothing to a client).
        symlink_target = os.path.realpath(path)
        with contextlib.suppress(OSError):
            info = os.stat(path)
    if stat.S_ISDIR(info.st_mode):
        file_type = FILE_TYPE_DIRECTORY
    elif stat.S_ISLNK(info.st_mode):
        file_type = FILE_TYPE_SYMLINK
    else:
        file_type = FILE_TYPE_FILE
    entry: JsonObject = {
        "name": path.name,
        "type": file_type,
        "path": str(path),
        "size": str(info.st_size),
        # The permission bits only (envd's FileMode.Perm()), in both: a directory made under the
        # setgid home (the volume's fsGroup) reports 0o755 and drwxr-xr-x, as it does under E2B's.
        "mode": stat.S_IMODE(info.st_mode) & 0o777,
        "permissions": stat.filemode(stat.S_IFMT(info.st_mode) | (info.st_mode & 0o777)),
        "owner": _owner_name(info.st_uid),
        "group": _group_name(info.st_gid),
        "modifiedTime": format_timestamp(info.st_mtime_ns),
    }
    if symlink_target is not None:
        entry["symlinkTarget"] = symlink_target
        entry["isSymlink"] = True
    if include_metadata and file_type == FILE_TYPE_FILE:
        metadata = read_metadata(path)
        if metadata:
            entry["metadata"] = metadata
    return entry


def _not_found(path: Path) -> ConnectError:
    return ConnectError("not_found", f"path '{path}' does not exist")


def os_error_to_connect(error: OSError, path: Path) -> ConnectError:
    if isinstance(error, FileNotFoundError):
        return _not_found(path)
    if isinstance(error, FileExistsError):
        return ConnectError("already_exists", f"path '{path}' already exists")
    if isinstance(error, PermissionError):
        return ConnectError("permission_denied", f"permission denied: '{path}'")
    if isinstance(error, NotADirectoryError):
        return ConnectError("invalid_argument", f"path '{path}' is not a directory")
    if error.errno in (errno.ELOOP, errno.ENAMETOOLONG, errno.EINVAL):
        return ConnectError("invalid_argument", f"{error.strerror or error} ('{path}')")
    if error.errno == errno.ENOSPC:
        return ConnectError("resource_exhausted", "not enough disk space available")
    return ConnectError("internal", f"{error.strerror or error} ('{path}')")


def make_dirs_as(path: Path, user: UserContext) -> None:
    """mkdir -p, handing directories it creates to the user when the agent acts for someone else."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir()
            if user.switch:
                os.chown(directory, user.uid, user.gid)


class FilesystemService:
    def __init__(self) -> None:
        self._watchers: dict[str, tuple[DirectoryWatch, list[JsonObject]]] = {}

    @staticmethod
    async def _run(function: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, function)

    async def stat(self, path: Path) -> JsonObject:
        def run() -> JsonObject:
            try:
                return {"entry": entry_info(path)}
            except OSError as error:
                raise os_error_to_connect(error, path) from error

        return await self._run(run)

    async def make_dir(self, path: Path, user: UserContext) -> JsonObject:
        def run() -> JsonObject:
            if os.path.lexists(path):
                if path.is_dir():
                    raise ConnectError("already_exists", f"directory '{path}' already exists")
                raise ConnectError("invalid_argument", f"path '{path}' already exists and is not a directory")
            try:
                make_dirs_as(path, user)
                return {"entry": entry_info(path)}
            except OSError as error:
                raise os_error_to_connect(error, path) from error

        return await self._run(run)

    async def move(self, source: Path, destination: Path, user: UserContext) -> JsonObject:
        def run() -> JsonObject:
            if not os.path.lexists(source):
                raise _not_found(source)
            try:
                make_dirs_as(destination.parent, user)
                os.rename(source, destination)
                return {"entry": entry_info(destination)}
            except OSError as error:
                raise os_error_to_connect(error, source) from error

        return await self._run(run)

    async def list_dir(self, path: Path, depth: int) -> JsonObject:
        def run() -> JsonObject:
            try:
                if not path.is_dir():
                    if not path.exists():
                        raise _not_found(path)
                    raise ConnectError("invalid_argument", f"path '{path}' is not a directory")
                entries: list[JsonObject] = []
                self._collect(path, max(depth, 1), entries)
                return {"entries": entries}
            except RecursionError as error:  # a tree nested ~1000 deep listed with a depth as large
                raise ConnectError("invalid_argument", "the tree is too deep to list; pass a smaller depth") from error
            except OSError as error:
                raise os_error_to_connect(error, path) from error

        return await self._run(run)

    def _collect(self, directory: Path, depth: int, entries: list[JsonObject]) -> None:
        with os.scandir(directory) as iterator:
            children = sorted(iterator, key=lambda item: item.name)
        for child in children:
            child_path = Path(child.path)
            try:
                entries.append(entry_info(child_path))
            except FileNotFoundError:
                continue
            if depth > 1 and child.is_dir(follow_symlinks=False):
                with contextlib.suppress(PermissionError):
                    self._collect(child_path, depth - 1, entries)

    async def remove(self, path: Path) -> JsonObject:
        def run() -> JsonObject:
            # Like envd (os.RemoveAll): removing what is not there succeeds, as E2B's SDK tests expect.
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
            except FileNotFoundError:
                pass
            except OSError as error:
                raise os_error_to_connect(error, path) from error
            return {}

        return await self._run(run)

    def open_watch(
        self, path: Path, recursive: bool, include_entry: bool, deliver: Callable[[JsonObject], None]
    ) -> DirectoryWatch:
        if not path.exists():
            raise _not_found(path)
        if not path.is_dir():
            raise ConnectError("invalid_argument", f"path '{path}' is not a directory")

        def on_event(event: WatchEvent) -> None:
            message: JsonObject = {"name": event.name, "type": event.type}
            if include_entry and event.type not in ("EVENT_TYPE_REMOVE", "EVENT_TYPE_RENAME"):
                with contextlib.suppress(OSError):
                    message["entry"] = entry_info(event.path, include_metadata=False)
            deliver(message)

        try:
            return DirectoryWatch(path, recursive, on_event)
        except OSError as error:
            raise os_error_to_connect(error, path) from error

    def create_watcher(self, path: Path, recursive: bool, include_entry: bool) -> str:
        events: list[JsonObject] = []

        def deliver(message: JsonObject) -> None:
            if len(events) < MAX_WATCHER_EVENTS:
                events.append(message)

        watch = self.open_watch(path, recursive, include_entry, deliver)
        watcher_id = secrets.token_hex(8)
        self._watchers[watcher_id] = (watch, events)
        return watcher_id

    def watcher_events(self, watcher_id: str) -> list[JsonObject]:
        entry = self._watchers.get(watcher_id)
        if entry is None:
            raise ConnectError("not_found", f"watcher '{watcher_id}' not found")
        _, events = entry
        drained = list(events)
        events.clear()
        return drained

    def remove_watcher(self, watcher_id: str) -> None:
        entry = self._watchers.pop(watcher_id, None)
        if entry is None:
            raise ConnectError("not_found", f"watcher '{watcher_id}' not found")
        entry[0].close()

    def close(self) -> None:
        for watch, _ in self._watchers.values():
            watch.close()
        self._watchers.clear()
