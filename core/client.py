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

from agentkube.contract import CallIntent, ToolNetwork, duration_seconds, runtime_socket, tool_network
from agentkube.ebpf.models import RunRequest, RunResult, SandboxStatus
from agentkube.ebpf.runtime import REGISTRATION_WAIT_SECONDS, inside_a_call
from agentkube.ebpf.unixhttp import ApiError, Peer, request

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
        cpu: float | str | None = None,
        pids: int | None = None,
        network: str | Sequence[str] | ToolNetwork | None = None,
        timeout: float | str | None = None,
        stdin: str | None = None,
        cwd: str | None = None,
    ) -> RunResult:
        """Run one command (a list, or a string for `/bin/sh -c`) as a tool call and wait for it.

        The limits are the AgentSandbox's `spec.tools` vocabulary: `memory` and `cpu` are quantities (or
        bytes and cores), `timeout` a duration (or seconds), `network` a mode ("none", "cluster",
        "internet") or rules ("10.0.0.0/8:443", "pypi.org:443", "*.github.com:443"). Raises ApiError when
        the request is refused: above the sandbox's envelope, or a network wider than its spec grants."""
        if isinstance(argv, str):
            argv = ["/bin/sh", "-c", argv]
        intent = CallIntent(profile=profile, memory=memory, cpu=None if cpu is None else str(cpu), pids=pids,
                            timeout=f"{timeout}s" if isinstance(timeout, (int, float)) else timeout,
                            network=None if network is None else tool_network(network))
        seconds = duration_seconds(intent.timeout) if intent.timeout else None
        body = RunRequest(argv=list(argv), intent=intent.model_dump(by_alias=True, exclude_none=True), stdin=stdin, cwd=cwd)
        # The HTTP wait covers the call's own timeout plus the time to report it.
        wait = (seconds or 3600) + 60
        self._wait_for_runtime()
        return RunResult.model_validate(request(self.socket, "POST", "/v1/run", body, timeout=wait,
                                                check_server=_not_a_tool_call))

    def status(self) -> SandboxStatus:
        """The sandbox as the node agent sees it, including when it was last active."""
        self._wait_for_runtime()
        return SandboxStatus.model_validate(request(self.socket, "GET", "/v1/status", check_server=_not_a_tool_call))

    def _wait_for_runtime(self) -> None:
        """A pod's runtime socket appears once the node agent has registered the pod, just after it runs:
        a call made right after the AgentSandbox turns Running waits for it rather than failing."""
        deadline = time.monotonic() + REGISTRATION_WAIT_SECONDS
        while not self.socket.exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def _not_a_tool_call(server: Peer) -> None:
    """Refuse to talk to a process inside a tool call: code in a call runs as the runtime's user and could
    replace the runtime's socket with its own, to read the commands and input sent to later calls."""
    if inside_a_call(server.pid):
        raise ApiError(502, f"the process serving this sandbox's socket (pid {server.pid}) runs inside a tool call, "
                            "not the sandbox's runtime: refusing to send it anything")
