"""The agentkube SDK for agent frameworks: run commands in a sandbox, each as its own tool call.

    from agentkube.client import Sandbox
    result = Sandbox("my-agent", "team-a").run(["pytest", "-x"], profile="test", timeout=600)
    result.exit_code, result.stdout, result.usage.peak_memory_bytes

Every call gets its own cgroup with the limits asked for (or learned from the command's history, or the
sandbox's defaults), and comes back with what it used.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from agentkube.ebpf.models import RunRequest, RunResult, SandboxStatus
from agentkube.ebpf.limits import Intent
from agentkube.ebpf.runtime import REGISTRATION_WAIT_SECONDS, runtime_socket
from agentkube.ebpf.unixhttp import ApiError, request

__all__ = ["Sandbox", "RunResult", "ApiError"]


class Sandbox:
    def __init__(self, name: str, namespace: str = "default", socket: Path | str | None = None):
        self.name = name
        self.namespace = namespace
        self.socket = Path(socket) if socket else runtime_socket(namespace, name)

    def run(
        self,
        argv: Sequence[str] | str,
        *,
        profile: str | None = None,
        memory: int | str | None = None,
        cpu: float | None = None,
        pids: int | None = None,
        network: str | Sequence[str] | None = None,
        timeout: float | None = None,
        stdin: str | None = None,
        cwd: str | None = None,
    ) -> RunResult:
        """Run one command (a list, or a string for `/bin/sh -c`) as a tool call and wait for it.

        `network`: "none", "loopback", "all" or CIDR:port entries ("10.0.0.0/8:443"). Raises ApiError
        when the request is refused (e.g. above the sandbox's envelope)."""
        if isinstance(argv, str):
            argv = ["/bin/sh", "-c", argv]
        intent = Intent(profile=profile, memory=memory, cpu=cpu, pids=pids, timeout=timeout,
                        network=list(network) if network is not None and not isinstance(network, str) else network)
        body = RunRequest(argv=list(argv), intent=intent, stdin=stdin, cwd=cwd)
        # The HTTP wait covers the call's own timeout plus the time to report it.
        wait = (timeout or 3600) + 60
        self._wait_for_runtime()
        return RunResult.model_validate(request(self.socket, "POST", "/v1/run", body, timeout=wait))

    def status(self) -> SandboxStatus:
        """The sandbox as the node agent sees it, including when it was last active."""
        self._wait_for_runtime()
        return SandboxStatus.model_validate(request(self.socket, "GET", "/v1/status"))

    def _wait_for_runtime(self) -> None:
        """A pod's runtime socket appears once the node agent has registered the pod, just after it runs:
        a call made right after the AgentSandbox turns Running waits for it rather than failing."""
        deadline = time.monotonic() + REGISTRATION_WAIT_SECONDS
        while not self.socket.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
