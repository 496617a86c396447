"""Unit tests of the agent's pure parts: framing, JSON mapping, signatures, limits, metrics."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandbox_operator.agent.config import parse_config
from sandbox_operator.agent.connect import (
    FLAG_END_STREAM,
    ConnectError,
    EnvelopeDecoder,
    decode_json_message,
    encode_end_stream,
    encode_envelope,
    encode_message_envelope,
    parse_envelope_header,
    parse_timeout_ms,
)
from sandbox_operator.agent.envd import accepts_gzip
from sandbox_operator.agent.inotify import (
    EVENT_CHMOD,
    EVENT_CREATE,
    EVENT_REMOVE,
    EVENT_RENAME,
    EVENT_WRITE,
    IN_ATTRIB,
    IN_CREATE,
    IN_DELETE,
    IN_MODIFY,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    event_type,
    parse_events,
)
from sandbox_operator.agent.interpreter import (
    CodeInterpreter,
    InterpreterError,
    normalize_language,
    result_line,
    strip_quotes,
)
from sandbox_operator.agent.interpreter_http import interpreter_token_ok, is_interpreter_path
from sandbox_operator.agent.limits import (
    DURATION_BUCKETS,
    ConcurrencyLimitError,
    ExecutionStats,
    OutputLimiter,
    truncation_marker,
)
from sandbox_operator.agent.process import end_event
from sandbox_operator.agent.protojson import (
    camel,
    decode_bytes,
    encode_bytes,
    enum_field,
    format_timestamp,
    selector,
    uint_field,
)
from sandbox_operator.agent.signing import compute_signature, verify_signature
from sandbox_operator.agent.sysmetrics import (
    ResourceSample,
    parse_cpu_max,
    parse_meminfo,
    parse_net_dev,
    prometheus_text,
)
from sandbox_operator.agent.users import SandboxState, username_from_basic_auth

# -- Connect framing ---------------------------------------------------------------------------


def test_envelope_layout_is_flags_then_big_endian_length() -> None:
    assert encode_envelope(b"{}") == b"\x00\x00\x00\x00\x02{}"
    assert encode_end_stream()[:1] == bytes([FLAG_END_STREAM])


def test_end_stream_carries_the_error_code_and_message() -> None:
    envelope = encode_end_stream(ConnectError("deadline_exceeded", "too slow"))
    flags, length = struct.unpack(">BI", envelope[:5])
    assert flags == FLAG_END_STREAM
    assert decode_json_message(envelope[5 : 5 + length]) == {
        "error": {"code": "deadline_exceeded", "message": "too slow"}
    }


@given(st.lists(st.dictionaries(st.text(max_size=5), st.integers(), max_size=3), max_size=5), st.integers(1, 9))
def test_decoder_reassembles_envelopes_split_anywhere(messages: list[dict[str, int]], step: int) -> None:
    stream = b"".join(encode_message_envelope(message) for message in messages)
    decoder = EnvelopeDecoder(max_length=1 << 20)
    decoded = []
    for start in range(0, len(stream), step):
        decoded.extend(decoder.feed(stream[start : start + step]))
    assert [decode_json_message(payload) for _, payload in decoded] == messages
    assert decoder.pending == 0


def test_compressed_and_oversized_envelopes_are_refused() -> None:
    with pytest.raises(ConnectError) as compressed:
        parse_envelope_header(b"\x01\x00\x00\x00\x01", 100)
    assert compressed.value.code == "internal"
    with pytest.raises(ConnectError) as oversized:
        parse_envelope_header(b"\x00\x00\x00\x01\x00", 100)
    assert oversized.value.code == "resource_exhausted"


def test_connect_codes_map_to_conventional_http_statuses() -> None:
    assert ConnectError("unauthenticated", "").http_status == 401
    assert ConnectError("not_found", "").http_status == 404
    assert ConnectError("resource_exhausted", "").http_status == 429
    with pytest.raises(ValueError):
        ConnectError("no_such_code", "")


def test_malformed_json_is_an_invalid_argument() -> None:
    with pytest.raises(ConnectError) as error:
        decode_json_message(b"{not json")
    assert error.value.code == "invalid_argument"
    with pytest.raises(ConnectError):
        decode_json_message(b"[1, 2]")


def test_timeout_header_parsing() -> None:
    assert parse_timeout_ms("60000") == 60.0
    assert parse_timeout_ms("9999999999") == 9999999.999
    assert parse_timeout_ms(None) is None
    # Malformed or longer than Connect's 10 digits (>= 1e10 ms): invalid_argument, not ignored.
    for bad in ("-5", "12345678901", "1e10", "", "1.5", "٣"):
        with pytest.raises(ConnectError) as error:
            parse_timeout_ms(bad)
        assert error.value.code == "invalid_argument", bad


# -- proto3 JSON ---------------------------------------------------------------------------------


def test_field_names_and_values_follow_proto3_json() -> None:
    assert camel("include_entry") == "includeEntry"
    assert uint_field({"depth": "3"}, "depth") == 3
    assert uint_field({"watcherId": 7}, "watcher_id") == 7
    assert enum_field({"signal": "SIGNAL_SIGKILL"}, "signal", {"SIGNAL_SIGKILL": 9}) == 9
    assert enum_field({"signal": 15}, "signal", {"SIGNAL_SIGKILL": 9}) == 15
    assert selector({"process": {"pid": 42}}) == ("pid", 42)
    assert selector({"process": {"tag": "web"}}) == ("tag", "web")
    with pytest.raises(ConnectError):
        selector({"process": {}})


@given(st.binary(max_size=64))
def test_bytes_round_trip_through_base64_with_or_without_padding(data: bytes) -> None:
    encoded = encode_bytes(data)
    assert decode_bytes(encoded, "x") == data
    assert decode_bytes(encoded.rstrip("="), "x") == data
    assert decode_bytes(base64.urlsafe_b64encode(data).decode(), "x") == data


def test_timestamps_are_rfc3339_utc_with_minimal_fraction() -> None:
    assert format_timestamp(0) == "1970-01-01T00:00:00Z"
    assert format_timestamp(1_500_000_000) == "1970-01-01T00:00:01.500Z"
    assert format_timestamp(1_000_001_000) == "1970-01-01T00:00:01.000001Z"
    assert format_timestamp(1_000_000_001) == "1970-01-01T00:00:01.000000001Z"


def test_end_event_matches_go_process_state_wording() -> None:
    assert end_event(0, None) == {"end": {"exited": True, "status": "exit status 0"}}
    assert end_event(3, None) == {"end": {"exitCode": 3, "exited": True, "status": "exit status 3"}}
    assert end_event(-9, "timed out") == {"end": {"exitCode": -1, "status": "signal: killed", "error": "timed out"}}


def test_an_oom_killed_command_ends_with_137_and_says_why() -> None:
    end = end_event(-9, None, oom_killed=True)["end"]
    assert end["exitCode"] == 137 and "out-of-memory" in end["error"]
    # Only a SIGKILL is the OOM killer's; another death keeps envd's -1.
    assert end_event(-15, None, oom_killed=True)["end"]["exitCode"] == -1


# -- signatures and auth -------------------------------------------------------------------------


def test_signature_matches_the_sdk_formula() -> None:
    raw = "/home/user/a.txt:read::tok:1700000000"
    expected = "v1_" + base64.b64encode(hashlib.sha256(raw.encode()).digest()).rstrip(b"=").decode()
    assert compute_signature("/home/user/a.txt", "read", "", "tok", 1700000000) == expected


def test_signature_verification_rejects_tampering_and_expiry() -> None:
    good = compute_signature("a.txt", "write", "", "tok", 2000)
    common = {"path": "a.txt", "username": "", "access_token": "tok"}
    assert verify_signature(signature=good, expiration="2000", operation="write", now=1000, **common) is None
    assert verify_signature(signature=good, expiration="2000", operation="read", now=1000, **common)
    assert verify_signature(signature=good, expiration="2000", operation="write", now=3000, **common)
    assert verify_signature(signature=None, expiration=None, operation="write", now=0, **common)


def test_basic_auth_user_extraction() -> None:
    assert username_from_basic_auth("Basic cm9vdDo=") == "root"
    assert username_from_basic_auth("Bearer x") is None
    assert username_from_basic_auth("Basic !!!") is None
    assert username_from_basic_auth(None) is None


def test_gzip_negotiation() -> None:
    assert accepts_gzip("gzip")
    assert accepts_gzip("gzip, deflate")
    assert not accepts_gzip("gzip;q=0")
    assert not accepts_gzip("identity")


# -- limits --------------------------------------------------------------------------------------


@given(st.lists(st.binary(max_size=50), max_size=20), st.integers(1, 200))
def test_output_limiter_never_exceeds_the_limit_and_marks_truncation_once(chunks: list[bytes], limit: int) -> None:
    limiter = OutputLimiter(limit)
    kept = b""
    markers = 0
    for chunk in chunks:
        part, marker = limiter.take(chunk)
        kept += part
        markers += bool(marker)
    total = sum(map(len, chunks))
    assert kept == b"".join(chunks)[:limit]
    assert markers == (1 if total > limit else 0)


def test_unlimited_output_passes_everything() -> None:
    assert OutputLimiter(0).take(b"x" * 10_000) == (b"x" * 10_000, b"")
    assert OutputLimiter(0).take_whole(10_000) == (True, b"")


def test_whole_blocks_fit_entirely_or_become_the_one_marker() -> None:
    limiter = OutputLimiter(100)
    assert limiter.take(b"x" * 30) == (b"x" * 30, b"")
    assert limiter.take_whole(70) == (True, b"")  # exactly fills the budget
    limiter = OutputLimiter(100)
    assert limiter.take_whole(60) == (True, b"")
    assert limiter.take_whole(41) == (False, truncation_marker(100))
    # After the marker nothing more is emitted, whatever the kind of output.
    assert limiter.take_whole(1) == (False, b"")
    assert limiter.take(b"y") == (b"", b"")


def test_concurrency_limit_and_statistics() -> None:
    stats = ExecutionStats(limit=1)
    stats.acquire()
    with pytest.raises(ConcurrencyLimitError, match="SANDBOX_MAX_CONCURRENT_EXECUTIONS"):
        stats.acquire()
    stats.release("code", 0.02, timed_out=True)
    assert stats.running == 0
    assert stats.rejected_total == 1
    assert stats.executions_total == {"code": 1}
    assert stats.timeouts_total == {"code": 1}
    assert sum(stats.duration_buckets["code"]) == 1
    assert stats.duration_buckets["code"][DURATION_BUCKETS.index(0.025)] == 1


# -- metrics -------------------------------------------------------------------------------------


def test_proc_and_cgroup_parsers() -> None:
    assert parse_meminfo("MemTotal:  2048 kB\nCached: 1 kB\n") == {"MemTotal": 2048 * 1024, "Cached": 1024}
    net = "Inter-|\n face |\n    lo: 100 1 0 0 0 0 0 0 100 1 0 0 0 0 0 0\n  eth0: 500 5 0 0 0 0 0 0 700 7 0 0 0 0 0 0\n"
    assert parse_net_dev(net) == (500, 700)
    assert parse_cpu_max("200000 100000") == 2.0
    assert parse_cpu_max("max 100000") is None


def test_prometheus_exposition_has_the_contract_metrics() -> None:
    stats = ExecutionStats()
    stats.acquire()
    stats.release("command", 0.003, timed_out=False)
    sample = ResourceSample(1.0, 2.5, 2.0, 100, 200, 10, 300, 400, 5, 6, 7)
    text = prometheus_text(sample, stats, "sbx1")
    for name in (
        "sandbox_agent_cpu_seconds_total",
        "sandbox_agent_memory_used_bytes",
        "sandbox_agent_memory_limit_bytes",
        "sandbox_agent_disk_used_bytes",
        "sandbox_agent_disk_quota_bytes",
        "sandbox_agent_network_receive_bytes_total",
        "sandbox_agent_network_transmit_bytes_total",
        "sandbox_agent_processes",
        "sandbox_agent_last_activity_timestamp_seconds",
        "sandbox_agent_execution_timeouts_total",
    ):
        assert f"\n{name}{{" in text or text.startswith(f"{name}{{") or f"# TYPE {name} " in text
    assert 'sandbox_agent_executions_total{kind="command",sandbox_id="sbx1"} 1' in text
    assert 'sandbox_agent_execution_duration_seconds_bucket{kind="command",le="0.005",sandbox_id="sbx1"} 1' in text
    assert 'sandbox_agent_execution_duration_seconds_count{kind="command",sandbox_id="sbx1"} 1' in text


# -- inotify, interpreter mapping, config ------------------------------------------------------------


def test_inotify_masks_map_like_fsnotify() -> None:
    assert event_type(IN_CREATE) == EVENT_CREATE
    assert event_type(IN_MOVED_TO) == EVENT_CREATE
    assert event_type(IN_MODIFY) == EVENT_WRITE
    assert event_type(IN_DELETE) == EVENT_REMOVE
    assert event_type(IN_MOVED_FROM) == EVENT_RENAME
    assert event_type(IN_ATTRIB) == EVENT_CHMOD


def test_inotify_records_are_split_with_their_names() -> None:
    record = struct.pack("iIII", 1, IN_CREATE, 0, 8) + b"a.txt\0\0\0"
    record += struct.pack("iIII", 2, IN_DELETE, 0, 0)
    assert parse_events(record) == [(1, IN_CREATE, "a.txt"), (2, IN_DELETE, "")]


def test_mime_bundles_become_result_lines() -> None:
    line = result_line({"text/plain": "'hi'", "image/png": "iVBO", "application/x-custom": {"a": 1}}, False)
    assert line == {
        "type": "result",
        "text": "hi",
        "png": "iVBO",
        "extra": {"application/x-custom": {"a": 1}},
        "is_main_result": False,
    }
    assert strip_quotes('"x"') == "x"
    assert strip_quotes("x'") == "x'"


def test_kernel_specs_are_read_once_and_rescanned_only_for_a_missing_language(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    from sandbox_operator.agent import interpreter

    scans: list[int] = []

    def find_kernel_specs(self: KernelSpecManager) -> dict[str, str]:
        scans.append(1)
        return {"python3": "/k/python3"}

    monkeypatch.setattr(KernelSpecManager, "find_kernel_specs", find_kernel_specs)
    state = SandboxState(config=parse_config(["--workdir", str(tmp_path)], {}), access_token=None)
    code = CodeInterpreter(state, ExecutionStats())

    async def names() -> None:
        assert await code._kernel_name("python") == "python3"
        assert await code._kernel_name("python") == "python3"
        assert len(scans) == 1
        with pytest.raises(InterpreterError, match="installed kernels: python3"):
            await code._kernel_name("r")
        assert len(scans) == 1  # the last scan is recent: no rescan per request
        monkeypatch.setattr(interpreter, "KERNEL_SPEC_RESCAN_INTERVAL", 0.0)
        with pytest.raises(InterpreterError):
            await code._kernel_name("r")
        assert len(scans) == 2  # a language still missing later rescans (a kernel may have been installed)

    asyncio.run(names())


def test_interpreter_routes_accept_either_token_header() -> None:
    assert is_interpreter_path("/execute") and is_interpreter_path("/contexts")
    assert is_interpreter_path("/contexts/abc/restart")
    assert not is_interpreter_path("/contextsfoo") and not is_interpreter_path("/files")
    assert interpreter_token_ok({}, None)
    assert interpreter_token_ok({"E2B-Traffic-Access-Token": "t"}, "t")
    assert interpreter_token_ok({"X-Access-Token": "t"}, "t")
    assert not interpreter_token_ok({}, "t")
    assert not interpreter_token_ok({"E2B-Traffic-Access-Token": "u", "X-Access-Token": "v"}, "t")


def test_language_names_are_normalized_and_unknown_ones_refused() -> None:
    assert normalize_language(None) == "python"
    assert normalize_language("TS") == "javascript"
    with pytest.raises(InterpreterError) as error:
        normalize_language("cobol")
    assert error.value.status == 400


def test_config_reads_the_operator_env_contract(tmp_path: Path) -> None:
    config = parse_config(
        ["--workdir", str(tmp_path)],
        {
            "SANDBOX_EXECUTION_TIMEOUT": "2.5",
            "SANDBOX_MAX_OUTPUT_BYTES": "100",
            "SANDBOX_MAX_CONCURRENT_EXECUTIONS": "3",
            "SANDBOX_ACCESS_TOKEN": "tok",
            "SANDBOX_ID": "sbx",
        },
    )
    assert (config.execution_timeout, config.max_output_bytes, config.max_concurrent_executions) == (
        2.5,
        100,
        3,
    )
    assert (config.access_token, config.sandbox_id, config.workdir) == ("tok", "sbx", tmp_path.resolve())
    assert (config.envd_port, config.interpreter_port) == (49983, 49999)
    with pytest.raises(SystemExit):
        parse_config([], {"SANDBOX_EXECUTION_TIMEOUT": "soon"})


def test_a_running_execution_is_activity() -> None:
    stats = ExecutionStats()
    stats.last_activity = 1000.0
    assert stats.activity_at(5000.0) == 1000.0
    stats.acquire()  # a long command or a background server holds a slot while it runs
    assert stats.activity_at(5000.0) == 5000.0
    stats.release("command", 1.0, timed_out=False)
    later = stats.last_activity + 100
    assert stats.activity_at(later) == stats.last_activity  # finished: the clock runs again
