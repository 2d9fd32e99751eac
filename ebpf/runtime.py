"""The sandbox runtime: the small server inside a sandbox that runs each command as a tool call.

It needs no privilege: it starts the child and holds it before `exec` of the command (a tiny shell
blocks on a pipe), asks the node agent to place that PID in a new call cgroup, and releases it only then,
so not one instruction of the command runs outside its limits. When the child ends it tells the node agent, which kills whatever
the command left behind, removes the cgroup and answers with the call's usage.

    POST /v1/run      RunRequest → RunResult
    GET  /v1/status   the sandbox's status from the node agent (last activity, running calls)

The same two are frames (`run` with the RunRequest as its `run` field, and `status`) on a connection that
opens with the upgrade to frames (agentkube.ebpf.frames): the SDK's way, which spares each call HTTP's parsing.
"""

from __future__ import annotations

import ctypes
import os
import selectors
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agentkube.contract import CALL_PREFIX
from agentkube.ebpf.frames import FrameClient
from agentkube.ebpf.held import COMMAND_FD, READY_FD, RELEASE, RELEASE_FD, Forker, command_frame, held_binary
from agentkube.ebpf.kernelfiles import read_text
from agentkube.ebpf.models import (
    MAX_OUTPUT_BYTES,
    UNREGISTERED,
    CallPlaced,
    RunRequest,
    RunResult,
    SandboxCreate,
    SandboxRef,
    SandboxStatus,
    Usage,
)
from agentkube.ebpf.spawn import spawn
from agentkube.ebpf.unixhttp import ApiError, HttpError, Peer, UnixHttpServer, request

AGENT_RETRY_SECONDS = 60.0  # how long a finished call's report waits for a restarting node agent
# In Kubernetes the node agent registers a pod's sandbox once it sees the container running (well under a
# second later): a call that comes first waits this long for it rather than failing.
REGISTRATION_WAIT_SECONDS = 10.0
PR_SET_DUMPABLE = 4
# How long a thread may hold the GIL while another waits (Python's default: 5 ms). The runtime and the node
# agent have threads beside a call's (pool refills, watchers); a call's next step should not wait 5 ms for one.
GIL_SWITCH_SECONDS = 0.0002
HELD_EXIT_CODE = 125  # the held child exits with this if it is never released
# Refills of the warm pool that may be under way at once: one refill is a spawn, then the agent's fill, in
# series (~2.4 ms here), longer than a back-to-back call once the agent releases the held process, so a
# single refiller let the pool run dry and calls waited for it; two overlap one's spawn with the other's fill.
REFILLERS = 2
# A forker that fails (killed, stopped) is replaced by a new one at most this many times in all; then held
# processes are spawned from the runtime, as without a forker (an older held program).
FORKER_STARTS = 3
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
        peer = read_text(f"/proc/{peer_pid}/cgroup")
    except (FileNotFoundError, ProcessLookupError):
        return True  # gone before it could be asked about: nothing to serve
    return any(part.startswith(CALL_PREFIX) for line in peer.splitlines() for part in line.rsplit(":", 1)[-1].split("/"))


def favor_latency() -> None:
    """Hand the GIL over sooner: a call's thread wakes, in both processes, while other threads run."""
    sys.setswitchinterval(GIL_SWITCH_SECONDS)


def refuse_tracing() -> None:
    """Make this process non-dumpable: a tool call runs as the same user and could otherwise ptrace the
    runtime (or write its memory through /proc) and make it place calls on its behalf."""
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0)")


class _Output:
    """One output stream of a call, keeping at most `limit` bytes and counting the rest."""

    def __init__(self, limit: int = MAX_OUTPUT_BYTES) -> None:
        self.kept = bytearray()
        self.dropped = 0
        self.limit = limit

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.kept)
        self.kept += chunk[:room]
        self.dropped += max(0, len(chunk) - room)

    def text(self) -> str:
        return self.kept.decode(errors="replace")


# A stream's name ("stdout" or "stderr") and the bytes just read from it.
OutputSink = Callable[[str, bytes], None]


