"""The held process of the runtime's warm pool (`programs/held.c`): where its binary is, built if need be, and
the client of its forker mode (`Forker`), which makes held processes by forking a small process instead of
spawning the program from the runtime.

It is compiled at host or image setup time (`make ebpf-host`, the sandbox image), statically, and cached
outside the repository under a name that carries its source's hash, so a changed source is rebuilt.
Without it (no compiler, an image without it) the runtime falls back to holding a shell per call.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from agentkube.ebpf.spawn import spawn

SOURCE = Path(__file__).parent / "programs" / "held.c"
ENV = "AGENTKUBE_HELD"  # an explicit path (the sandbox image sets it)
COMMAND_FD = 3  # as in held.c
READY_FD = 4
RELEASE_FD = 5
RELEASE = b"g"  # the byte on its release pipe (fd 5) that lets a held process read its command and exec it
CONTROL_FD = 3  # the forker's socket to the runtime (held.c)
FORKER_READY = b"F"  # what a forker says first (an older held program exits instead)
# How long the forker may take to answer: a stopped one (a tool call runs as the same user and may SIGSTOP
# it) costs a refill this long, then it is killed and the runtime spawns held processes itself.
FORKER_TIMEOUT_SECONDS = 2.0


def cache_dir() -> Path:
    return Path(os.environ.get("AGENTKUBE_CACHE") or Path.home() / ".cache" / "agentkube") / "bin"


def cached_path(source: bytes) -> Path:
    return cache_dir() / f"agentkube-held-{hashlib.sha256(source).hexdigest()[:16]}"


def command_frame(cwd: str | None, argv: list[str], env: dict[str, str] | None = None) -> bytes:
    """What the held process reads on its command fd, NUL-ended strings: the working directory, how many
    variables follow, each as NAME=VALUE (set before the exec), then the argv."""
    variables = [f"{name}={value}" for name, value in (env or {}).items()]
    return b"".join(part.encode() + b"\0" for part in [cwd or "", str(len(variables)), *variables, *argv])


def build(target: Path, source: Path = SOURCE) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        out = Path(scratch) / "held"
        subprocess.run(["cc", "-static", "-O2", "-o", str(out), str(source)], check=True, capture_output=True, text=True)
        out.replace(target)
    return target


def held_binary(build_if_missing: bool = True) -> Path | None:
    """The held program to use: $AGENTKUBE_HELD if set, else the cached build of this source (built now if
    a C compiler is at hand and `build_if_missing`); None when there is none."""
    explicit = os.environ.get(ENV)
    if explicit:
        return Path(explicit) if os.access(explicit, os.X_OK) else None
    target = cached_path(SOURCE.read_bytes())
    if target.is_file():
        return target
    if build_if_missing and shutil.which("cc"):
        try:
            return build(target)
        except (OSError, subprocess.CalledProcessError):
            return None
    return None


class Forker:
    """held.c's forker mode, started by the runtime: `fork(fds)` makes a held process whose descriptors 0-5 are
    `fds` and whose parent is the caller (the forker clones with CLONE_PARENT), for ~0.3 ms of CPU (this
    side included; bench/held_spawn.py) instead of ~1.3 ms for a posix_spawn of the program from here.
    Requests are one at a time (a lock). A failure raises OSError: the forker's own (dead, stopped: it is
    killed and serves no more, `serving`), or the kernel's refusal of the fork (the errno the forker answers,
    pids.max mostly: it goes on serving)."""

    def __init__(self, program: Path):
        ours, its = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            self.pid = spawn([str(program), "--forker"], dict(os.environ),
                             [(devnull, 0), (devnull, 1), (devnull, 2), (its.fileno(), CONTROL_FD)])
        except BaseException:
            ours.close()
            raise
        finally:
            its.close()
            os.close(devnull)
        self._socket = ours
        self._socket.settimeout(FORKER_TIMEOUT_SECONDS)
        self._lock = threading.Lock()
        try:
            said = self._socket.recv(1)
        except OSError:
            said = b""
        if said != FORKER_READY:
            self.close()
            raise OSError(f"{program} has no forker mode (an older held program)")

    @property
    def serving(self) -> bool:
        """False once it failed or was closed."""
        return self.pid != 0

    def fork(self, fds: Sequence[int]) -> int:
        with self._lock:
            if not self.serving:
                raise OSError("the forker is closed")
            try:
                socket.send_fds(self._socket, [b"f"], list(fds))
                answer = self._socket.recv(4, socket.MSG_WAITALL)
            except OSError:
                self._close()
                raise
            if len(answer) != 4:
                self._close()
                raise OSError("the forker went away")
        (pid,) = struct.unpack("=i", answer)
        if pid < 0:
            raise OSError(-pid, f"the forker could not fork: {os.strerror(-pid)}")
        return pid

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        """It exits at EOF of its socket; killed first, in case it is stopped. Reaped (this process's child)."""
        self._socket.close()
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.pid = 0


if __name__ == "__main__":  # `python -m agentkube.ebpf.held`: build it (host setup) and print where it is
    print(held_binary())
