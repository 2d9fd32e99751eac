"""Start, watch and stop the environment's processes. Each runs in its own session (process group), so
stopping it also stops anything it spawned; its identity is (pid, start time), so a recycled pid is
never mistaken for it."""

import ctypes
import os
import signal
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ProcessRecord:
    name: str
    pid: int
    create_time: float

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ProcessRecord":
        return cls(**data)


def die_with_parent() -> None:
    # The kernel kills the child when the process that started it dies, even by SIGKILL: a test run that
    # is killed outright leaves no control plane behind.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def start(name: str, argv: list[str], log_path: Path, *, tie_to_parent: bool) -> ProcessRecord:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent if tie_to_parent else None,
        )
    return ProcessRecord(name, child.pid, psutil.Process(child.pid).create_time())


def _process(record: ProcessRecord) -> psutil.Process | None:
    """The live process behind a record, or None when it has exited (or its pid now belongs to another)."""
    try:
        process = psutil.Process(record.pid)
        if process.create_time() != record.create_time or process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process
    except psutil.NoSuchProcess:
        return None


def is_running(record: ProcessRecord) -> bool:
    return _process(record) is not None


def stop(records: list[ProcessRecord], timeout: float = 15.0) -> None:
    """SIGTERM each process group, wait, then SIGKILL what is left; reap our own children."""
    processes = []
    for record in records:
        process = _process(record)
        if process is not None:
            processes.append(process)
            signal_group(record.pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        signal_group(process.pid, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=5)
    for record in records:
        _reap(record.pid)


def signal_group(pid: int, sig: int) -> None:
    """Signal a process started by `start` and everything in its session."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child (started by an earlier `dev up`): init reaps it


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