@dataclass
class Started:
    """A call the node agent has placed, as its watcher sees it once released: its first process (the
    leader of a process group of its own: it was started in a new session) and, for a caller that keeps the
    call's stdin open (`run_call(keep_stdin=True)`), the write end of that stdin, which the caller closes."""

    call: CallPlaced
    pid: int
    stdin: int | None = None
    reaped: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def signal(self, signum: int) -> bool:
        """Send `signum` to the call's process group; False once its first process is reaped. Under the lock
        that reaping takes, so the pid (the group's id) is never another process's by then."""
        with self.lock:
            if self.reaped:
                return False
            try:
                os.killpg(self.pid, signum)
            except ProcessLookupError:
                return False
            return True


class _Pump:
    """Moves a call's stdin, stdout and stderr, and notices its first process's exit (pidfd), all in the
    calling thread: no thread per stream on the path of every call."""

    def __init__(self, pid: int, stdin_fd: int | None, stdin: bytes, stdout_fd: int, stderr_fd: int,
                 on_output: OutputSink | None = None, output_bytes: int = MAX_OUTPUT_BYTES):
        """`stdin_fd` None: the call's stdin belongs to someone else (a background process's writer)."""
        self.selector = selectors.DefaultSelector()
        self.outputs = {stdout_fd: _Output(output_bytes), stderr_fd: _Output(output_bytes)}
        self.names = {stdout_fd: "stdout", stderr_fd: "stderr"}
        self.on_output = on_output
        for fd in self.outputs:
            self.selector.register(fd, selectors.EVENT_READ, "output")
        self.pidfd = os.pidfd_open(pid)
        self.selector.register(self.pidfd, selectors.EVENT_READ, "exit")
        self.stdin = memoryview(stdin)
        self.stdin_fd: int | None = stdin_fd
        if stdin_fd is None:
            self.stdin = self.stdin[:0]
        elif stdin:
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


_clients: dict[str, FrameClient] = {}


def _agent_call(agent_socket: Path, op: str, retry_for: float = 0.0, unregistered_for: float = 0.0,
                **fields: object) -> object:
    """A framed request to the node agent, retried while it is away (restarting) for up to `retry_for` s,
    and while it does not know this sandbox yet for up to `unregistered_for` s."""
    client = _clients.get(str(agent_socket)) or _clients.setdefault(str(agent_socket), FrameClient(agent_socket))
    started = time.monotonic()
    while True:
        try:
            return client.request(op, **fields)
        except (ConnectionError, FileNotFoundError):  # refused, reset, or the socket not there yet
            if time.monotonic() - started > retry_for:
                raise
        except ApiError as error:
            if not (error.status == 404 and error.message.startswith(UNREGISTERED)) \
                    or time.monotonic() - started > unregistered_for:
                raise
        time.sleep(0.1)


@dataclass
class Held:
    """A started process that has not run anything of a command yet, and the runtime's ends of its pipes."""

    pid: int
    command: int | None  # where its command goes (held.c), or its release line (the shell holder); None once sent
    stdin: int
    stdout: int
    stderr: int
    release: int | None = None  # held.c's release pipe (its fd 5); None once handed to the node agent or written
    call_id: str | None = None  # the pooled call cgroup it waits in, once the agent placed it
    # A pooled process's command is written before its start: what did not fit in the pipe then (None: not sent).
    pending: bytes | None = None
    forked: bool = False  # made by the held program's forker (else spawned by this process)

    def close(self, kill: bool = False) -> None:
        """Let it go without running anything and reap it: it exits at EOF of its release pipe (or the shell
        holder's line). `kill`: that pipe is the agent's (a pooled process), or its release may have been
        written: killed first (this process's unreaped child, so its pid is still its own)."""
        if kill and self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for fd in (self.command, self.release, self.stdin, self.stdout, self.stderr):
            if fd is None:
                continue
            try:
                os.close(fd)
            except OSError:
                pass
        self.command = self.release = None
        if self.pid:
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass


