"""Background processes: tool calls that run on after the request that started them.

A background process is started exactly like any call (`runtime.run_call`: its own cgroup and limits,
placed by the node agent before its first instruction, finished and accounted by it), in a thread of the
runtime instead of a request's. What is kept beside it: its stdin's write end (written through the API),
and a bounded log of each output stream that any caller can read from any byte offset.

Bounds: each stream keeps its newest MAX_PROCESS_OUTPUT_BYTES; older bytes are dropped, and a read from an
offset before the kept ones starts at the oldest kept byte (its `offset` says where). The runtime keeps
MAX_PROCESSES processes, running and finished; starting one more forgets the oldest finished one, and is
refused (429) when all are running. A process lives no longer than its call's timeout (the node agent kills
its cgroup then) and goes with the sandbox (the node agent finishes a sandbox's calls when it goes; the
runtime kills its processes when it stops).
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agentkube.ebpf.models import (
    MAX_PROCESS_OUTPUT_BYTES,
    MAX_PROCESS_WAIT_SECONDS,
    MAX_PROCESSES,
    PROCESS_SIGNALS,
    OutputChunk,
    ProcessInfo,
    ProcessOutput,
    RunRequest,
    RunResult,
    SandboxRef,
)
from agentkube.ebpf.unixhttp import ApiError

STDIN_WAIT_SECONDS = 5.0  # how long a stdin write waits for a process that does not read


def utf8_complete(data: bytes) -> int:
    """How many leading bytes of `data` end on a UTF-8 character boundary: a multi-byte character cut at
    the end is left for the next read (at most 3 bytes; invalid bytes count as complete)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # the start of the last character (or an ASCII byte)
            needed = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
            return len(data) - back if needed > back else len(data)
    return len(data)


class OutputLog:
    """One stream's newest `limit` bytes, addressed by their offset in everything the stream produced."""

    def __init__(self, limit: int = MAX_PROCESS_OUTPUT_BYTES):
        self.limit = limit
        self.kept = bytearray()
        self.total = 0  # bytes produced so far: the offset of the next byte

    @property
    def first(self) -> int:
        return self.total - len(self.kept)

    def append(self, chunk: bytes) -> None:
        self.kept += chunk
        self.total += len(chunk)
        if len(self.kept) > self.limit:
            del self.kept[: len(self.kept) - self.limit]

    def read(self, offset: int, limit: int, final: bool) -> OutputChunk:
        """From `offset` (or the oldest kept byte), at most `limit` bytes; `final`: nothing more will come, so a
        cut character is decoded as it is."""
        start = min(max(offset, self.first), self.total)
        data = bytes(self.kept[start - self.first: start - self.first + limit])
        end = len(data) if final and start + len(data) == self.total else utf8_complete(data)
        return OutputChunk(offset=start, next=start + end, data=data[:end].decode(errors="replace"))


