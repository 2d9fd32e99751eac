"""The agentkube SDK for agent frameworks: run commands in a sandbox, each as its own tool call.

    from agentkube.client import Sandbox
    result = Sandbox("my-agent", "team-a").run(["pytest", "-x"], profile="test", timeout=600)
    result.exit_code, result.stdout, result.usage.peak_memory_bytes

Every call gets its own cgroup with the limits asked for (or learned from the command's history, or the
sandbox's defaults), and comes back with what it used.

`Sandbox(name, namespace)` talks to the sandbox's runtime socket on its node (root on that node).
From anywhere else — a pod of the cluster, or outside it — go through the gateway, with output streamed
as the command produces it:

    sandbox = Sandbox.connect("my-agent", "team-a")      # AsyncSandbox.connect(...) for asyncio
    for event in sandbox.stream(["pytest", "-x"], profile="test"):
        if isinstance(event, Output): print(event.data, end="")
        else: print("exit", event.exit_code, event.usage.peak_memory_bytes)   # the RunResult, last
    sandbox.run("make build").exit_code                   # the blocking form

Inside a pod it authenticates with the pod's service-account token and finds the gateway at its
in-cluster address; outside, with the token of the current kubeconfig context and the gateway's address
given (`gateway=` or AGENTKUBE_GATEWAY, e.g. through `kubectl port-forward`). The identity needs RBAC's
`create agentsandboxes/exec` on the sandbox (the chart's ClusterRole `agentkube-sandbox-user`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentkube.contract import CallIntent, ToolNetwork, duration_seconds, runtime_socket, tool_network
from agentkube.ebpf.models import RunRequest, RunResult, SandboxStatus
from agentkube.ebpf.runtime import REGISTRATION_WAIT_SECONDS, inside_a_call
from agentkube.ebpf.unixhttp import ApiError, Client, Peer

__all__ = ["Sandbox", "RemoteSandbox", "AsyncSandbox", "Output", "RunResult", "ApiError"]

# Inside a pod: the pod's own identity, and the gateway as the chart installs it (release `agentkube` in
# `agentkube-system`; AGENTKUBE_GATEWAY says otherwise).
SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
IN_CLUSTER_GATEWAY = "http://agentkube-gateway.agentkube-system.svc:8080"
GATEWAY_ENV = "AGENTKUBE_GATEWAY"
CONNECT_SECONDS = 10.0


def run_request(argv: Sequence[str] | str, *, profile: str | None = None, memory: int | str | None = None,
                cpu: float | str | None = None, pids: int | None = None,
                network: str | Sequence[str] | ToolNetwork | None = None, timeout: float | str | None = None,
                stdin: str | None = None, cwd: str | None = None) -> tuple[RunRequest, float]:
    """The request for one call in the spec's vocabulary, and how long to wait for its answer (the call's
    own timeout plus the time to report it)."""
    if isinstance(argv, str):
        argv = ["/bin/sh", "-c", argv]
    intent = CallIntent(profile=profile, memory=memory, cpu=None if cpu is None else str(cpu), pids=pids,
                        timeout=f"{timeout}s" if isinstance(timeout, (int, float)) else timeout,
                        network=None if network is None else tool_network(network))
    seconds = duration_seconds(intent.timeout) if intent.timeout else None
    body = RunRequest(argv=list(argv), intent=intent.model_dump(by_alias=True, exclude_none=True), stdin=stdin, cwd=cwd)
    return body, (seconds or 3600) + 60


@dataclass(frozen=True)
class Output:
    """A piece of a running call's output, as it was produced."""

    stream: str  # "stdout" or "stderr"
    data: str


def parse_event(line: bytes) -> Output | RunResult:
    """One line of the gateway's NDJSON stream."""
    event = json.loads(line)
    if "stream" in event:
        return Output(event["stream"], event["data"])
    if "result" in event:
        return RunResult.model_validate(event["result"])
    raise ApiError(502, f"the call could not be finished: {event.get('error', event)}")


def error_of(status: int, body: bytes) -> ApiError:
    try:
        message = json.loads(body).get("error") or body.decode(errors="replace")
    except (ValueError, AttributeError):
        message = body.decode(errors="replace")
    return ApiError(status, message)


def gateway_credentials(gateway: str | None, token: str | None) -> tuple[str, Any]:
    """The gateway's address and how to get a token for each request: the pod's service-account token
    (read each time: the kubelet rotates it), or the current kubeconfig context's token."""
    inside = SERVICE_ACCOUNT_TOKEN.exists()
    address = gateway or os.environ.get(GATEWAY_ENV) or (IN_CLUSTER_GATEWAY if inside else None)
    if address is None:
        raise ValueError(f"outside the cluster, give the gateway's address: gateway= or {GATEWAY_ENV} "
                         "(e.g. http://127.0.0.1:8080 with `kubectl port-forward -n agentkube-system svc/agentkube-gateway 8080`)")
    if token is not None:
        fixed = token
        return address.rstrip("/"), lambda: fixed
    if inside:
        return address.rstrip("/"), lambda: SERVICE_ACCOUNT_TOKEN.read_text().strip()
    import kubernetes

    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(client_configuration=configuration)
    header = (configuration.api_key or {}).get("authorization", "")
    kube_token = header.removeprefix("Bearer ").strip()
    if not kube_token:
        raise ValueError("the current kubeconfig context has no bearer token (client certificates cannot be "
                         "passed on to the gateway): give token=, e.g. from `kubectl create token`")
    return address.rstrip("/"), lambda: kube_token