def _spawn(program: list[str], ready_fd: int | None = None, release_fd: int | None = None,
           env: dict[str, str] | None = None, forker: Forker | None = None) -> Held:
    """posix_spawn (vfork-like) rather than fork: no copy of this process's page tables, and no forked copy
    of a threaded interpreter; through `spawn.spawn`, so that the other threads run meanwhile. With `forker`
    (the held program, both pipes given), the held program's forker makes it instead. The child's fd 3 is its
    command pipe; `ready_fd` becomes its fd 4 and `release_fd` its fd 5 (held.c)."""
    command_read, command_write = os.pipe()
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    in_read, in_write = os.pipe()
    child_ends = [command_read, out_write, err_write, in_read]
    dup2s = [(in_read, 0), (out_write, 1), (err_write, 2), (command_read, COMMAND_FD)]
    dup2s += [(fd, target) for fd, target in ((ready_fd, READY_FD), (release_fd, RELEASE_FD)) if fd is not None]
    try:
        if forker:
            pid = forker.fork([fd for fd, _ in sorted(dup2s, key=lambda dup2: dup2[1])])  # its 0-5, in order
        else:
            pid = spawn(program, {**os.environ, **(env or {})}, dup2s, setsid=True)
    except BaseException:
        for fd in (command_read, command_write, out_read, out_write, err_read, err_write, in_read, in_write):
            os.close(fd)
        raise
    for fd in child_ends:
        os.close(fd)
    return Held(pid, command_write, in_write, out_read, err_read)


