"""The sandbox runtime: the small server inside a sandbox that runs each command as a tool call.

It needs no privilege: it forks the child, holds it before `exec` (the child blocks on a pipe), asks the
node agent to place that PID in a new call cgroup, and releases it only then, so not one instruction of
the command runs outside its limits. When the child ends it tells the node agent, which kills whatever
the command left behind, removes the cgroup and answers with the call's usage.

    POST /v1/run      RunRequest → RunResult
    GET  /v1/status   the sandbox's status from the node agent (last activity, running calls)
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from agentkube.ebpf.models import (
    MAX_OUTPUT_BYTES,
    CallCreate,
    CallPlaced,
    CallRecord,
    RunRequest,
    RunResult,
    SandboxCreate,
    SandboxRef,
    SandboxStatus,
)
from agentkube.ebpf.unixhttp import ApiError, HttpError, UnixHttpServer, request

RUNTIME_SOCKET_DIR = Path("/run/agentkube/sandboxes")
AGENT_RETRY_SECONDS = 60.0  # how long a finished call's report waits for a restarting node agent
HELD_EXIT_CODE = 125  # the held child exits with this if it is never released


def runtime_socket(namespace: str, name: str, directory: Path = RUNTIME_SOCKET_DIR) -> Path:
    return directory / namespace / f"{name}.sock"


class _Capture:
    """Reads one output pipe to the end in a thread, keeping at most MAX_OUTPUT_BYTES."""

    def __init__(self, fd: int):
        self.fd = fd
        self.kept = bytearray()
        self.dropped = 0
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while chunk := os.read(self.fd, 65536):
                room = MAX_OUTPUT_BYTES - len(self.kept)
                self.kept += chunk[:room]
                self.dropped += max(0, len(chunk) - room)
        finally:
            os.close(self.fd)

    def text(self, timeout: float) -> str:
        self.thread.join(timeout)
        return self.kept.decode(errors="replace")


def _agent_call(agent_socket: Path, method: str, path: str, body: object, retry_for: float = 0.0) -> object:
    """A request to the node agent, retried while it is away (restarting) for up to `retry_for` s."""
    deadline = time.monotonic() + retry_for
    while True:
        try:
            return request(agent_socket, method, path, body)
        except (ConnectionRefusedError, FileNotFoundError, ConnectionResetError, BrokenPipeError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def run_call(agent_socket: Path, sandbox: SandboxRef, run: RunRequest) -> RunResult:
    go_read, go_write = os.pipe()
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    in_read, in_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only os calls until exec
        try:
            os.close(go_write), os.close(out_read), os.close(err_read), os.close(in_write)
            os.dup2(in_read, 0), os.dup2(out_write, 1), os.dup2(err_write, 2)
            os.setsid()  # its own session: a terminal signal for the runtime never reaches the command
            if os.read(go_read, 1) != b"g":
                os._exit(HELD_EXIT_CODE)
            os.close(go_read)
            if run.cwd:
                os.chdir(run.cwd)
            os.execvp(run.argv[0], run.argv)
        except BaseException as error:
            try:
                os.write(2, f"agentkube: cannot run {run.argv[0]}: {error}\n".encode())
            finally:
                os._exit(127)
    os.close(go_read), os.close(out_write), os.close(err_write), os.close(in_read)
    stdout, stderr = _Capture(out_read), _Capture(err_read)
    try:
        placed = CallPlaced.model_validate(_agent_call(agent_socket, "POST", "/v1/calls", CallCreate(
            name=sandbox.name, namespace=sandbox.namespace, pid=pid, argv=run.argv, intent=run.intent)))
    except BaseException:
        os.close(go_write)  # the held child exits without running anything
        os.close(in_write)
        os.waitpid(pid, 0)
        raise
    os.write(go_write, b"g")
    os.close(go_write)
    threading.Thread(target=_feed, args=(in_write, (run.stdin or "").encode()), daemon=True).start()
    _, status = os.waitpid(pid, 0)
    exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    killed_by = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    record = CallRecord.model_validate(_agent_call(
        agent_socket, "POST", f"/v1/calls/{placed.call_id}/finish",
        {"exit_code": exit_code, "signal": killed_by}, retry_for=AGENT_RETRY_SECONDS))
    # The agent has killed whatever the command left running, so the pipes reach their end now.
    return RunResult(
        call_id=placed.call_id, exit_code=exit_code, signal=killed_by,
        stdout=stdout.text(timeout=10), stderr=stderr.text(timeout=10),
        stdout_truncated_bytes=stdout.dropped, stderr_truncated_bytes=stderr.dropped,
        limits=placed.limits, sources=placed.sources, usage=record.usage,
    )


def _feed(fd: int, data: bytes) -> None:
    try:
        if data:
            os.write(fd, data)
    except BrokenPipeError:
        pass
    finally:
        os.close(fd)


class SandboxRuntime:
    def __init__(self, sandbox: SandboxRef, agent_socket: Path, socket_path: Path):
        self.sandbox = sandbox
        self.agent_socket = Path(agent_socket)
        self.server = UnixHttpServer(socket_path, self._routes())

    def _routes(self) -> dict:
        def run(peer, params, body):
            if peer.uid != 0 and peer.uid != os.getuid():
                raise HttpError(403, f"uid {peer.uid} may not run commands in this sandbox")
            if not isinstance(body, dict):
                raise HttpError(400, "expected a JSON object")
            try:
                return 200, run_call(self.agent_socket, self.sandbox, RunRequest.model_validate(body))
            except ApiError as error:  # the node agent refused: pass its verdict on
                raise HttpError(error.status, error.message) from None

        def status(peer, params, body):
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
