"""The sandbox runtime: the small server inside a sandbox that runs each command as a tool call.

It needs no privilege: it starts the child and holds it before `exec` of the command (a tiny shell
blocks on a pipe), asks the node agent to place that PID in a new call cgroup, and releases it only then,
so not one instruction of the command runs outside its limits. When the child ends it tells the node agent, which kills whatever
the command left behind, removes the cgroup and answers with the call's usage.

    POST /v1/run      RunRequest → RunResult
    GET  /v1/status   the sandbox's status from the node agent (last activity, running calls)
"""

from __future__ import annotations

import ctypes
import http.client
import os
import selectors
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agentkube.contract import CALL_PREFIX
from agentkube.ebpf.models import (
    MAX_OUTPUT_BYTES,
    UNREGISTERED,
    CallPlaced,
    CallRecord,
    RunRequest,
    RunResult,
    SandboxCreate,
    SandboxRef,
    SandboxStatus,
    Usage,
)
from agentkube.ebpf.unixhttp import ApiError, Client, HttpError, UnixHttpServer, request

AGENT_RETRY_SECONDS = 60.0  # how long a finished call's report waits for a restarting node agent
# In Kubernetes the node agent registers a pod's sandbox once it sees the container running (well under a
# second later): a call that comes first waits this long for it rather than failing.
REGISTRATION_WAIT_SECONDS = 10.0
PR_SET_DUMPABLE = 4
HELD_EXIT_CODE = 125  # the held child exits with this if it is never released
# The held child: waits for the release line on fd 3 (EOF: never released), closes it, enters the call's
# working directory if one is given ($1), and becomes the command.
HOLDER = ["/bin/sh", "-c",
          f'read -r _ <&3 || exit {HELD_EXIT_CODE}; exec 3<&-; [ -z "$1" ] || cd -- "$1" || exit 126; shift; exec "$@"',
          "agentkube-held"]


def inside_a_call(peer_pid: int) -> bool:
    """Whether the process at the other end of a connection runs inside a tool call: whether its cgroup is
    a call's (a call's processes can never move out of it). A process of another PID namespace (the SDK on
    the node, a gateway) shows as pid 0 and is never a call."""
    if peer_pid == 0:
        return False
    try:
        peer = Path(f"/proc/{peer_pid}/cgroup").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True  # gone before it could be asked about: nothing to serve
    return any(part.startswith(CALL_PREFIX) for line in peer.splitlines() for part in line.rsplit(":", 1)[-1].split("/"))


def refuse_tracing() -> None:
    """Make this process non-dumpable: a tool call runs as the same user and could otherwise ptrace the
    runtime (or write its memory through /proc) and make it place calls on its behalf."""
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0)")


class _Output:
    """One output stream of a call, keeping at most MAX_OUTPUT_BYTES and counting the rest."""

    def __init__(self) -> None:
        self.kept = bytearray()
        self.dropped = 0

    def add(self, chunk: bytes) -> None:
        room = MAX_OUTPUT_BYTES - len(self.kept)
        self.kept += chunk[:room]
        self.dropped += max(0, len(chunk) - room)

    def text(self) -> str:
        return self.kept.decode(errors="replace")