def spawn_held(program: Path, forker: Forker | None = None) -> Held:
    """Start the held program (held.c), through its forker if given, and wait until it is non-dumpable and
    waiting for its release."""
    ready_read, ready_write = os.pipe()
    release_read, release_write = os.pipe()
    try:
        held = _spawn([str(program)], ready_fd=ready_write, release_fd=release_read, forker=forker)
    except BaseException:
        os.close(release_write)
        os.close(ready_read)
        raise
    finally:
        os.close(ready_write)
        os.close(release_read)
    held.release = release_write
    held.forked = forker is not None
    try:
        if os.read(ready_read, 1) != b"r":
            held.close()
            raise OSError(f"the held program {program} did not start")
    finally:
        os.close(ready_read)
    return held


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class WarmPool:
    """Held processes already waiting in call cgroups of this sandbox (the agent's warm pool), so that a
    call starts with one request to the agent and a write to a pipe: no process start, no cgroup made, no
    process moved on its path. Refilled by REFILLERS threads as soon as one is taken, while its call runs: a fill
    mostly waits on the kernel (the cgroup's mkdir, the move's RCU grace period) and on the agent, and its
    spawn no longer holds the interpreter's lock (spawn.py), so it takes little from the call; refilled only
    between calls, the pool drained when calls came back to back and the next call waited for a fill."""

    def __init__(self, agent_socket: Path, sandbox: SandboxRef, program: Path, size: int = 2):
        # Its own connection (fills never queue behind a call's requests), which carries the release pipes.
        self.agent = FrameClient(agent_socket, descriptors=True)
        self.sandbox = sandbox
        self.program = program
        self.size = size
        self._ready: deque[Held] = deque()
        self._filling = 0  # refills under way: with those ready, never more than `size`
        self._changed = threading.Condition()
        self._closed = False
        # The held program's forker, started once a fill has been taken: by then this process is in its sandbox's
        # main cgroup (the node agent moves it there when it registers the sandbox), where the forker's children
        # must be born. Before that, held processes are spawned here.
        self._forker: Forker | None = None
        self._filled = False
        self._forker_starts = 0
        self._forker_lock = threading.Lock()
        self._threads = [threading.Thread(target=self._refill, name=f"warm-pool-{i}", daemon=True)
                         for i in range(REFILLERS)]
        for thread in self._threads:
            thread.start()

    def take(self, wait: float = 0.5) -> Held | None:
        """A waiting held process, if one is ready within `wait` s (else the call goes the direct way)."""
        deadline = time.monotonic() + wait
        with self._changed:
            while not self._ready and not self._closed and time.monotonic() < deadline:
                self._changed.wait(max(0.0, deadline - time.monotonic()))
            held = self._ready.popleft() if self._ready else None
            self._changed.notify_all()  # the refill thread: one fewer waits
        return held

    def _refill(self) -> None:
        failures = 0
        while True:
            with self._changed:
                while not self._closed and len(self._ready) + self._filling >= self.size:
                    self._changed.wait()
                if self._closed:
                    return
                self._filling += 1
            try:
                held = self._spawn_held()
                try:
                    # Its release pipe goes to the agent, which releases it once a call is in place there.
                    slot = self.agent.send("fill", {"name": self.sandbox.name, "namespace": self.sandbox.namespace,
                                                    "pid": held.pid}, held.release)
                except BaseException as error:
                    held.close(kill=True)  # the agent may hold a copy of its release pipe
                    if held.forked and isinstance(error, ApiError) and error.status == 403:
                        # Not a process of the sandbox outside any call: its forker is in another cgroup than
                        # this process (which moved since); a new one is started where this process is now.
                        self._drop_forker()
                    raise
                assert held.release is not None and held.command is not None
                os.close(held.release)  # the agent's copy alone now: only the agent can release it
                held.release = None
                os.set_blocking(held.command, False)  # its command goes in before its start, without waiting
                held.call_id = slot["call_id"]  # type: ignore[index]
                failures = 0
                self._filled = True
                with self._changed:
                    self._filling -= 1
                    if self._closed:
                        held.close(kill=True)
                        return
                    self._ready.append(held)
                    self._changed.notify_all()
            except (OSError, ApiError):  # the agent away or not knowing the sandbox yet: calls go direct meanwhile
                failures += 1
                with self._changed:
                    self._filling -= 1
                    self._changed.wait(min(5.0, 0.1 * 2 ** min(failures, 6)))
            except BaseException:
                with self._changed:
                    self._filling -= 1
                raise

    def _spawn_held(self) -> Held:
        """A held process from the forker, else spawned here (no forker: an older held program, or one that
        failed FORKER_STARTS times)."""
        forker = self._current_forker()
        if forker:
            try:
                return spawn_held(self.program, forker)
            except OSError:
                if forker.serving:  # the kernel refused the fork (pids.max), or the process did not start
                    raise
                self._drop_forker(forker)  # it failed (gone, stopped): this one is spawned here
        return spawn_held(self.program)

    def _drop_forker(self, which: Forker | None = None) -> None:
        """Stop using `which` (by default the forker in use; another refill may have replaced it) and close it."""
        with self._forker_lock:
            forker = which or self._forker
            if self._forker is forker:
                self._forker = None
        if forker:
            forker.close()

    def _current_forker(self) -> Forker | None:
        with self._forker_lock:
            if self._forker is None and self._filled and self._forker_starts < FORKER_STARTS and not self._closed:
                self._forker_starts += 1
                try:
                    self._forker = Forker(self.program)
                except OSError:  # the program has no forker mode: it never will
                    self._forker_starts = FORKER_STARTS
            return self._forker

    def close(self) -> None:
        with self._changed:
            self._closed = True
            waiting, self._ready = list(self._ready), deque()
            self._changed.notify_all()
        for held in waiting:  # killed (the agent holds their release); their cgroups go with the sandbox or the sweep
            held.close(kill=True)
        for thread in self._threads:
            thread.join(timeout=5)
        self._drop_forker()
        self.agent.close()


def _send_command(held: Held, command: bytes) -> bytes:
    """Write what of a held process's command its pipe takes without waiting (a pooled process's command pipe
    is non-blocking on this side); the rest is returned, written once it is released (it reads the pipe to
    its end then). Nearly every command fits whole (64 KiB)."""
    assert held.command is not None
    try:
        written = os.write(held.command, command)
    except BlockingIOError:
        written = 0
    return command[written:]


