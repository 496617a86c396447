"""Where an upload's bytes go until the upload is complete: a temporary file next to its destination,
renamed over it once everything is written (and removed if the upload fails). An upload cut short
(the client or the gateway gone mid-body, a stalled body, the size cap, a full disk) so leaves the
destination as it was, never a truncated file; a reader sees the old file or the whole new one.

A replaced file keeps what a write in place keeps: its permission bits and, when the agent runs as
root, its owner (or, acting for a user, the file goes to that user, as before); a symlink is followed
(its target is replaced, the link stays). What a rename cannot keep is still written in place: a
path that is not a regular file (a FIFO, a device), a file with other hard links (they would keep the
old content), a file in a directory the agent may not create files in, and, for a non-root agent, a
file owned by another user or not writable to it (the write then fails as before). The cost: until
the rename the disk holds the old and the new file.

Directory watches do not report the temporary file; the rename shows as a create and a write of
the destination (`inotify.DirectoryWatch`), what a write in place shows.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final

if TYPE_CHECKING:
    from .users import UserContext

TEMPORARY_PREFIX: Final = ".sandbox-upload-"
TEMPORARY_NAME: Final = re.compile(r"\.sandbox-upload-[0-9a-f]{16}")


@dataclass
class UploadFile:
    handle: IO[bytes]
    destination: Path  # the file the upload ends as (a symlink's target)
    temporary: Path | None  # where the bytes go until commit(); None: written in place

    @property
    def written(self) -> Path:
        """The file being written (its metadata is set there, before the commit)."""
        return self.temporary or self.destination

    def commit(self) -> None:
        """Once the handle is closed: the upload becomes the destination, in one step."""
        if self.temporary is not None:
            os.replace(self.temporary, self.destination)
            self.temporary = None

    def discard(self) -> None:
        """After a failure: the temporary file is removed (a write in place keeps what it wrote)."""
        with contextlib.suppress(OSError):
            self.handle.close()
        if self.temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.temporary)
            self.temporary = None


def open_upload(path: Path, user: UserContext) -> UploadFile:
    """The file an upload to `path` (whose directory exists) is written to."""
    destination = Path(os.path.realpath(path))
    try:
        existing: os.stat_result | None = os.stat(destination)
    except FileNotFoundError:
        existing = None
    if existing is None or _replaceable(destination, existing):
        try:
            fd, temporary = _create_temporary(destination.parent)
        except PermissionError:
            if existing is None:
                raise
        else:
            try:
                _take_over(fd, existing, user)
                return UploadFile(os.fdopen(fd, "wb"), destination, temporary)
            except BaseException:
                os.close(fd)
                os.unlink(temporary)
                raise
    handle = open(path, "wb")  # noqa: SIM115 - closed by the caller after streaming
    if user.switch:
        with contextlib.suppress(OSError):
            os.fchown(handle.fileno(), user.uid, user.gid)
    return UploadFile(handle, destination, None)


def _replaceable(destination: Path, existing: os.stat_result) -> bool:
    if not stat.S_ISREG(existing.st_mode) or existing.st_nlink != 1:
        return False
    if os.geteuid() == 0:
        return True
    return existing.st_uid == os.geteuid() and os.access(destination, os.W_OK)


def _create_temporary(directory: Path) -> tuple[int, Path]:
    """A new, empty file in `directory` with a name no other file has (mode 0666 less the umask, as
    a write in place would create the destination)."""
    for _ in range(16):
        candidate = directory / f"{TEMPORARY_PREFIX}{secrets.token_hex(8)}"
        try:
            return os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name in '{directory}'")


def _take_over(fd: int, existing: os.stat_result | None, user: UserContext) -> None:
    """Give the temporary file the owner and mode the destination has after a write in place: the
    user's when the agent acts for one, else the replaced file's (its group when the agent's user is
    in it); its permission bits, set-id bits only for root (a write by anyone else clears them)."""
    root = os.geteuid() == 0
    with contextlib.suppress(OSError):
        if user.switch:
            os.fchown(fd, user.uid, user.gid)
        elif existing is not None and root:
            os.fchown(fd, existing.st_uid, existing.st_gid)
        elif existing is not None and existing.st_gid != os.getegid():
            os.fchown(fd, -1, existing.st_gid)
    if existing is not None:  # after the chown, which clears set-id bits
        mode = stat.S_IMODE(existing.st_mode)
        os.fchmod(fd, mode if root else mode & ~(stat.S_ISUID | stat.S_ISGID))