class _Pump:
    """Moves a call's stdin, stdout and stderr, and notices its first process's exit (pidfd), all in the
    calling thread: no thread per stream on the path of every call."""

    def __init__(self, pid: int, stdin_fd: int, stdin: bytes, stdout_fd: int, stderr_fd: int,
                 on_output: OutputSink | None = None):
        self.selector = selectors.DefaultSelector()
        self.outputs = {stdout_fd: _Output(), stderr_fd: _Output()}
        self.names = {stdout_fd: "stdout", stderr_fd: "stderr"}
        self.on_output = on_output
        for fd in self.outputs:
            self.selector.register(fd, selectors.EVENT_READ, "output")
        self.pidfd = os.pidfd_open(pid)
        self.selector.register(self.pidfd, selectors.EVENT_READ, "exit")
        self.stdin = memoryview(stdin)
        self.stdin_fd: int | None = stdin_fd
        if stdin:
            os.set_blocking(stdin_fd, False)
            self.selector.register(stdin_fd, selectors.EVENT_WRITE, "input")
        else:
            self._close_stdin()

    def _close_stdin(self) -> None:
        if self.stdin_fd is not None:
            if self.stdin:
                self.selector.unregister(self.stdin_fd)
            os.close(self.stdin_fd)
            self.stdin_fd = None

    def _step(self, timeout: float | None) -> bool:
        """One round of I/O; True once the first process has exited."""
        exited = False
        for key, _ in self.selector.select(timeout):
            if key.data == "exit":
                exited = True
            elif key.data == "output":
                chunk = os.read(key.fd, 65536)
                if chunk:
                    self.outputs[key.fd].add(chunk)
                    if self.on_output is not None:
                        self.on_output(self.names[key.fd], chunk)
                else:
                    self.selector.unregister(key.fd)
                    os.close(key.fd)
            else:
                try:
                    written = os.write(key.fd, self.stdin[:65536])
                    self.stdin = self.stdin[written:]
                except BrokenPipeError:
                    self.stdin = self.stdin[:0]
                if not self.stdin:
                    self.selector.unregister(key.fd)
                    os.close(key.fd)
                    self.stdin_fd = None
        return exited

    def until_exit(self) -> None:
        while not self._step(None):
            pass
        self.selector.unregister(self.pidfd)
        os.close(self.pidfd)
        self._close_stdin()

    def drain(self, timeout: float) -> None:
        """Read the outputs to their end; the agent has killed everything that could still write."""
        deadline = time.monotonic() + timeout
        while self.selector.get_map() and time.monotonic() < deadline:
            self._step(max(0.0, deadline - time.monotonic()))
        for fd in list(self.selector.get_map()):
            self.selector.unregister(fd)
            os.close(fd)  # type: ignore[arg-type]  # registered as ints
        self.selector.close()

    def text(self, fd: int) -> tuple[str, int]:
        return self.outputs[fd].text(), self.outputs[fd].dropped


# A stream's name ("stdout" or "stderr") and the bytes just read from it.
OutputSink = Callable[[str, bytes], None]

_clients: dict[str, Client] = {}


def _agent_call(agent_socket: Path, method: str, path: str, body: object, retry_for: float = 0.0,
                unregistered_for: float = 0.0) -> object:
    """A request to the node agent, retried while it is away (restarting) for up to `retry_for` s, and
    while it does not know this sandbox yet for up to `unregistered_for` s."""
    client = _clients.get(str(agent_socket)) or _clients.setdefault(str(agent_socket), Client(agent_socket))
    started = time.monotonic()
    while True:
        try:
            return client.request(method, path, body)
        except (ConnectionRefusedError, FileNotFoundError, ConnectionResetError, BrokenPipeError,
                http.client.RemoteDisconnected):
            if time.monotonic() - started > retry_for:
                raise
        except ApiError as error:
            if not (error.status == 404 and error.message.startswith(UNREGISTERED)) \
                    or time.monotonic() - started > unregistered_for:
                raise
        time.sleep(0.1)