class RemoteSandbox:
    """A sandbox reached through the gateway (see the module's doc); from `Sandbox.connect`."""

    def __init__(self, name: str, namespace: str, gateway: str, token: Any):
        import httpx

        self.name, self.namespace, self.gateway, self._token = name, namespace, gateway, token
        self._http = httpx.Client()
        self.url = f"{gateway}/v1/namespaces/{namespace}/sandboxes/{name}/run"

    def stream(self, argv: Sequence[str] | str, **limits: Any) -> Iterator[Output | RunResult]:
        """Run one command as a tool call; yields its output as produced, then its RunResult (exit code,
        usage). Same arguments as `run`. Raises ApiError when the gateway or the node agent refuses."""
        import httpx

        body, wait = run_request(argv, **limits)
        timeout = httpx.Timeout(CONNECT_SECONDS, read=wait)
        with self._http.stream("POST", self.url, content=body.model_dump_json(), timeout=timeout,
                               headers={"Authorization": f"Bearer {self._token()}",
                                        "Content-Type": "application/json"}) as response:
            if response.status_code != 200:
                raise error_of(response.status_code, response.read())
            for line in response.iter_lines():
                if line:
                    yield parse_event(line.encode())

    def run(self, argv: Sequence[str] | str, **limits: Any) -> RunResult:
        """Run one command as a tool call and wait for it (see `Sandbox.run` for the arguments)."""
        return _last(list(self.stream(argv, **limits)))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RemoteSandbox:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class AsyncSandbox:
    """`RemoteSandbox` for asyncio: `await AsyncSandbox.connect(...).run(...)`, `async for e in .stream(...)`."""

    def __init__(self, name: str, namespace: str, gateway: str, token: Any):
        import httpx

        self.name, self.namespace, self.gateway, self._token = name, namespace, gateway, token
        self._http = httpx.AsyncClient()
        self.url = f"{gateway}/v1/namespaces/{namespace}/sandboxes/{name}/run"

    @classmethod
    def connect(cls, name: str, namespace: str = "default", *, gateway: str | None = None,
                token: str | None = None) -> AsyncSandbox:
        return cls(name, namespace, *gateway_credentials(gateway, token))

    async def stream(self, argv: Sequence[str] | str, **limits: Any) -> AsyncIterator[Output | RunResult]:
        import httpx

        body, wait = run_request(argv, **limits)
        timeout = httpx.Timeout(CONNECT_SECONDS, read=wait)
        async with self._http.stream("POST", self.url, content=body.model_dump_json(), timeout=timeout,
                                     headers={"Authorization": f"Bearer {self._token()}",
                                              "Content-Type": "application/json"}) as response:
            if response.status_code != 200:
                raise error_of(response.status_code, await response.aread())
            async for line in response.aiter_lines():
                if line:
                    yield parse_event(line.encode())

    async def run(self, argv: Sequence[str] | str, **limits: Any) -> RunResult:
        return _last([event async for event in self.stream(argv, **limits)])

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()


def _last(events: list[Output | RunResult]) -> RunResult:
    if not events or not isinstance(events[-1], RunResult):
        raise ApiError(502, "the gateway's stream ended before the call's result")
    return events[-1]


class Sandbox:
    def __init__(self, name: str, namespace: str = "default", socket: Path | str | None = None):
        self.name = name
        self.namespace = namespace
        self.socket = Path(socket) if socket else runtime_socket(namespace, name)
        # One kept-alive connection per thread: a new one per call (and a new runtime thread to serve it)
        # was a third of a millisecond of every call. Each new connection's server is vetted first.
        self._client = Client(self.socket, check_server=_not_a_tool_call)

    @staticmethod
    def connect(name: str, namespace: str = "default", *, gateway: str | None = None,
                token: str | None = None) -> RemoteSandbox:
        """The sandbox through the gateway, from a pod of the cluster or from outside (module doc)."""
        return RemoteSandbox(name, namespace, *gateway_credentials(gateway, token))

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
        body, wait = run_request(argv, profile=profile, memory=memory, cpu=cpu, pids=pids, network=network,
                                 timeout=timeout, stdin=stdin, cwd=cwd)
        self._wait_for_runtime()
        return RunResult.model_validate(self._client.request("POST", "/v1/run", body, timeout=wait))

    def status(self) -> SandboxStatus:
        """The sandbox as the node agent sees it, including when it was last active."""
        self._wait_for_runtime()
        return SandboxStatus.model_validate(self._client.request("GET", "/v1/status"))

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
