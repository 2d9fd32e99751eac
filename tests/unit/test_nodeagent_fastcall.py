"""The fast call path's pure parts: what a pooled cgroup's limits change costs, the held process's command,
the frames between runtime and agent and between the SDK and the runtime."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from agentkube.contract import Limits
from agentkube.ebpf.agent import check_release_pipe, release_held, traced_by
from agentkube.ebpf.cgroups import limit_settings, limit_writes
from agentkube.ebpf.frames import HEADER, encode, read_frame
from agentkube.ebpf.held import RELEASE, SOURCE, command_frame
from agentkube.ebpf.unixhttp import HttpError

DEFAULTS = Limits(memory=512 << 20, cpu=1.0, pids=256, timeout=600)


@pytest.mark.parametrize("kind", ["v2", "hybrid"])
def test_a_new_cgroup_gets_every_limit_and_a_pooled_one_only_what_changes(kind):
    assert limit_writes(kind, DEFAULTS) == limit_settings(kind, DEFAULTS.memory, DEFAULTS.cpu, DEFAULTS.pids)
    assert limit_writes(kind, DEFAULTS, DEFAULTS) == []
    fewer_pids = DEFAULTS.model_copy(update={"pids": 64})
    assert [name for _, name, _, _ in limit_writes(kind, fewer_pids, DEFAULTS)] == ["pids.max"]


def test_raising_memory_on_v1_writes_the_memory_and_swap_limit_first():
    # v1 refuses a memory limit above the memory+swap limit: raising must lift memsw first, lowering after.
    more = DEFAULTS.model_copy(update={"memory": 1 << 30})
    raised = [name for _, name, _, _ in limit_writes("hybrid", more, DEFAULTS)]
    assert raised.index("memory.memsw.limit_in_bytes") < raised.index("memory.limit_in_bytes")
    lowered = [name for _, name, _, _ in limit_writes("hybrid", DEFAULTS, more)]
    assert lowered.index("memory.limit_in_bytes") < lowered.index("memory.memsw.limit_in_bytes")


def test_the_held_process_reads_its_working_directory_its_variables_then_its_argv():
    assert command_frame(None, ["echo", "a b", ""]) == b"\0000\0echo\0a b\0\0"
    assert command_frame("/tmp", ["true"], {"A": "1", "B": "x=y"}) == b"/tmp\0002\0A=1\0B=x=y\0true\0"


def test_a_traced_process_is_seen():
    assert traced_by("Name:\tx\nTracerPid:\t0\n") == 0
    assert traced_by("Name:\tx\nTracerPid:\t4242\n") == 4242


def test_frames_round_trip_and_oversized_or_broken_frames_are_refused():
    left, right = socket.socketpair()
    with left, right:
        left.sendall(encode({"op": "start", "argv": ["ü"]}))
        assert read_frame(right, 1024) == {"op": "start", "argv": ["ü"]}
        left.sendall(HEADER.pack(4096))
        with pytest.raises(HttpError) as too_big:
            read_frame(right, 1024)
        assert too_big.value.status == 413
        left.sendall(HEADER.pack(3) + b"{x}")
        with pytest.raises(HttpError) as broken:
            read_frame(right, 1024)
        assert broken.value.status == 400
        left.close()
        assert read_frame(right, 1024) is None  # a clean end


def test_a_frame_carries_one_descriptor_to_the_operation_that_takes_it_and_an_untaken_one_is_closed():
    import threading

    from agentkube.ebpf.frames import FrameClient, serve_connection, take_received_fd

    taken: list[int] = []
    left, right = socket.socketpair()

    def fill(peer, memo, message):
        fd = take_received_fd(memo)
        taken.append(fd if fd is not None else -1)
        return {"got": fd is not None}

    server = threading.Thread(target=serve_connection, args=(right, None, {"fill": fill, "other": lambda *a: {}}),
                              kwargs={"descriptors": True})
    server.start()
    client = FrameClient("unused", descriptors=True)
    client._idle.append(left)
    pipe_read, pipe_write = os.pipe()
    try:
        assert client.send("fill", {"name": "x"}, pipe_write) == {"got": True}
        assert client.request("fill", name="x") == {"got": False}  # only the frame it came with has it
        os.close(pipe_write)
        os.write(taken[0], b"g")  # the operation's own copy of the write end
        assert os.read(pipe_read, 1) == b"g"
        os.close(taken[0])
        assert os.read(pipe_read, 1) == b""  # no copy left anywhere: EOF
        other_read, other_write = os.pipe()
        assert client.send("other", {}, other_write) == {}  # not taken: closed by the server
        os.close(other_write)
        assert os.read(other_read, 1) == b""
        os.close(other_read)
    finally:
        client.close()
        server.join(5)
        right.close()
        os.close(pipe_read)


def test_a_connection_that_did_not_open_for_descriptors_never_hands_one_to_an_operation():
    import threading

    from agentkube.ebpf.frames import FrameClient, serve_connection, take_received_fd

    seen: list[object] = []
    left, right = socket.socketpair()
    server = threading.Thread(target=serve_connection,
                              args=(right, None, {"fill": lambda peer, memo, message: seen.append(take_received_fd(memo))}))
    server.start()
    sender = FrameClient("unused", descriptors=True)  # sends one anyway, to a connection that reads frames plainly
    sender._idle.append(left)
    pipe_read, pipe_write = os.pipe()
    try:
        with pytest.raises(ValueError):
            FrameClient("unused").send("fill", {}, pipe_write)  # a plain client refuses to send one
        sender.send("fill", {}, pipe_write)
        os.close(pipe_write)
        assert seen == [None]
        assert os.read(pipe_read, 1) == b""  # the kernel dropped the copy it carried: no writer is left
    finally:
        sender.close()
        server.join(5)
        right.close()
        os.close(pipe_read)


def test_only_the_write_end_of_a_pipe_is_taken_as_a_release_pipe_and_releasing_a_dead_process_is_quiet():
    pipe_read, pipe_write = os.pipe()
    with pytest.raises(HttpError):
        check_release_pipe(pipe_read)
    with open(os.devnull, "wb") as other, pytest.raises(HttpError):
        check_release_pipe(other.fileno())
    check_release_pipe(pipe_write)
    assert not os.get_blocking(pipe_write)  # a pipe someone filled cannot hold up the agent
    release_held(pipe_write)
    assert os.read(pipe_read, 1) == RELEASE
    gone_read, gone_write = os.pipe()
    os.close(gone_read)
    release_held(gone_write)  # its process died while it waited: no error
    os.close(pipe_read)


def test_an_operation_is_answered_before_its_after_work_and_the_next_frame_waits_for_that_work():
    import threading

    from agentkube.ebpf.frames import Answered, serve_connection
    from agentkube.ebpf.models import PoolSlot
    from agentkube.ebpf.unixhttp import Peer

    release, done = threading.Event(), []

    def rest():
        release.wait(10)
        done.append("rest")

    operations = {
        "finish": lambda peer, memo, message: Answered(PoolSlot(call_id="c", cgroup="/x"), rest),
        "after": lambda peer, memo, message: list(done),
        "broken": lambda peer, memo, message: Answered({}, lambda: 1 / 0),
    }
    left, right = socket.socketpair()
    server = threading.Thread(target=serve_connection, args=(right, Peer(1, 0, 0), operations))
    server.start()
    with left:
        left.sendall(encode({"op": "finish"}))
        assert read_frame(left, 1024) == {"status": 200, "body": {"call_id": "c", "cgroup": "/x"}}
        assert done == []  # answered while its after-work still waits
        left.sendall(encode({"op": "after"}))
        release.set()
        assert read_frame(left, 1024) == {"status": 200, "body": ["rest"]}
        left.sendall(encode({"op": "broken"}))
        assert read_frame(left, 1024) == {"status": 200, "body": {}}
        left.sendall(encode({"op": "after"}))  # a failing after-work leaves the connection serving
        assert read_frame(left, 1024) == {"status": 200, "body": ["rest"]}
    server.join(5)
    right.close()


def test_the_held_program_runs_its_command_only_once_released_and_exits_125_without_one(tmp_path):
    program = tmp_path / "held"
    subprocess.run(["cc", "-static", "-O2", "-o", str(program), str(SOURCE)], check=True)

    def run(command: bytes, release: bytes = RELEASE) -> tuple[int, bytes]:
        ready_read, ready_write = os.pipe()
        command_read, command_write = os.pipe()
        release_read, release_write = os.pipe()
        out_read, out_write = os.pipe()
        pid = os.posix_spawn(str(program), [str(program)], {"PATH": os.environ["PATH"]}, file_actions=[
            (os.POSIX_SPAWN_DUP2, out_write, 1), (os.POSIX_SPAWN_DUP2, command_read, 3),
            (os.POSIX_SPAWN_DUP2, ready_write, 4), (os.POSIX_SPAWN_DUP2, release_read, 5)])
        for fd in (command_read, ready_write, out_write, release_read):
            os.close(fd)
        assert os.read(ready_read, 1) == b"r"  # ready before it is given anything
        os.close(ready_read)
        os.write(command_write, command)  # its whole command waits in the pipe: nothing runs before the release
        os.close(command_write)
        assert os.waitpid(pid, os.WNOHANG) == (0, 0)
        os.write(release_write, release)
        os.close(release_write)
        with os.fdopen(out_read, "rb") as out:
            output = out.read()
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), output

    echoed = run(command_frame(str(tmp_path), ["sh", "-c", 'pwd; printf "%s|" "$@"', "sh", "a b", ""]))
    assert echoed == (0, f"{tmp_path}\na b||".encode())
    assert run(b"")[0] == 125
    assert run(command_frame(None, ["sh", "-c", "echo ran"]), release=b"") == (125, b"")  # never released: runs nothing
    assert run(command_frame(None, ["/nonexistent/x"]))[0] == 127
    assert run(command_frame("/nonexistent", ["true"]))[0] == 126
    # A sandbox's own variables reach the command (over the held process's environment), and only its command.
    assert run(command_frame(None, ["sh", "-c", 'printf "%s|%s" "$TASK" "$PATH"'], {"TASK": "t 1", "PATH": "/usr/bin:/bin"})) \
        == (0, b"t 1|/usr/bin:/bin")
    assert run(command_frame(None, ["sh", "-c", 'printf "%s" "${TASK-unset}"']))[1] == b"unset"
    for malformed in (b"\0x\0true\0", b"\0-1\0true\0", b"\0005\0A=1\0true\0", b"\0001\0NOEQUALS\0true\0"):
        assert run(malformed)[0] == 125, malformed  # a frame it cannot read runs nothing


def test_frames_share_connections_across_threads_speak_beside_http_and_survive_a_restarted_server(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from agentkube.ebpf.frames import FrameClient
    from agentkube.ebpf.unixhttp import ApiError, UnixHttpServer, request

    path = tmp_path / "agent.sock"
    peers = set()

    def echo(peer, memo, message):
        memo["count"] = memo.get("count", 0) + 1
        peers.add(id(memo))
        if message.get("refuse"):
            raise HttpError(403, "no")
        return {"value": message["value"], "on_this_connection": memo["count"]}

    def serve():
        server = UnixHttpServer(path, {("GET", "/v1/ping"): lambda peer, params, body: (200, {"pong": True})},
                                frames={"echo": echo})
        server.start()
        return server

    server = serve()
    client = FrameClient(path)
    try:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda i: client.request("echo", value=i), range(40)))
        assert [a["value"] for a in answers] == list(range(40))
        assert len(peers) <= 4  # kept-alive connections, reused by whichever thread comes next
        with pytest.raises(ApiError) as refused:
            client.request("echo", value=1, refuse=True)
        assert refused.value.status == 403
        with pytest.raises(ApiError) as unknown:
            client.request("nothing")
        assert unknown.value.status == 404
        assert request(path, "GET", "/v1/ping") == {"pong": True}  # HTTP on the same socket
        server.stop()
        server = serve()  # a restarted agent: idle connections are closed ones now
        assert client.request("echo", value=7)["value"] == 7
    finally:
        client.close()
        server.stop()


def test_frames_open_with_an_http_upgrade_which_a_server_without_frames_refuses_at_once(tmp_path):
    from agentkube.ebpf.frames import FrameClient, FramesRefused
    from agentkube.ebpf.unixhttp import UnixHttpServer, request

    ping = {("GET", "/v1/ping"): lambda peer, params, body: (200, {"pong": True})}
    seen = []
    with_frames = UnixHttpServer(tmp_path / "frames.sock", ping, frames={
        "echo": lambda peer, memo, message: seen.append(peer.pid) or {"value": message["value"]}})
    without = UnixHttpServer(tmp_path / "http.sock", ping)
    with_frames.start()
    without.start()
    vetted = []
    upgraded = FrameClient(tmp_path / "frames.sock", upgrade=True, check_server=lambda server: vetted.append(server.pid))
    refused = FrameClient(tmp_path / "http.sock", upgrade=True)
    try:
        assert [upgraded.request("echo", value=i)["value"] for i in range(3)] == [0, 1, 2]
        assert vetted == [os.getpid()] and seen == [os.getpid()] * 3  # one connection, its server vetted once
        assert request(tmp_path / "frames.sock", "GET", "/v1/ping") == {"pong": True}  # HTTP beside it
        with pytest.raises(FramesRefused, match="404"):
            refused.request("echo", value=1)
        assert request(tmp_path / "http.sock", "GET", "/v1/ping") == {"pong": True}  # the refusal cost it nothing
    finally:
        upgraded.close()
        with_frames.stop()
        without.stop()


def _run_result(stdout: str) -> dict:
    usage = {"duration_seconds": 0.01, "exit_code": 0, "signal": None, "timed_out": False, "peak_memory_bytes": 1,
             "cpu_seconds": 0.0, "throttled_seconds": 0.0, "oom_kills": 0, "processes_spawned": 1,
             "connections_blocked": 0, "memory_high_events": 0, "pids_limit_hits": 0}
    return {"call_id": "c1", "exit_code": 0, "signal": None, "stdout": stdout, "stderr": "", "sources": {},
            "limits": {"memory": 1 << 20, "cpu": 1.0, "pids": 8, "timeout": 10}, "usage": usage}


def test_the_sdk_runs_calls_in_frames_and_in_http_against_a_runtime_without_them(tmp_path):
    from agentkube.client import Sandbox
    from agentkube.ebpf.unixhttp import ApiError, UnixHttpServer

    def run(request: dict) -> dict:
        if request["intent"].get("memory") == 1 << 40:
            raise HttpError(422, "above the envelope")
        return _run_result(" ".join(request["argv"]))

    old = UnixHttpServer(tmp_path / "old.sock", {("POST", "/v1/run"): lambda peer, params, body: (200, run(body))})
    new = UnixHttpServer(tmp_path / "new.sock", {}, frames={"run": lambda peer, memo, message: run(message["run"])})
    old.start()
    new.start()
    try:
        for runtime in ("old", "new"):
            box = Sandbox("box", socket=tmp_path / f"{runtime}.sock")
            assert [box.run(["echo", str(i)]).stdout for i in range(2)] == ["echo 0", "echo 1"], runtime
            assert (box._frames is None) == (runtime == "old")
            with pytest.raises(ApiError) as refused:
                box.run(["true"], memory=1 << 40)
            assert (refused.value.status, refused.value.message) == (422, "above the envelope")
    finally:
        old.stop()
        new.stop()


def test_spawn_sets_the_childs_descriptors_environment_and_session():
    from agentkube.ebpf.spawn import spawn

    out_read, out_write = os.pipe()
    code = "import os; print(os.getsid(0) == os.getpid(), os.environ['AGENTKUBE_X'], os.read(3, 5).decode())"
    extra_read, extra_write = os.pipe()
    os.write(extra_write, b"fd3ok")
    os.close(extra_write)
    try:
        pid = spawn([sys.executable, "-c", code], {"AGENTKUBE_X": "given"}, [(out_write, 1), (extra_read, 3)])
    finally:
        os.close(out_write)
        os.close(extra_read)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    with os.fdopen(out_read) as out:
        assert out.read().split() == ["True", "given", "fd3ok"]


def test_a_spawned_command_dies_of_a_closed_pipe_as_in_a_shell():
    """Python ignores SIGPIPE; a tool call must not inherit that: `yes | head -1` ends with yes killed by the
    signal, not writing "Broken pipe" errors."""
    from agentkube.ebpf.spawn import spawn

    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN  # the case that matters: ignored here
    out_read, out_write = os.pipe()
    pid = spawn(["/bin/sh", "-c", "grep SigIgn /proc/self/status"], {}, [(out_write, 1)])
    os.close(out_write)
    os.waitpid(pid, 0)
    with os.fdopen(out_read) as out:
        ignored = int(out.read().split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1)) and not ignored & (1 << (signal.SIGXFSZ - 1)), hex(ignored)


def test_spawn_of_a_missing_program_raises_in_the_caller():
    from agentkube.ebpf.spawn import spawn

    with pytest.raises(OSError):
        spawn(["/nonexistent/agentkube-program"], {}, [])


def test_a_held_process_gets_its_pipes_whatever_numbers_they_have_here(tmp_path):
    # Pipes made while other threads close descriptors can land on fd 3 or 4, the targets of the child's
    # dup2s: a ready pipe numbered 3 must still become the held process's fd 4, not be overwritten by its
    # command pipe (which the child gets on fd 3 first).
    script = f"""
