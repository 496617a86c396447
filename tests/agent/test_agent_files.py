"""files.* and signed URLs through the unmodified e2b SDK, plus raw /files behaviour."""

from __future__ import annotations

import gzip
import io
import stat
import urllib.error
import urllib.request
from typing import Any

import pytest
from agentlib import ACCESS_TOKEN
from e2b import FilesystemEventType, FileType, InvalidArgumentException
from e2b.exceptions import NotFoundException

from testlib import wait_until


def test_write_read_text_and_bytes(sandbox: Any, agent: Any) -> None:
    info = sandbox.files.write("docs/hello.txt", "hi there")
    assert info.path == str(agent.workdir / "docs" / "hello.txt")
    assert (agent.workdir / "docs" / "hello.txt").read_text() == "hi there"
    assert sandbox.files.read("docs/hello.txt") == "hi there"
    sandbox.files.write("bin.dat", b"\x00\xffdata")
    assert bytes(sandbox.files.read("bin.dat", format="bytes")) == b"\x00\xffdata"


def test_octet_stream_gzip_upload_and_gzip_download(sandbox: Any, agent: Any) -> None:
    payload = b"compressible " * 1000
    sandbox.files.write("gz.txt", io.BytesIO(payload), gzip=True)
    assert (agent.workdir / "gz.txt").read_bytes() == payload
    assert bytes(sandbox.files.read("gz.txt", format="bytes", gzip=True)) == payload


def test_write_files_uploads_several_in_one_request(sandbox: Any, agent: Any) -> None:
    from e2b.sandbox.filesystem.filesystem import WriteEntry

    infos = sandbox.files.write_files(
        [WriteEntry(path="multi/a.txt", data="A"), WriteEntry(path="multi/b.txt", data="B")]
    )
    assert sorted(info.name for info in infos) == ["a.txt", "b.txt"]
    assert (agent.workdir / "multi" / "b.txt").read_text() == "B"


def test_metadata_is_stored_and_listed(sandbox: Any, agent: Any) -> None:
    try:
        info = sandbox.files.write("meta.txt", "m", metadata={"Owner": "team-a"})
    except Exception as error:  # pragma: no cover - filesystems without user xattrs
        pytest.skip(f"user xattrs unsupported here: {error}")
    assert info.metadata == {"owner": "team-a"}
    assert sandbox.files.get_info("meta.txt").metadata == {"owner": "team-a"}


def test_list_exists_info_rename_make_dir_remove(sandbox: Any, agent: Any) -> None:
    assert sandbox.files.make_dir("tree/inner") is True
    assert sandbox.files.make_dir("tree/inner") is False
    sandbox.files.write("tree/inner/leaf.txt", "leaf")
    shallow = sandbox.files.list("tree")
    assert [(entry.name, entry.type) for entry in shallow] == [("inner", FileType.DIR)]
    deep = sandbox.files.list("tree", depth=2)
    assert {entry.name for entry in deep} == {"inner", "leaf.txt"}
    info = sandbox.files.get_info("tree/inner/leaf.txt")
    assert (info.type, info.size, info.permissions[0]) == (FileType.FILE, 4, "-")
    assert sandbox.files.exists("tree/inner/leaf.txt") is True
    moved = sandbox.files.rename("tree/inner/leaf.txt", "tree/moved.txt")
    assert moved.path == str(agent.workdir / "tree" / "moved.txt")
    assert sandbox.files.exists("tree/inner/leaf.txt") is False
    sandbox.files.remove("tree")
    assert not (agent.workdir / "tree").exists()


def test_missing_file_raises_not_found(sandbox: Any) -> None:
    with pytest.raises(NotFoundException):
        sandbox.files.read("does/not/exist.txt")
    with pytest.raises(NotFoundException):
        sandbox.files.get_info("does/not/exist.txt")
    with pytest.raises(NotFoundException):
        sandbox.files.list("does/not/exist")
    # Removing what is not there succeeds (envd's os.RemoveAll; E2B's own SDK tests expect it).
    sandbox.files.remove("does/not/exist.txt")


def test_reading_a_directory_is_an_invalid_argument(sandbox: Any) -> None:
    sandbox.files.make_dir("a-directory")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.read("a-directory")


def test_watch_dir_reports_create_write_and_remove(sandbox: Any) -> None:
    sandbox.files.make_dir("watched")
    handle = sandbox.files.watch_dir("watched")
    try:
        sandbox.files.write("watched/new.txt", "x")
        sandbox.files.remove("watched/new.txt")
        events: list[Any] = []

        def saw_remove() -> bool:
            events.extend(handle.get_new_events())
            return any(event.type == FilesystemEventType.REMOVE for event in events)

        wait_until(saw_remove, timeout=10, message="the remove event")
        kinds = {(event.name, event.type) for event in events}
        assert ("new.txt", FilesystemEventType.CREATE) in kinds
        assert ("new.txt", FilesystemEventType.WRITE) in kinds
    finally:
        handle.stop()


