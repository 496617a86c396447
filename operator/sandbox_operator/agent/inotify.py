"""A minimal inotify binding (ctypes) driving directory watches from the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .uploadfile import TEMPORARY_NAME

IN_MODIFY: Final = 0x00000002
IN_ATTRIB: Final = 0x00000004
IN_CLOSE_WRITE: Final = 0x00000008
IN_MOVED_FROM: Final = 0x00000040
IN_MOVED_TO: Final = 0x00000080
IN_CREATE: Final = 0x00000100
IN_DELETE: Final = 0x00000200
IN_DELETE_SELF: Final = 0x00000400
IN_MOVE_SELF: Final = 0x00000800
IN_Q_OVERFLOW: Final = 0x00004000
IN_IGNORED: Final = 0x00008000
IN_ONLYDIR: Final = 0x01000000
IN_ISDIR: Final = 0x40000000
IN_NONBLOCK: Final = 0o4000
IN_CLOEXEC: Final = 0o2000000

WATCH_MASK: Final = (
    IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF
)
_EVENT_HEADER: Final = struct.Struct("iIII")

# FilesystemEvent.type names, in the order fsnotify (envd) reports them.
EVENT_CREATE: Final = "EVENT_TYPE_CREATE"
EVENT_WRITE: Final = "EVENT_TYPE_WRITE"
EVENT_REMOVE: Final = "EVENT_TYPE_REMOVE"
EVENT_RENAME: Final = "EVENT_TYPE_RENAME"
EVENT_CHMOD: Final = "EVENT_TYPE_CHMOD"

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def event_type(mask: int) -> str | None:
    """inotify mask → FilesystemEvent type (moved-to counts as a create, like fsnotify)."""
    if mask & (IN_CREATE | IN_MOVED_TO):
        return EVENT_CREATE
    if mask & IN_MODIFY:
        return EVENT_WRITE
    if mask & (IN_DELETE | IN_DELETE_SELF):
        return EVENT_REMOVE
    if mask & (IN_MOVED_FROM | IN_MOVE_SELF):
        return EVENT_RENAME
    if mask & IN_ATTRIB:
        return EVENT_CHMOD
    return None


def parse_records(buffer: bytes) -> list[tuple[int, int, int, str]]:
    """Split a read() of an inotify fd into (watch descriptor, mask, cookie, name) records (the
    cookie pairs the moved-from and moved-to records of one rename)."""
    records: list[tuple[int, int, int, str]] = []
    offset = 0
    while offset + _EVENT_HEADER.size <= len(buffer):
        wd, mask, cookie, length = _EVENT_HEADER.unpack_from(buffer, offset)
        offset += _EVENT_HEADER.size
        raw_name = buffer[offset : offset + length]
        offset += length
        records.append((wd, mask, cookie, raw_name.rstrip(b"\0").decode(errors="surrogateescape")))
    return records


def parse_events(buffer: bytes) -> list[tuple[int, int, str]]:
    """Split a read() of an inotify fd into (watch descriptor, mask, name) records."""
    return [(wd, mask, name) for wd, mask, _cookie, name in parse_records(buffer)]


@dataclass(frozen=True)
class WatchEvent:
    name: str  # relative to the watched root
    type: str
    path: Path


class DirectoryWatch:
    """Watches one directory (optionally recursively); calls on_event for every change."""

    def __init__(self, root: Path, recursive: bool, on_event: Callable[[WatchEvent], None]) -> None:
        self.root = root
        self.recursive = recursive
        self._on_event = on_event
        self._directories: dict[int, Path] = {}
        self._uploads_renamed: set[int] = set()  # cookies of uploads' temporary files renamed away
        fd = _lib().inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self._fd: int | None = fd
        try:
            self._add(root)
            if recursive:
                for directory, _dirs, _files in os.walk(root):
                    if Path(directory) != root:
                        self._add(Path(directory))
        except BaseException:
            self.close()
            raise
        asyncio.get_running_loop().add_reader(fd, self._readable)

    def _add(self, directory: Path) -> None:
        assert self._fd is not None
        wd = _lib().inotify_add_watch(self._fd, os.fsencode(directory), WATCH_MASK | IN_ONLYDIR)
        if wd < 0:
            error = ctypes.get_errno()
            raise OSError(error, f"cannot watch '{directory}': {os.strerror(error)}")
        self._directories[wd] = directory

    def _readable(self) -> None:
        if self._fd is None:
            return
        try:
            buffer = os.read(self._fd, 64 * 1024)
        except BlockingIOError:
            return
        for wd, mask, cookie, name in parse_records(buffer):
            directory = self._directories.get(wd)
            if mask & IN_IGNORED:
                self._directories.pop(wd, None)
                continue
            if directory is None:
                continue
            if TEMPORARY_NAME.fullmatch(name):
                # An upload's temporary file (uploadfile.py) is not reported; its rename over the
                # destination is, below, as a write in place would show it.
                if mask & IN_MOVED_FROM:
                    if len(self._uploads_renamed) >= 1024:
                        self._uploads_renamed.clear()  # renamed out of every watched directory
                    self._uploads_renamed.add(cookie)
                continue
            path = directory / name if name else directory
            if self.recursive and mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
                with contextlib.suppress(OSError):
                    self._add(path)
            if path == self.root and (mask & (IN_DELETE_SELF | IN_MOVE_SELF)) == 0:
                continue
            kind = event_type(mask)
            if kind is None:
                continue
            relative = os.path.relpath(path, self.root) if path != self.root else path.name
            self._on_event(WatchEvent(relative, kind, path))
            if mask & IN_MOVED_TO and cookie in self._uploads_renamed:
                self._uploads_renamed.discard(cookie)
                self._on_event(WatchEvent(relative, EVENT_WRITE, path))  # the upload's content

    def close(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(RuntimeError):  # no running loop during interpreter teardown
            asyncio.get_running_loop().remove_reader(self._fd)
        os.close(self._fd)
        self._fd = None
