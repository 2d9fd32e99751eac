"""Background processes' output logs and the file API's checks, without a sandbox: offsets, bounds, UTF-8
cuts, which paths are never workspace paths, and what RBAC is asked for each route."""

import pytest
from pydantic import ValidationError

from agentkube import gateway
from agentkube.ebpf.models import SignalRequest
from agentkube.ebpf.processes import OutputLog, utf8_complete
from agentkube.ebpf.unixhttp import ApiError
from agentkube.ebpf.workspace import upload_mode, workspace_path


def test_output_is_read_from_any_offset_and_only_the_newest_bytes_are_kept():
    log = OutputLog(limit=10)
    log.append(b"0123456789")
    assert log.read(3, 4, final=False).model_dump() == {"offset": 3, "next": 7, "data": "3456"}
    log.append(b"abcde")  # 15 bytes produced, the newest 10 kept
    assert log.total == 15 and log.first == 5
    old = log.read(0, 100, final=False)  # from before the kept bytes: the oldest kept, and it says so
    assert old.offset == 5 and old.data == "56789abcde" and old.next == 15
    assert log.read(15, 100, final=False).model_dump() == {"offset": 15, "next": 15, "data": ""}
    assert log.read(99, 100, final=False).offset == 15  # past the end: nothing yet


def test_a_character_cut_at_the_end_waits_for_the_next_read_unless_nothing_more_comes():
    euro = "€".encode()  # three bytes
    assert utf8_complete(b"ab" + euro[:2]) == 2 and utf8_complete(b"ab" + euro) == 5 and utf8_complete(b"") == 0
    assert utf8_complete("é".encode()[:1]) == 0 and utf8_complete(b"\xff") == 1
    log = OutputLog()
    log.append(b"x" + euro[:1])
    first = log.read(0, 100, final=False)
    assert first.data == "x" and first.next == 1
    log.append(euro[1:])
    assert log.read(first.next, 100, final=False).data == "€"
    log.append(b"\xe2")
    assert log.read(4, 100, final=True).data == "\ufffd"  # exited: decoded as it is


@pytest.mark.parametrize("path,parts", [("a", ["a"]), ("a/b/c.txt", ["a", "b", "c.txt"]), ("./a//b/", ["a", "b"]),
                                        ("..a/b..", ["..a", "b.."])])
def test_workspace_paths(path, parts):
    assert workspace_path(path) == parts


@pytest.mark.parametrize("path,status", [("", 422), ("/etc/passwd", 422), ("../x", 422), ("a/../../x", 422),
                                         ("a/..", 422), ("a\0b", 422), (".", 422), ("x" * 256, 422),
                                         ("a/" * 2100, 422)])
def test_paths_that_are_never_inside_the_workspace_are_refused(path, status):
    with pytest.raises(ApiError) as refused:
        workspace_path(path)
    assert refused.value.status == status
    assert workspace_path(".", root_allowed=True) == []  # a listing may name the workspace itself


def test_upload_modes_are_permission_bits_only():
    assert upload_mode(None) == 0o644 and upload_mode("755") == 0o755 and upload_mode("0700") == 0o700
    for bad in ("4755", "1777", "rwx", "8", "77777", "-1"):
        with pytest.raises(ApiError):
            upload_mode(bad)


def test_signals_are_named_from_a_fixed_set():
    assert SignalRequest(signal="sigterm").signal == "TERM" and SignalRequest(signal="KILL").signal == "KILL"
    for bad in ("SEGV", "31", "", "TERM; rm"):
        with pytest.raises(ValidationError):
            SignalRequest(signal=bad)


def test_processes_are_exec_and_each_file_operation_asks_rbac_for_its_own_verb():
    caller = gateway.Caller("u", "1", (), ())
    review = gateway.access_review(caller, "team", "box", gateway.file_access("GET", {"path": "a", "list": "1"}))
    assert review["spec"]["resourceAttributes"] == {"group": "agentkube.dev", "resource": "agentsandboxes",
                                                    "subresource": "files", "verb": "list", "namespace": "team",
                                                    "name": "box"}
    assert [gateway.file_access(m, {"path": "a"}).verb for m in ("PUT", "GET", "DELETE")] == ["create", "get", "delete"]
    with pytest.raises(gateway.Refusal) as refused:
        gateway.check_allowed({"status": {"allowed": False}}, caller, "team", "box", gateway.FILE_ACCESS["DELETE"])
    assert refused.value.status == 403 and "may not delete agentsandboxes/files" in refused.value.message
    assert gateway.passed_on({"path": "a", "wait": "1", "evil": "x"}, gateway.FILE_PARAMS) == {"path": "a"}


def test_file_requests_are_checked_at_the_gateway_before_any_sandbox_is_looked_at():
    gateway.check_file_request("PUT", {"path": "a/b", "mode": "755"}, 10)
    gateway.check_file_request("GET", {"path": ".", "list": "1"}, None)
    for method, query, length, status in (("PUT", {"path": "a"}, None, 411), ("GET", {"path": "/etc/passwd"}, None, 422),
                                          ("DELETE", {"path": "."}, None, 422), ("PUT", {"path": "a", "mode": "4777"}, 1, 422),
                                          ("GET", {}, None, 422)):
        with pytest.raises(gateway.Refusal) as refused:
            gateway.check_file_request(method, query, length)
        assert refused.value.status == status, (method, query)


def test_the_sdk_reads_on_from_where_it_stopped_and_ends_a_stream_only_when_nothing_more_comes():
    from agentkube.client import Output, _ProcessHandle
    from agentkube.ebpf.models import ProcessInfo, ProcessOutput

    limits = {"memory": 1 << 20, "cpu": 1, "pids": 8, "timeout": 60}
    info = {"id": "0123456789abcdef", "argv": ["x"], "state": "running", "started_at": 0, "limits": limits,
            "sources": {}, "stdout_bytes": 0, "stderr_bytes": 0}
    handle = _ProcessHandle(ProcessInfo.model_validate(info))
    assert handle._path("output") == "processes/0123456789abcdef/output" and handle._path() == "processes/0123456789abcdef"

    def answer(state: str, data: str, start: int) -> dict:
        chunk = {"offset": start, "next": start + len(data), "data": data}
        return {"process": {**info, "state": state}, "stdout": chunk, "stderr": {"offset": 0, "next": 0, "data": ""}}

    out = handle._advance(answer("running", "ab", 0))
    assert handle.offsets == {"stdout": 2, "stderr": 0} and handle._read_params(5, None, None)["stdout"] == 2
    assert handle._events(out) == [Output("stdout", "ab")]
    last = handle._events(ProcessOutput.model_validate(answer("exited", "c", 2)))
    assert last == [Output("stdout", "c")]  # exited, but what it printed last comes first: read once more
    assert isinstance(handle._events(ProcessOutput.model_validate(answer("exited", "", 3)))[0], ProcessInfo)
    bodies = handle._stdin_bodies("x" * 20000, close=True)
    assert [len(b["data"]) for b in bodies] == [8192, 8192, 3616] and [b["close"] for b in bodies] == [False, False, True]
    assert handle._stdin_bodies("", close=True) == [{"data": "", "close": True}]