import os, sys, pathlib
sys.path[:0] = {sys.path!r}
from agentkube.ebpf.held import build, command_frame
from agentkube.ebpf import runtime
program = build(pathlib.Path({str(tmp_path / "held")!r}))
low = [os.open(os.devnull, os.O_RDONLY) for _ in range(2)]  # the lowest free numbers taken first
ready_read, ready_write = os.pipe()
os.dup2(ready_write, 3); os.close(ready_write)  # the ready pipe's write end is fd 3
release_read, release_write = os.pipe()
held = runtime._spawn([str(program)], ready_fd=3, release_fd=release_read)
os.close(3); os.close(release_read)
assert os.read(ready_read, 1) == b"r"
os.write(release_write, b"g"); os.close(release_write)
os.write(held.command, command_frame(None, ["sh", "-c", "exit 7"])); os.close(held.command)
print(os.waitstatus_to_exitcode(os.waitpid(held.pid, 0)[1]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "7", done.stderr  # it said it was ready and ran its command


def test_the_unix_http_server_answers_in_one_buffered_write_and_still_says_100_continue_at_once(tmp_path):
    from agentkube.ebpf.unixhttp import UnixHttpServer, request

    server = UnixHttpServer(tmp_path / "s.sock", {("POST", "/x"): lambda peer, params, body: (200, {"got": body})})
    server.start()
    try:
        assert request(tmp_path / "s.sock", "POST", "/x", {"a": 1}) == {"got": {"a": 1}}
        with socket.socket(socket.AF_UNIX) as client:  # a client (curl) that holds its body back until told
            client.settimeout(10)
            client.connect(str(tmp_path / "s.sock"))
            client.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\nContent-Type: application/json\r\n"
                           b"Expect: 100-continue\r\n\r\n")
            assert client.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
            client.sendall(b'{"b":2}')
            assert client.recv(1000).endswith(b'{"got": {"b": 2}}')
    finally:
        server.stop()


def test_a_command_larger_than_the_pipe_is_written_in_part_before_the_release_and_the_rest_after(tmp_path):
    from agentkube.ebpf import runtime
    from agentkube.ebpf.held import build

    program = build(tmp_path / "held")
    held = runtime.spawn_held(program)
    try:
        assert held.command is not None and held.release is not None
        os.set_blocking(held.command, False)  # as the pool leaves a filled process's command pipe
        command = command_frame(None, ["sh", "-c", 'printf "%s" "${#1}"', "sh", "x" * 100_000])
        rest = runtime._send_command(held, command)
        assert 0 < len(rest) < len(command)  # the pipe took what it holds; nothing ran meanwhile
        assert os.waitpid(held.pid, os.WNOHANG) == (0, 0)
        os.write(held.release, RELEASE)  # the agent's release
        os.set_blocking(held.command, True)
        runtime._write_all(held.command, rest)  # the runtime's part once released (_run_held)
        os.close(held.command)
        held.command = None
        with os.fdopen(held.stdout, "rb", closefd=False) as out:
            output = out.read()
        assert output == b"100000"
        assert os.waitstatus_to_exitcode(os.waitpid(held.pid, 0)[1]) == 0
        held.pid = 0
    finally:
        held.close(kill=bool(held.pid))


def test_the_forker_makes_held_processes_that_are_the_callers_children_and_run_their_command_once_released(tmp_path):
    from agentkube.ebpf import runtime
    from agentkube.ebpf.held import Forker, build

    program = build(tmp_path / "held")
    forker = Forker(program)
    try:
        helds = [runtime.spawn_held(program, forker) for _ in range(3)]
        for held in helds:
            status = Path(f"/proc/{held.pid}/status").read_text()
            assert f"\nPPid:\t{os.getpid()}\n" in status  # the runtime's child, as the node agent requires
            assert os.getsid(held.pid) == held.pid  # a session of its own, as a spawned one
            assert Path(f"/proc/{held.pid}/comm").read_text().strip() == "held"
            assert os.waitpid(held.pid, os.WNOHANG) == (0, 0)  # waiting for its release
        first = helds[0]
        os.write(first.command, command_frame(None, ["sh", "-c", 'echo "$0 $$ $PPID"'], {}))
        os.close(first.command)
        first.command = None
        os.write(first.release, RELEASE)
        with os.fdopen(first.stdout, "rb", closefd=False) as out:
            assert out.read().split() == [b"sh", str(first.pid).encode(), str(os.getpid()).encode()]
        assert os.waitstatus_to_exitcode(os.waitpid(first.pid, 0)[1]) == 0
        first.pid = 0
        for held in helds[1:]:  # never released: they exit 125 at EOF of their release pipe, reaped here
            held.close()
    finally:
        forker.close()
    with pytest.raises(OSError):
        runtime.spawn_held(program, forker)  # a closed forker serves no more


def test_a_stopped_forker_is_given_up_and_an_older_held_program_has_none(tmp_path, monkeypatch):
    import signal

    from agentkube.ebpf import held as held_module
    from agentkube.ebpf import runtime

    program = held_module.build(tmp_path / "held")
    monkeypatch.setattr(held_module, "FORKER_TIMEOUT_SECONDS", 0.2)
    forker = held_module.Forker(program)
    os.kill(forker.pid, signal.SIGSTOP)  # a tool call runs as the same user and may do this
    with pytest.raises(OSError):
        runtime.spawn_held(program, forker)
    assert not forker.serving and forker.pid == 0  # killed and reaped
    older = tmp_path / "older.c"  # a held program of a release before the forker: it exits instead of "F"
    older.write_text("#include <unistd.h>\nint main(void) { return write(4, \"r\", 1) == 1 ? 0 : 125; }\n")
    with pytest.raises(OSError, match="no forker mode"):
        held_module.Forker(held_module.build(tmp_path / "older", older))


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the forker as another user")
def test_a_forked_held_process_is_non_dumpable_from_its_birth(tmp_path):
    # A non-dumpable process's /proc files belong to root whoever runs it, so a tool call of the same user
    # cannot ptrace it nor read its descriptors. Run as nobody, where that shows (root owns everything).
    from agentkube.ebpf.held import build

    shared = Path(tempfile.mkdtemp(prefix="agentkube-forker-"))
    try:
        shared.chmod(0o755)
        program = build(shared / "held")
        program.chmod(0o755)
        code = (  # imported as root (this Python's files are root's alone), then run as nobody
            "import os\nfrom pathlib import Path\nfrom agentkube.ebpf import runtime\nfrom agentkube.ebpf.held import Forker\n"
            "os.setgid(65534); os.setuid(65534)\n"
            f"program = Path({str(program)!r})\nforker = Forker(program)\nheld = runtime.spawn_held(program, forker)\n"
            "owner = lambda pid: Path(f'/proc/{pid}/fd').stat().st_uid\n"
            # A process that changed its user is made non-dumpable itself: the control is a child it execs.
            # (its exec makes it dumpable just after the point where Popen returns: wait for that).
            "import subprocess, time\nplain = subprocess.Popen(['/bin/sleep', '30'])\n"
            "for _ in range(200):\n    time.sleep(0.01)\n    if owner(plain.pid):\n        break\n"
            "print(owner(plain.pid), owner(forker.pid), owner(held.pid))\nplain.kill(); held.close(); forker.close()\n")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["65534", "0", "0"]  # a plain child dumpable; the forker and its child not
    finally:
        shutil.rmtree(shared)