def run_call(agent_socket: Path, sandbox: SandboxRef, run: RunRequest, on_placed: Callable[[CallPlaced], None] | None = None,
             on_output: OutputSink | None = None) -> RunResult:
    """Run one command as a tool call. `on_placed` is told once the node agent has placed it (before it
    runs: a refusal raises before), `on_output` gets each chunk of its output as it is read. Neither may
    raise: the call is finished with the node agent whatever becomes of whoever watches it."""
    go_read, go_write = os.pipe()
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    in_read, in_write = os.pipe()
    # posix_spawn (vfork-like) rather than fork: no copy of this process's page tables per call, and no
    # forked copy of a threaded interpreter. The child is a tiny shell that waits for the release byte on
    # fd 3, then execs the command in place (same PID, so the placement carries over).
    try:
        pid = os.posix_spawn(HOLDER[0], [*HOLDER, run.cwd or "", *run.argv], os.environ, setsid=True,
                             file_actions=[(os.POSIX_SPAWN_DUP2, in_read, 0), (os.POSIX_SPAWN_DUP2, out_write, 1),
                                           (os.POSIX_SPAWN_DUP2, err_write, 2), (os.POSIX_SPAWN_DUP2, go_read, 3)])
    except BaseException:
        for fd in (go_read, go_write, out_read, out_write, err_read, err_write, in_read, in_write):
            os.close(fd)
        raise
    for fd in (go_read, out_write, err_write, in_read):  # the child's ends
        os.close(fd)
    try:
        placed = CallPlaced.model_validate(_agent_call(agent_socket, "POST", "/v1/calls", {
            "name": sandbox.name, "namespace": sandbox.namespace, "pid": pid, "argv": run.argv, "intent": run.intent},
            unregistered_for=REGISTRATION_WAIT_SECONDS))
    except BaseException:
        for fd in (go_write, in_write, out_read, err_read):  # the held child exits without running anything
            os.close(fd)
        os.waitpid(pid, 0)
        raise
    if on_placed is not None:
        on_placed(placed)
    pump = _Pump(pid, in_write, (run.stdin or "").encode(), out_read, err_read, on_output)
    os.write(go_write, b"g\n")
    os.close(go_write)
    pump.until_exit()
    _, status = os.waitpid(pid, 0)
    exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    killed_by = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    record = CallRecord.model_validate(_agent_call(
        agent_socket, "POST", f"/v1/calls/{placed.call_id}/finish",
        {"exit_code": exit_code, "signal": killed_by}, retry_for=AGENT_RETRY_SECONDS))
    pump.drain(timeout=10)
    (stdout, stdout_dropped), (stderr, stderr_dropped) = pump.text(out_read), pump.text(err_read)
    return RunResult(
        call_id=placed.call_id, exit_code=exit_code, signal=killed_by, stdout=stdout, stderr=stderr,
        stdout_truncated_bytes=stdout_dropped, stderr_truncated_bytes=stderr_dropped,
        limits=placed.limits, sources=placed.sources, usage=_finished(record),
    )


def _finished(record: CallRecord) -> Usage:
    if record.usage is None:  # the agent answers a finish with the finished record, usage included
        raise ApiError(502, f"the node agent finished call {record.call_id} without its usage")
    return record.usage


class SandboxRuntime:
    def __init__(self, sandbox: SandboxRef, agent_socket: Path, socket_path: Path):
        self.sandbox = sandbox
        self.agent_socket = Path(agent_socket)
        self.server = UnixHttpServer(socket_path, self._routes())

    def _routes(self) -> dict:
        def run(peer, params, body):
            if peer.uid != 0 and peer.uid != os.getuid():
                raise HttpError(403, f"uid {peer.uid} may not run commands in this sandbox")
            if inside_a_call(peer.pid):
                raise HttpError(403, "a process inside this sandbox may not run commands through its runtime: "
                                     "only callers outside the sandbox (the SDK on the node, the gateway) may")
            if not isinstance(body, dict):
                raise HttpError(400, "expected a JSON object")
            try:
                return 200, run_call(self.agent_socket, self.sandbox, RunRequest.model_validate(body))
            except ApiError as error:  # the node agent refused: pass its verdict on
                raise HttpError(error.status, error.message) from None

        def status(peer, params, body):
            if inside_a_call(peer.pid):
                raise HttpError(403, "a process inside this sandbox may not ask its runtime for anything")
            path = f"/v1/sandboxes/{self.sandbox.namespace}/{self.sandbox.name}"
            return 200, SandboxStatus.model_validate(request(self.agent_socket, "GET", path))

        return {("POST", "/v1/run"): run, ("GET", "/v1/status"): status}

    def serve(self, stop: threading.Event) -> None:
        self.server.start()
        stop.wait()
        self.server.stop()


def register_local_sandbox(agent_socket: Path, spec: SandboxCreate) -> SandboxStatus:
    """--local: make a sandbox with this process as its main process."""
    spec = spec.model_copy(update={"pid": os.getpid()})
    return SandboxStatus.model_validate(request(agent_socket, "POST", "/v1/sandboxes", spec))


def install_stop_signals(stop: threading.Event) -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
