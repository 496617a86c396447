"""An upload replaces its file in one step (agent/uploadfile.py): one cut short leaves the old file,
never a truncated one, and directory watches see the destination created and written, not the
temporary file."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from typing import Any

from agentlib import ACCESS_TOKEN
from e2b import FilesystemEventType

from sandbox_operator.agent.uploadfile import TEMPORARY_NAME, TEMPORARY_PREFIX, open_upload
from sandbox_operator.agent.users import UserContext
from testlib import wait_until

OLD = b"the old content, complete\n" * 100


def _user(home: Path) -> UserContext:
    return UserContext(name="test", uid=os.getuid(), gid=os.getgid(), home=home, switch=False)


def _temporaries(directory: Path) -> list[str]:
    return [entry.name for entry in directory.iterdir() if entry.name.startswith(TEMPORARY_PREFIX)]


def test_a_discarded_upload_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "target.bin"
    target.write_bytes(OLD)
    upload = open_upload(target, _user(tmp_path))
    assert upload.temporary is not None and TEMPORARY_NAME.fullmatch(upload.temporary.name)
    upload.handle.write(b"half of the new content")
    upload.discard()
    assert target.read_bytes() == OLD
    assert _temporaries(tmp_path) == []


def test_a_committed_upload_replaces_the_file_keeping_its_mode(tmp_path: Path) -> None:
    target = tmp_path / "script.sh"
    target.write_bytes(OLD)
    target.chmod(0o750)
    upload = open_upload(target, _user(tmp_path))
    upload.handle.write(b"#!/bin/sh\necho new\n")
    assert target.read_bytes() == OLD  # nothing visible before the commit
    upload.handle.close()
    upload.commit()
    assert target.read_bytes() == b"#!/bin/sh\necho new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o750
    assert _temporaries(tmp_path) == []


def test_a_symlink_is_followed_and_stays(tmp_path: Path) -> None:
    real = tmp_path / "real.txt"
    real.write_bytes(OLD)
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    upload = open_upload(link, _user(tmp_path))
    assert upload.destination == real.resolve()
    upload.handle.write(b"through the link")
    upload.handle.close()
    upload.commit()
    assert link.is_symlink() and real.read_bytes() == b"through the link"


def test_a_hard_linked_file_is_written_in_place(tmp_path: Path) -> None:
    """A rename would leave the other name with the old content."""
    target = tmp_path / "a.txt"
    target.write_bytes(OLD)
    other = tmp_path / "b.txt"
    os.link(target, other)
    upload = open_upload(target, _user(tmp_path))
    assert upload.temporary is None
    upload.handle.write(b"both names")
    upload.handle.close()
    upload.commit()
    assert other.read_bytes() == b"both names"


def test_an_upload_cut_mid_body_leaves_the_old_file(agent: Any, sandbox: Any) -> None:
    """The client goes away after part of the body (what a gateway SIGKILLed mid-upload does to the
    agent's connection): the file keeps its old content and the partial temporary file is removed."""
    directory = agent.workdir / "cut"
    directory.mkdir(exist_ok=True)
    (directory / "target.bin").write_bytes(OLD)
    head = (
        "POST /files?path=cut/target.bin HTTP/1.1\r\nHost: agent\r\n"
        f"X-Access-Token: {ACCESS_TOKEN}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {8 * 1024 * 1024}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", agent.envd_port), timeout=30) as connection:
        connection.sendall(head.encode() + b"x" * (1024 * 1024))

        def partly_written() -> bool:
            return any((directory / name).stat().st_size > 0 for name in _temporaries(directory))

        wait_until(partly_written, timeout=30, message="the upload's first bytes in a temporary file")
        assert (directory / "target.bin").read_bytes() == OLD
    wait_until(lambda: _temporaries(directory) == [], timeout=30, message="the temporary file removed")
    assert (directory / "target.bin").read_bytes() == OLD
    sandbox.files.write("cut/target.bin", b"the whole new content")  # a retry succeeds
    assert (directory / "target.bin").read_bytes() == b"the whole new content"
    assert sorted(entry.name for entry in directory.iterdir()) == ["target.bin"]


def test_watchers_see_the_destination_written_not_the_temporary(sandbox: Any) -> None:
    sandbox.files.make_dir("atomic-watched")
    sandbox.files.write("atomic-watched/existing.txt", "before")
    handle = sandbox.files.watch_dir("atomic-watched")
    try:
        sandbox.files.write("atomic-watched/existing.txt", "after")
        sandbox.files.write("atomic-watched/fresh.txt", "new")
        sandbox.files.remove("atomic-watched/fresh.txt")
        events: list[Any] = []

        def saw_remove() -> bool:
            events.extend(handle.get_new_events())
            return any(event.type == FilesystemEventType.REMOVE for event in events)

        wait_until(saw_remove, timeout=10, message="the remove event")
    finally:
        handle.stop()
    kinds = {(event.name, event.type) for event in events}
    for name in ("existing.txt", "fresh.txt"):
        assert (name, FilesystemEventType.CREATE) in kinds and (name, FilesystemEventType.WRITE) in kinds, kinds
    assert not [event.name for event in events if TEMPORARY_PREFIX in event.name], events