def _start_pooled(agent_socket: Path, sandbox: SandboxRef, run: RunRequest, pool: WarmPool) -> tuple[Held, CallPlaced] | None:
    """Start the call in a waiting cgroup of the pool; None if none is ready or usable (the call goes direct).
    The command goes into the held process's pipe first; the agent releases the process (the release pipe is
    the agent's since the fill) once the call's limits, record and egress policy are in place, before it
    answers, so the command runs while the answer travels. A held process that cannot serve (killed while it
    waited, its cgroup gone after an agent restart or discarded as tampered with) is let go and the next one
    tried; one whose call is refused is discarded by the agent (it holds the refused command)."""
    while (held := pool.take()) is not None:
        if os.waitpid(held.pid, os.WNOHANG)[0]:  # reaped here: it died while it waited
            held.pid = 0
            held.close()
            continue
        try:
            rest = _send_command(held, command_frame(run.cwd, run.argv, run.env))
        except BrokenPipeError:  # died just now
            held.close(kill=True)
            continue
        try:
            placed = CallPlaced.model_validate(_agent_call(
                agent_socket, "start", name=sandbox.name, namespace=sandbox.namespace, call_id=held.call_id,
                argv=run.argv, intent=run.intent))
        except ApiError as error:
            held.close(kill=True)
            if error.status not in (404, 409):  # its cgroup unknown to the agent (restarted), or tampered with
                raise
            continue
        except BaseException:
            # A broken connection too: the agent may have released the command before it went away, so the
            # call is not tried again another way (it would run twice).
            held.close(kill=True)
            raise
        held.pending = rest
        return held, placed
    return None


def _place_direct(agent_socket: Path, sandbox: SandboxRef, run: RunRequest, program: Path | None) -> tuple[Held, CallPlaced]:
    """No pool: start a held process now and have the agent make its cgroup and move it there."""
    held = spawn_held(program) if program else _spawn([*HOLDER, run.cwd or "", *run.argv], env=run.env)
    try:
        placed = CallPlaced.model_validate(_agent_call(
            agent_socket, "place", unregistered_for=REGISTRATION_WAIT_SECONDS, name=sandbox.name,
            namespace=sandbox.namespace, pid=held.pid, argv=run.argv, intent=run.intent))
    except BaseException:
        held.close()  # the held child exits without running anything
        raise
    return held, placed


def run_call(agent_socket: Path, sandbox: SandboxRef, run: RunRequest, pool: WarmPool | None = None,
             on_placed: Callable[[Started], None] | None = None, on_output: OutputSink | None = None,
             keep_stdin: bool = False, output_bytes: int = MAX_OUTPUT_BYTES) -> RunResult:
    """Run one command as a tool call. `on_placed` is told once the node agent has placed it and it has
    been released (a refusal raises before), `on_output` gets each chunk of its output as it is read. Neither may
    raise: the call is finished with the node agent whatever becomes of whoever watches it.
    `keep_stdin`: the call's stdin stays open and goes to `on_placed` (`run.stdin` is not written);
    `output_bytes`: how much of each stream the RunResult keeps (a background process keeps its own log)."""
    program = pool.program if pool else None
    pooled = _start_pooled(agent_socket, sandbox, run, pool) if pool else None
    held, placed = pooled or _place_direct(agent_socket, sandbox, run, program)
    return _run_held(agent_socket, run, held, placed, program is not None, on_placed, on_output, keep_stdin,
                     output_bytes)


def _run_held(agent_socket: Path, run: RunRequest, held: Held, placed: CallPlaced, framed: bool,
              on_placed: Callable[[Started], None] | None = None, on_output: OutputSink | None = None,
              keep_stdin: bool = False, output_bytes: int = MAX_OUTPUT_BYTES) -> RunResult:
    # The release, first. A pooled process was released by the agent (its command written before the start):
    # what did not fit in the pipe then follows. Else the release is this runtime's: the held program's release
    # byte and command (the next thing it does is the command's exec), or the shell holder's release line (its
    # command was given when it started). Whoever watches is told, and the pump set up, while the command
    # starts: its output waits in the pipes meanwhile, and its exit in the pidfd (a child not yet reaped).
    command = held.pending if held.pending is not None else \
        command_frame(run.cwd, run.argv, run.env) if framed else b"g\n"
    assert held.command is not None
    try:
        if held.release is not None:
            os.write(held.release, RELEASE)
        if command:
            os.set_blocking(held.command, True)  # a pooled process's pipe was non-blocking for the start
            _write_all(held.command, command)
    except BrokenPipeError:  # it died before its release (killed while it waited): the call ends as it did
        pass
    for fd in (held.command, held.release):
        if fd is not None:
            os.close(fd)
    held.command = held.release = None
    started = Started(placed, held.pid, held.stdin if keep_stdin else None)
    if on_placed is not None:
        on_placed(started)
    pump = _Pump(held.pid, None if keep_stdin else held.stdin, (run.stdin or "").encode(), held.stdout, held.stderr,
                 on_output, output_bytes)
    pump.until_exit()
    with started.lock:
        _, status = os.waitpid(held.pid, 0)
        started.reaped = True
    exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    killed_by = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    finished = _agent_call(agent_socket, "finish", retry_for=AGENT_RETRY_SECONDS, call_id=placed.call_id,
                           exit_code=exit_code, signal=killed_by)
    pump.drain(timeout=10)
    (stdout, stdout_dropped), (stderr, stderr_dropped) = pump.text(held.stdout), pump.text(held.stderr)
    return RunResult(
        call_id=placed.call_id, exit_code=exit_code, signal=killed_by, stdout=stdout, stderr=stderr,
        stdout_truncated_bytes=stdout_dropped, stderr_truncated_bytes=stderr_dropped,
        limits=placed.limits, sources=placed.sources, usage=_finished(placed.call_id, finished),
    )