async def test_async_watch_dir_streams_events_recursively(sdk_options: dict[str, Any], agent: Any) -> None:
    import asyncio

    from e2b import AsyncSandbox

    sandbox = await AsyncSandbox.create(**sdk_options)
    await sandbox.files.make_dir("awatched/sub")
    seen: list[Any] = []
    arrived = asyncio.Event()

    def on_event(event: Any) -> None:
        seen.append(event)
        if event.name == "sub/deep.txt":
            arrived.set()

    handle = await sandbox.files.watch_dir("awatched", on_event, recursive=True)
    try:
        await sandbox.files.write("awatched/sub/deep.txt", "deep")
        await asyncio.wait_for(arrived.wait(), 10)
    finally:
        await handle.stop()  # type: ignore[no-untyped-call]
    assert any(event.type == FilesystemEventType.CREATE for event in seen if event.name == "sub/deep.txt")


def test_signed_download_and_upload_urls(sandbox: Any, agent: Any) -> None:
    sandbox.files.write("signed.txt", "signed content")
    url = sandbox.download_url("signed.txt", use_signature_expiration=60)
    assert "signature=v1_" in url
    local = url.replace("https://49983-agenttestsandbox.e2b.app", agent.envd_url)
    with urllib.request.urlopen(local) as response:
        assert response.read() == b"signed content"
    # A signature for another path, or no signature at all, is refused.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(local.replace("signed.txt", "other.txt"))
    assert refused.value.code == 401
    upload = sandbox.upload_url("uploaded.txt").replace("https://49983-agenttestsandbox.e2b.app", agent.envd_url)
    request = urllib.request.Request(
        upload, data=b"via url", method="POST", headers={"Content-Type": "application/octet-stream"}
    )
    with urllib.request.urlopen(request) as response:
        assert response.status == 200
    assert (agent.workdir / "uploaded.txt").read_bytes() == b"via url"


def test_raw_files_refuse_requests_without_token_or_signature(agent: Any) -> None:
    status, _, body = agent.request("GET", "/files?path=signed.txt")
    assert status == 401
    assert b"signature" in body
    status, _, _ = agent.request("GET", "/files?path=signed.txt", headers={"X-Access-Token": ACCESS_TOKEN})
    assert status in (200, 404)


def test_raw_gzip_request_body_is_decompressed(agent: Any) -> None:
    body = gzip.compress(b"zipped body")
    status, _, _ = agent.request(
        "POST",
        "/files?path=raw-gz.txt",
        body=body,
        headers={
            "X-Access-Token": ACCESS_TOKEN,
            "Content-Type": "application/octet-stream",
            "Content-Encoding": "gzip",
        },
    )
    assert status == 200
    assert (agent.workdir / "raw-gz.txt").read_bytes() == b"zipped body"


def test_modes_are_permission_bits_only(sandbox: Any, agent: Any) -> None:
    parent = agent.workdir / "setgid-parent"
    parent.mkdir()
    parent.chmod(0o2775)  # like the image's home: new directories inherit the setgid bit
    sandbox.files.make_dir("setgid-parent/child")
    on_disk = (parent / "child").stat().st_mode
    assert on_disk & stat.S_ISGID  # the kernel did pass it on
    info = sandbox.files.get_info("setgid-parent/child")
    assert info.mode == stat.S_IMODE(on_disk) & 0o777 and not info.mode & 0o7000


def test_a_symlink_reports_its_resolved_absolute_target(sandbox: Any, agent: Any) -> None:
    (agent.workdir / "target.txt").write_text("x")
    (agent.workdir / "link.txt").symlink_to("target.txt")  # relative, as `ln -s target.txt link.txt`
    info = sandbox.files.get_info("link.txt")
    assert info.symlink_target == str((agent.workdir / "target.txt").resolve())


def test_a_directory_under_a_setgid_parent_reports_its_permission_bits(sandbox: Any, agent: Any) -> None:
    # A sandbox's home is setgid (its volume's fsGroup) and new directories inherit the bit: E2B's SDK
    # tests expect drwxr-xr-x and 0o755 for a new directory, as under E2B's plain home.
    parent = agent.workdir / "setgid"
    parent.mkdir()
    parent.chmod(0o2755)
    assert sandbox.files.make_dir("setgid/child") is True
    assert (parent / "child").stat().st_mode & 0o2000  # the bit is there: only its report leaves it out
    info = sandbox.files.get_info("setgid/child")
    assert (info.permissions, info.mode) == ("drwxr-xr-x", 0o755)
    (listed,) = sandbox.files.list("setgid")
    assert listed.permissions == "drwxr-xr-x"