class Process:
    """One background process: its call, its output logs, its stdin, and its result once it has exited."""

    def __init__(self, run: RunRequest):
        from agentkube.ebpf.runtime import Started

        self.argv = list(run.argv)
        self.started_at = time.time()
        self.logs = {"stdout": OutputLog(), "stderr": OutputLog()}
        self.changed = threading.Condition()
        self.started: Started | None = None
        self.result: RunResult | None = None
        self.error: str | None = None
        self.refusal: ApiError | None = None  # the node agent refused to place it: it never ran
        self.done = False
        # Held while stdin's descriptor is written or closed (taken before `changed`): closed under a writer,
        # its number could be reused by another file of the runtime, which the writer would then write to.
        self.stdin_lock = threading.Lock()

    @property
    def id(self) -> str:
        assert self.started is not None
        return self.started.call.call_id

    def info(self) -> ProcessInfo:
        assert self.started is not None
        placed, result = self.started.call, self.result
        return ProcessInfo(
            id=placed.call_id, argv=self.argv, state="exited" if self.done else "running", started_at=self.started_at,
            limits=placed.limits, sources=placed.sources, stdout_bytes=self.logs["stdout"].total,
            stderr_bytes=self.logs["stderr"].total, exit_code=result.exit_code if result else None,
            signal=result.signal if result else None, usage=result.usage if result else None, error=self.error)

    # -- the call's thread --

    def placed(self, started) -> None:
        with self.changed:
            self.started = started
            self.changed.notify_all()

    def output(self, stream: str, chunk: bytes) -> None:
        with self.changed:
            self.logs[stream].append(chunk)
            self.changed.notify_all()

    def ended(self, result: RunResult | None, error: BaseException | None) -> None:
        self._close_stdin()
        with self.changed:
            if isinstance(error, ApiError) and self.started is None:
                self.refusal = error
            elif error is not None:
                self.error = f"{type(error).__name__}: {error}"
            self.result = result
            self.done = True
            self.changed.notify_all()

    def _close_stdin(self) -> None:
        with self.stdin_lock:
            if self.started is not None and self.started.stdin is not None:
                os.close(self.started.stdin)
                self.started.stdin = None

    # -- callers --

    def is_done(self) -> bool:
        return self.done

    def wait_until(self, ready: Callable[[], bool], seconds: float) -> None:
        deadline = time.monotonic() + min(max(seconds, 0.0), MAX_PROCESS_WAIT_SECONDS)
        with self.changed:
            while not ready() and time.monotonic() < deadline:
                self.changed.wait(deadline - time.monotonic())

    def read(self, stdout: int, stderr: int, wait: float, limit: int) -> ProcessOutput:
        """Output from the given offsets; with `wait`, held until there is some (or the process exited)."""
        self.wait_until(lambda: self.done or self.logs["stdout"].total > stdout or self.logs["stderr"].total > stderr, wait)
        with self.changed:
            return ProcessOutput(process=self.info(), stdout=self.logs["stdout"].read(stdout, limit, self.done),
                                 stderr=self.logs["stderr"].read(stderr, limit, self.done))

    def write(self, data: bytes, close: bool) -> int:
        """Write to the process's stdin; the bytes written (fewer when it does not read within
        STDIN_WAIT_SECONDS, or has exited or closed its stdin)."""
        with self.stdin_lock:
            fd = self.started.stdin if self.started else None
            if fd is None:
                if data:
                    raise ApiError(409, "the process's stdin is closed")
                return 0
            written = self._write(fd, data)
        if close:
            self._close_stdin()
        return written

    @staticmethod
    def _write(fd: int, data: bytes) -> int:
        view, written = memoryview(data), 0
        deadline = time.monotonic() + STDIN_WAIT_SECONDS
        try:
            os.set_blocking(fd, False)  # a pipe "writable" may take only a page: never block past the deadline
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            while written < len(view) and time.monotonic() < deadline:
                if poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
                    try:
                        written += os.write(fd, view[written:written + 65536])
                    except BlockingIOError:
                        continue
        except OSError:
            pass  # it exited or closed its end (EPIPE): what was written stands
        return written

    def signal(self, name: str) -> bool:
        assert self.started is not None
        return self.started.signal(PROCESS_SIGNALS[name])


class ProcessTable:
    """A sandbox runtime's background processes."""

    def __init__(self, agent_socket: Path, sandbox: SandboxRef, pool=None):
        self.agent_socket, self.sandbox, self.pool = agent_socket, sandbox, pool
        self.processes: dict[str, Process] = {}
        self.lock = threading.Lock()
        self.closed = False

    def _make_room(self) -> None:
        with self.lock:
            if self.closed:
                raise ApiError(503, "the sandbox's runtime is stopping")
            if len(self.processes) < MAX_PROCESSES:
                return
            finished = [p for p in self.processes.values() if p.done]
            if not finished:
                raise ApiError(429, f"{MAX_PROCESSES} background processes are running already: wait for one or "
                                    "kill one first")
            del self.processes[min(finished, key=lambda p: p.started_at).id]

    def start(self, run: RunRequest) -> ProcessInfo:
        """Start `run` as a background call; answers once the node agent has placed it (or raises its refusal)."""
        from agentkube.ebpf.runtime import run_call

        self._make_room()
        process = Process(run)

        def call() -> None:
            result, error = None, None
            try:
                result = run_call(self.agent_socket, self.sandbox, run, self.pool, on_placed=process.placed,
                                  on_output=process.output, keep_stdin=True, output_bytes=0)
            except BaseException as failure:  # kept for whoever asks: this thread has no caller
                error = failure
            process.ended(result, error)

        threading.Thread(target=call, name="background-call", daemon=True).start()
        with process.changed:  # placement is bounded by the agent's own waits (registration, restarts)
            while process.started is None and not process.done:
                process.changed.wait()
        if process.refusal is not None:
            raise process.refusal
        if process.started is None:
            raise ApiError(500, process.error or "the process could not be started")
        if run.stdin:
            process.write(run.stdin.encode(), close=False)
        with self.lock:
            self.processes[process.id] = process
        return process.info()

    def get(self, process_id: str) -> Process:
        with self.lock:
            process = self.processes.get(process_id)
        if process is None:
            raise ApiError(404, f"no background process {process_id!r} in this sandbox")
        return process

    def list(self) -> list[ProcessInfo]:
        with self.lock:
            processes = list(self.processes.values())
        return [p.info() for p in sorted(processes, key=lambda p: p.started_at)]

    def close(self) -> None:
        """The runtime is stopping: kill every running process (its call is then finished as usual)."""
        with self.lock:
            self.closed = True
            running = [p for p in self.processes.values() if not p.done]
        for process in running:
            process.signal("KILL")
        for process in running:
            process.wait_until(process.is_done, MAX_PROCESS_WAIT_SECONDS)