def _finished(call_id: str, record: object) -> Usage:
    """The usage in the agent's answer to a finish (the finished record: only its usage is read here)."""
    usage = record.get("usage") if isinstance(record, dict) else None
    if usage is None:
        raise ApiError(502, f"the node agent finished call {call_id} without its usage")
    return Usage.model_validate(usage)


class SandboxRuntime:
    def __init__(self, sandbox: SandboxRef, agent_socket: Path, socket_path: Path, pool_size: int = 2):
        self.sandbox = sandbox
        self.agent_socket = Path(agent_socket)
        self.server = UnixHttpServer(socket_path, self._routes(), frames=self._frame_operations())
        program = held_binary() if pool_size > 0 else None
        self.pool = WarmPool(self.agent_socket, sandbox, program, pool_size) if program else None

    def _run(self, peer: Peer, body: object) -> RunResult:
        if peer.uid != 0 and peer.uid != os.getuid():
            raise HttpError(403, f"uid {peer.uid} may not run commands in this sandbox")
        if inside_a_call(peer.pid):
            raise HttpError(403, "a process inside this sandbox may not run commands through its runtime: "
                                 "only callers outside the sandbox (the SDK on the node, the gateway) may")
        if not isinstance(body, dict):
            raise HttpError(400, "expected a JSON object")
        try:
            return run_call(self.agent_socket, self.sandbox, RunRequest.model_validate(body), self.pool)
        except ApiError as error:  # the node agent refused: pass its verdict on
            raise HttpError(error.status, error.message) from None

    def _status(self, peer: Peer) -> SandboxStatus:
        if inside_a_call(peer.pid):
            raise HttpError(403, "a process inside this sandbox may not ask its runtime for anything")
        path = f"/v1/sandboxes/{self.sandbox.namespace}/{self.sandbox.name}"
        return SandboxStatus.model_validate(request(self.agent_socket, "GET", path))

    def _routes(self) -> dict:
        return {("POST", "/v1/run"): lambda peer, params, body: (200, self._run(peer, body)),
                ("GET", "/v1/status"): lambda peer, params, body: (200, self._status(peer))}

    def _frame_operations(self) -> dict:
        """The same two requests as frames (the SDK's; agentkube.ebpf.frames), checked alike on each."""
        return {"run": lambda peer, memo, message: self._run(peer, message.get("run")),
                "status": lambda peer, memo, message: self._status(peer)}

    def serve(self, stop: threading.Event) -> None:
        self.server.start()
        stop.wait()
        self.server.stop()
        if self.pool:
            self.pool.close()


def register_local_sandbox(agent_socket: Path, spec: SandboxCreate) -> SandboxStatus:
    """--local: make a sandbox with this process as its main process."""
    spec = spec.model_copy(update={"pid": os.getpid()})
    return SandboxStatus.model_validate(request(agent_socket, "POST", "/v1/sandboxes", spec))


def install_stop_signals(stop: threading.Event) -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
