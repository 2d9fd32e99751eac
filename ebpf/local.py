"""A node agent and sandbox runtimes as real processes on this machine (`--local`), for tests, benchmarks
and the demo. Everything they make — cgroups, BPF attachments and pins, sockets, state — is removed on
close, pass or fail."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agentkube.ebpf.unixhttp import ApiError, request

START_TIMEOUT = 60.0


def _wait_for_socket(path: Path, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not path.exists():
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[3:5]} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear within {START_TIMEOUT:.0f}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def _stop(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class LocalNodeAgent:
    """`agentkube node-agent run --local` in a temporary directory, under a unique instance name."""

    def __init__(self, instance: str | None = None, agent_args: list[str] | tuple[str, ...] = ()):
        self.instance = instance or f"agentkube-test-{os.getpid()}-{time.monotonic_ns() % 10**6}"
        self.dir = Path(tempfile.mkdtemp(prefix="agentkube-node-agent-"))
        self.socket = self.dir / "agent.sock"
        self.state_dir = self.dir / "state"
        self.log = self.dir / "agent.log"
        self.process: subprocess.Popen | None = None
        self.sandboxes: list[LocalSandbox] = []
        self.agent_args = list(agent_args)  # more `node-agent run` flags (egress: --pod-cidr, --dns-address, ...)

    @property
    def audit_log(self) -> Path:
        return self.state_dir / "audit.jsonl"

    def start(self) -> LocalNodeAgent:
        self.socket.unlink(missing_ok=True)
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agentkube", "node-agent", "run", "--local", "--socket", str(self.socket),
                 "--state-dir", str(self.state_dir), "--instance", self.instance, *self.agent_args],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _wait_for_socket(self.socket, self.process, self.log)
        return self

    def stop(self) -> None:
        _stop(self.process)

    def restart(self, kill: bool = False) -> None:
        """Stop (SIGTERM, or SIGKILL with `kill`: a crash) and start again on the same state."""
        if kill and self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.stop()
        self.start()

    def sandbox(self, name: str, namespace: str = "default", **options: str) -> LocalSandbox:
        sandbox = LocalSandbox(self, name, namespace, options)
        self.sandboxes.append(sandbox)
        return sandbox.start()

    def close(self) -> None:
        """Delete every sandbox, stop the agent, and remove what it left (through a last in-process agent
        on the same state, which finalizes calls and removes cgroups, attachments and pins)."""
        try:
            for sandbox in self.sandboxes:
                sandbox.close()
        finally:
            self.stop()
            from agentkube.ebpf.agent import NodeAgent

            NodeAgent(self.state_dir, instance=self.instance).teardown()
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalNodeAgent:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()


class LocalSandbox:
    """`agentkube sandbox-runtime --local`: a sandbox whose main process is the runtime itself."""

    def __init__(self, agent: LocalNodeAgent, name: str, namespace: str, options: dict[str, str]):
        self.agent = agent
        self.name = name
        self.namespace = namespace
        self.options = options
        self.socket = agent.dir / f"{namespace}.{name}.sock"
        self.log = agent.dir / f"{namespace}.{name}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> LocalSandbox:
        flags = [arg for key, value in self.options.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agentkube", "sandbox-runtime", "--local", "--name", self.name,
                 "--namespace", self.namespace, "--agent-socket", str(self.agent.socket), "--socket", str(self.socket),
                 *flags],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _wait_for_socket(self.socket, self.process, self.log)
        return self

    @property
    def client(self):
        from agentkube.client import Sandbox

        return Sandbox(self.name, self.namespace, socket=self.socket)

    def close(self) -> None:
        try:
            request(self.agent.socket, "DELETE", f"/v1/sandboxes/{self.namespace}/{self.name}")
        except (ApiError, OSError):
            pass  # already gone, or the agent is down: the agent's own teardown removes it
        _stop(self.process)
