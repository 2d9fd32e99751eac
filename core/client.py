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

Background processes and files go through the gateway too:

    server = sandbox.start("python3 -m http.server 8000", timeout="30m")   # a Process: its own tool call
    server.read(wait=5).stdout.data        # output from where the last read ended (or any offset)
    server.write("input\n"); server.signal("INT"); server.kill(); server.wait().exit_code
    sandbox.upload("data.csv", "in/data.csv"); sandbox.download("out/report.pdf", "report.pdf")
    sandbox.list_files("out"); sandbox.delete_file("out", recursive=True)

A sandbox can also be taken from a warm pool (an AgentSandboxPool) through the gateway: it runs at once
(an already started pod is adopted; its `env` reaches each of its calls), and is released (deleted) at the
end of the `with`, or by the operator after `ttl`:

    with Sandbox.create(pool="python", namespace="team-a", ttl="1h", env={"TASK": "42"}) as sandbox:
        sandbox.run("python3 -c 'import os; print(os.environ[\"TASK\"])'")
    # or: sandbox = await AsyncSandbox.create(pool="python", ...); ...; await sandbox.release()

Claiming and releasing need `create agentsandboxpools/claim` on the pool (also in `agentkube-sandbox-user`).

Inside a pod it authenticates with the pod's service-account token and finds the gateway at its
in-cluster address; outside, with the token of the current kubeconfig context and the gateway's address
given (`gateway=` or AGENTKUBE_GATEWAY, e.g. through `kubectl port-forward`). The gateway speaks HTTPS
with a certificate of the chart's own CA, which the SDK reads from the API server (the ConfigMap
`agentkube-gateway-ca` in the gateway's namespace, public to every authenticated identity) unless given a
CA file (`ca=` or AGENTKUBE_GATEWAY_CA). The identity needs RBAC's
`create agentsandboxes/exec` on the sandbox for commands and processes, and `agentsandboxes/files` (create,
get, list, delete) for files (the chart's ClusterRole `agentkube-sandbox-user` grants both).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from agentkube.contract import CallIntent, ToolNetwork, duration_seconds, runtime_socket, tool_network
from agentkube.ebpf.frames import FrameClient, FramesRefused
from agentkube.ebpf.models import (
    MAX_PROCESS_WAIT_SECONDS,
    Claimed,
    ClaimRequest,
    FileEntry,
    FileList,
    ProcessInfo,
    ProcessList,
    ProcessOutput,
    RunRequest,
    RunResult,
    SandboxStatus,
    StdinWritten,
)
from agentkube.ebpf.runtime import REGISTRATION_WAIT_SECONDS, inside_a_call
from agentkube.ebpf.unixhttp import ApiError, Client, Peer

__all__ = ["Sandbox", "RemoteSandbox", "AsyncSandbox", "Process", "AsyncProcess", "Output", "RunResult", "ProcessInfo",
           "ProcessOutput", "FileEntry", "FileList", "ApiError"]

# Inside a pod: the pod's own identity, and the gateway as the chart installs it (release `agentkube` in
# `agentkube-system`; AGENTKUBE_GATEWAY says otherwise).
SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
IN_CLUSTER_GATEWAY = "https://agentkube-gateway.agentkube-system.svc:8080"
GATEWAY_ENV = "AGENTKUBE_GATEWAY"
# The gateway serves TLS with a certificate of the chart's own CA. That CA is public: the chart publishes it
# in the ConfigMap `<gateway Service>-ca` (key ca.crt) of the gateway's namespace, readable by every
# authenticated identity, and the SDK fetches it from the API server unless given a CA file.
GATEWAY_CA_ENV = "AGENTKUBE_GATEWAY_CA"
GATEWAY_CA_KEY = "ca.crt"
DEFAULT_GATEWAY_CA = ("agentkube-system", "agentkube-gateway-ca")  # for addresses that do not name the Service
CONNECT_SECONDS = 10.0
FILE_CHUNK_BYTES = 1024 * 1024  # files move in pieces this big: never whole in memory
JSON_HEADERS = {"Content-Type": "application/json"}
STDIN_PIECE_CHARS = 8192  # one stdin write's characters: its JSON stays within the runtime's request bound


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


def gateway_ca_configmap(address: str) -> tuple[str, str]:
    """Where the CA of the gateway at `address` is published: (namespace, ConfigMap). A Service's DNS name
    (`NAME.NAMESPACE.svc…`) says it; any other address (a port-forward, a load balancer) means the chart's
    default release."""
    host = urlsplit(address).hostname or ""
    parts = host.split(".")
    if len(parts) >= 3 and parts[2] == "svc":
        return parts[1], f"{parts[0]}-ca"
    return DEFAULT_GATEWAY_CA


def gateway_credentials(gateway: str | None, token: str | None,
                        ca: str | Path | None = None) -> tuple[str, Callable[[], str], ssl.SSLContext | bool]:
    """The gateway's address, how to get a token for each request (the pod's service-account token, read
    each time: the kubelet rotates it; or the current kubeconfig context's token), and how to verify the
    gateway's certificate (`ca`, AGENTKUBE_GATEWAY_CA, or the CA the chart publishes)."""
    inside = SERVICE_ACCOUNT_TOKEN.exists()
    address = (gateway or os.environ.get(GATEWAY_ENV) or (IN_CLUSTER_GATEWAY if inside else None) or "").rstrip("/")
    if not address:
        raise ValueError(f"outside the cluster, give the gateway's address: gateway= or {GATEWAY_ENV} (e.g. "
                         "https://127.0.0.1:8080 with `kubectl port-forward -n agentkube-system svc/agentkube-gateway 8080`)")
    configuration = None
    if token is None and not inside:
        configuration = _kubernetes_configuration(inside)
        header = (configuration.api_key or {}).get("authorization", "")
        token = header.removeprefix("Bearer ").strip()
        if not token:
            raise ValueError("the current kubeconfig context has no bearer token (client certificates cannot be "
                             "passed on to the gateway): give token=, e.g. from `kubectl create token`")

    def tokens() -> str:
        return token if token is not None else SERVICE_ACCOUNT_TOKEN.read_text().strip()

    if not address.startswith("https://"):
        return address, tokens, True
    ca = ca or os.environ.get(GATEWAY_CA_ENV)
    if ca:
        context = _ca_file_contexts.get(str(ca))
        if context is None:
            context = _ca_file_contexts.setdefault(str(ca), ssl.create_default_context(cafile=str(ca)))
        return address, tokens, context
    context = _published_ca_contexts.get(address)
    if context is None:
        pem = _published_ca(address, configuration or _kubernetes_configuration(inside))
        context = _published_ca_contexts.setdefault(address, ssl.create_default_context(cadata=pem))
    return address, tokens, context


# The CA the chart published for a gateway, as an SSL context, by the gateway's address: read from the API
# server once per process (a claim that reads it again pays a connection to the API server each time). The
# chart keeps its CA across upgrades; a process that outlives a reinstall is started again.
_published_ca_contexts: dict[str, ssl.SSLContext] = {}
_ca_file_contexts: dict[str, ssl.SSLContext] = {}  # by the CA file's path: one context, so one shared client

# One HTTP client per gateway and CA for every RemoteSandbox of the process, so its kept-alive TLS
# connections are shared: a claim and its sandbox's first command each opened one of their own (a TLS
# handshake apiece), and an agent that takes many sandboxes paid that for every one. httpx's Client is safe
# to use from several threads.
_shared_clients: dict[tuple[str, int], Any] = {}
_shared_clients_lock = threading.Lock()


def _shared_client(gateway: str, verify: ssl.SSLContext | bool) -> Any:
    import httpx

    key = (gateway, id(verify))  # contexts are kept for the process (above), so their ids are stable
    with _shared_clients_lock:
        client = _shared_clients.get(key)
        if client is None or client.is_closed:
            client = _shared_clients[key] = httpx.Client(verify=verify)
        return client


def _kubernetes_configuration(inside: bool) -> Any:
    import kubernetes

    configuration = kubernetes.client.Configuration()
    if inside:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    else:
        kubernetes.config.load_kube_config(client_configuration=configuration)
    return configuration


def _published_ca(address: str, configuration: Any) -> str:
    import kubernetes

    namespace, name = gateway_ca_configmap(address)
    try:
        with kubernetes.client.ApiClient(configuration) as client:
            published = kubernetes.client.CoreV1Api(client).read_namespaced_config_map(name, namespace)
    except kubernetes.client.ApiException as error:
        raise ApiError(error.status or 502, f"cannot read the gateway's CA from ConfigMap {namespace}/{name} "
                                            f"({error.reason}); give ca= or {GATEWAY_CA_ENV}") from None
    pem = (published.data or {}).get(GATEWAY_CA_KEY)
    if not pem:
        raise ApiError(502, f"ConfigMap {namespace}/{name} has no {GATEWAY_CA_KEY}")
    return pem


def claim_request(pool: str, ttl: float | str | None, env: dict[str, str] | None, wait: float) -> ClaimRequest:
    """A claim's body: `ttl` in seconds or as a Go duration ("1h30m"), rounded up to a whole second; the
    sandbox's name chosen here (the pool's, a random suffix), so that asking again finds the same sandbox."""
    seconds = None if ttl is None else max(1, -(-duration_seconds(ttl) // 1))
    prefix = re.sub(r"[^a-z0-9-]", "-", pool.lower())[:40].strip("-") or "claim"
    return ClaimRequest(env=env or None, ttl_seconds=None if seconds is None else int(seconds), wait_seconds=wait,
                        name=f"{prefix}-{secrets.token_hex(4)}")


# A claim whose answer was lost to the transport (the gateway restarted, a connection dropped) is asked
# again under the same name until its wait is over: the gateway answers with the sandbox the first asking
# made (never a second one). A gateway that answered at all is not asked again.
CLAIM_RETRY_SECONDS = 0.5
CLAIM_RETRIED_STATUSES = (502, 503)  # a proxy or load balancer in front of a gateway that is restarting


def _claim_again(status: int | None, deadline: float) -> bool:
    """Whether to ask a claim again: its answer was lost (`status` None) or came from whatever stands in
    for a gateway that is restarting, and its wait is not over."""
    return (status is None or status in CLAIM_RETRIED_STATUSES) and time.monotonic() + CLAIM_RETRY_SECONDS < deadline


def claims_url(gateway: str, namespace: str, pool: str) -> str:
    return f"{gateway}/v1/namespaces/{namespace}/pools/{pool}/claims"


def _answer(status: int, body: bytes) -> Any:
    if status >= 300:
        raise error_of(status, body)
    return json.loads(body) if body else None


def _stdin_pieces(data: str) -> list[str]:
    return [data[i:i + STDIN_PIECE_CHARS] for i in range(0, len(data), STDIN_PIECE_CHARS)] or [""]


def _file_chunks(source: IO[bytes]) -> Iterator[bytes]:
    while chunk := source.read(FILE_CHUNK_BYTES):
        yield chunk


def _size_of(source: IO[bytes]) -> int:
    """Bytes left to read in an open file (from where it stands)."""
    here = source.tell()
    size = source.seek(0, os.SEEK_END) - here
    source.seek(here)
    return size


def _poll_seconds(deadline: float | None) -> float:
    left = MAX_PROCESS_WAIT_SECONDS if deadline is None else deadline - time.monotonic()
    return max(0.0, min(MAX_PROCESS_WAIT_SECONDS, left))


class _ProcessHandle:
    """What `Process` and `AsyncProcess` share: where the next read starts, and how answers are read."""

    def __init__(self, info: ProcessInfo):
        self.info = info
        self.offsets = {"stdout": 0, "stderr": 0}

    @property
    def id(self) -> str:
        return self.info.id

    def _path(self, action: str = "") -> str:
        return "/".join(p for p in ("processes", self.id, action) if p)

    def _read_params(self, wait: float, stdout: int | None, stderr: int | None) -> dict[str, float]:
        return {"stdout": self.offsets["stdout"] if stdout is None else stdout,
                "stderr": self.offsets["stderr"] if stderr is None else stderr, "wait": wait}

    def _advance(self, answer: Any) -> ProcessOutput:
        out = ProcessOutput.model_validate(answer)
        self.offsets = {"stdout": out.stdout.next, "stderr": out.stderr.next}
        self.info = out.process
        return out

    @staticmethod
    def _events(out: ProcessOutput) -> list[Output | ProcessInfo]:
        """One read's Outputs, then the ProcessInfo if it was the last (exited, nothing more to read)."""
        events: list[Output | ProcessInfo] = [Output(name, chunk.data) for chunk, name in
                                              ((out.stdout, "stdout"), (out.stderr, "stderr")) if chunk.data]
        return events if events or out.process.state != "exited" else [out.process]

    @staticmethod
    def _stdin_bodies(data: str, close: bool) -> list[dict[str, Any]]:
        pieces = _stdin_pieces(data)
        return [{"data": piece, "close": close and i == len(pieces) - 1} for i, piece in enumerate(pieces)]


class Process(_ProcessHandle):
    """A background process in a sandbox: a tool call of its own that runs on after `start` returns.
    `read` continues from where the last read ended (or from the offsets given); the runtime keeps each
    stream's newest MiB, so a read from further back starts at the oldest byte kept (see the chunk's
    `offset`)."""

    def __init__(self, sandbox: RemoteSandbox, info: ProcessInfo):
        super().__init__(info)
        self.sandbox = sandbox

    def _call(self, method: str, action: str = "", **kwargs: Any) -> Any:
        return self.sandbox._request(method, self._path(action), **kwargs)

    def read(self, wait: float = 0.0, stdout: int | None = None, stderr: int | None = None) -> ProcessOutput:
        """Its output since the last read (or from the given byte offsets); held up to `wait` s (at most
        30) until there is some, or it has exited."""
        return self._advance(self._call("GET", "output", params=self._read_params(wait, stdout, stderr), wait=wait))

    def stream(self) -> Iterator[Output | ProcessInfo]:
        """Its output as it comes, from where the last read ended, then its ProcessInfo once it has exited."""
        while True:
            for event in self._events(self.read(wait=MAX_PROCESS_WAIT_SECONDS)):
                yield event
                if isinstance(event, ProcessInfo):
                    return

    def write(self, data: str, close: bool = False) -> int:
        """Write to its stdin; the bytes it took (fewer if it stopped reading). `close`: then close stdin."""
        return sum(StdinWritten.model_validate(self._call("POST", "stdin", json=body)).written
                   for body in self._stdin_bodies(data, close))

    def close_stdin(self) -> None:
        self.write("", close=True)

    def signal(self, signal: str) -> ProcessInfo:
        """Send a signal (TERM, INT, KILL, HUP, QUIT, USR1, USR2, STOP, CONT) to its process group."""
        self.info = ProcessInfo.model_validate(self._call("POST", "signal", json={"signal": signal}))
        return self.info

    def kill(self) -> ProcessInfo:
        return self.signal("KILL")

    def wait(self, timeout: float | None = None) -> ProcessInfo:
        """Until it has exited (its exit code and usage), or TimeoutError after `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = _poll_seconds(deadline)
            self.info = ProcessInfo.model_validate(self._call("GET", params={"wait": wait}, wait=wait))
            if self.info.state == "exited":
                return self.info
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"process {self.id} still runs after {timeout}s")


class RemoteSandbox:
    """A sandbox reached through the gateway (see the module's doc); from `Sandbox.connect`."""

    def __init__(self, name: str, namespace: str, gateway: str, token: Callable[[], str],
                 verify: ssl.SSLContext | bool = True):
        self.name, self.namespace, self.gateway, self._token = name, namespace, gateway, token
        self._http = _shared_client(gateway, verify)
        self.base = f"{gateway}/v1/namespaces/{namespace}/sandboxes/{name}"
        self.url = f"{self.base}/run"
        self.claimed: Claimed | None = None  # set when it was taken from a pool (`Sandbox.create`)

    @classmethod
    def create(cls, pool: str, namespace: str = "default", *, ttl: float | str | None = None,
               env: dict[str, str] | None = None, wait: float = 60.0, gateway: str | None = None,
               token: str | None = None, ca: str | Path | None = None) -> RemoteSandbox:
        """A new sandbox from the warm pool `pool`, once it runs (see the module doc)."""
        import httpx

        address, token_of, verify = gateway_credentials(gateway, token, ca)
        body = claim_request(pool, ttl, env, wait).model_dump_json()
        deadline = time.monotonic() + wait + 10
        while True:
            try:
                response = _shared_client(address, verify).post(
                    claims_url(address, namespace, pool), content=body, timeout=httpx.Timeout(CONNECT_SECONDS, read=wait + 10),
                    headers={"Authorization": f"Bearer {token_of()}", **JSON_HEADERS})
            except httpx.TransportError:
                if not _claim_again(None, deadline):
                    raise
            else:
                if not _claim_again(response.status_code, deadline):
                    break
            time.sleep(CLAIM_RETRY_SECONDS)
        claimed = Claimed.model_validate(_answer(response.status_code, response.content))
        sandbox = cls(claimed.name, namespace, address, token_of, verify)
        sandbox.claimed = claimed
        return sandbox

    def release(self) -> None:
        """Delete a sandbox taken from a pool (its pod goes with it; the pool's others stay)."""
        if self.claimed is None:
            raise ValueError(f"{self.name} was not taken from a pool with Sandbox.create: nothing to release")
        response = self._http.delete(f"{claims_url(self.gateway, self.namespace, self.claimed.pool)}/{self.name}",
                                     headers={"Authorization": f"Bearer {self._token()}"})
        _answer(response.status_code, response.content)
        self.claimed = None

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

    def _request(self, method: str, path: str, *, wait: float = 0.0, headers: dict[str, str] | None = None,
                 **kwargs: Any) -> Any:
        import httpx

        response = self._http.request(method, f"{self.base}/{path}", timeout=httpx.Timeout(CONNECT_SECONDS, read=wait + 60),
                                      headers={"Authorization": f"Bearer {self._token()}", **(headers or {})}, **kwargs)
        return _answer(response.status_code, response.content)

    def start(self, argv: Sequence[str] | str, **limits: Any) -> Process:
        """Start a command as a background process (its own tool call, with the limits of `run`; `stdin` is
        written first and stays open). Returns once the node agent has placed it."""
        body, _ = run_request(argv, **limits)
        return Process(self, ProcessInfo.model_validate(self._request("POST", "processes", content=body.model_dump_json(),
                                                                      headers=JSON_HEADERS)))

    def processes(self) -> list[ProcessInfo]:
        """The sandbox's background processes, running and recently finished."""
        return ProcessList.model_validate(self._request("GET", "processes")).processes

    def process(self, process_id: str) -> Process:
        """A handle on a background process started earlier (by anyone allowed to run commands here)."""
        return Process(self, ProcessInfo.model_validate(self._request("GET", f"processes/{process_id}")))

    def upload(self, source: str | Path | IO[bytes], path: str, mode: int | None = None) -> FileEntry:
        """Write a local file (a path, or a file open for binary reading) to `path` in the workspace, streamed
        in pieces; `mode`: its permission bits (e.g. 0o755)."""
        if isinstance(source, (str, Path)):
            with open(source, "rb") as opened:
                return self.upload(opened, path, mode)
        params = {"path": path, **({"mode": f"{mode:o}"} if mode is not None else {})}
        return FileEntry.model_validate(self._request(
            "PUT", "files", params=params, content=_file_chunks(source),
            headers={"Content-Length": str(_size_of(source)), "Content-Type": "application/octet-stream"}))

    def download(self, path: str, destination: str | Path | IO[bytes]) -> int:
        """Copy a workspace file to a local path (or a file open for binary writing), streamed; its bytes."""
        import httpx

        if isinstance(destination, (str, Path)):
            with open(destination, "wb") as opened:
                return self.download(path, opened)
        with self._http.stream("GET", f"{self.base}/files", params={"path": path},
                               timeout=httpx.Timeout(CONNECT_SECONDS, read=300),
                               headers={"Authorization": f"Bearer {self._token()}"}) as response:
            if response.status_code != 200:
                raise error_of(response.status_code, response.read())
            written = 0
            for chunk in response.iter_bytes(FILE_CHUNK_BYTES):
                destination.write(chunk)
                written += len(chunk)
            return written

    def list_files(self, path: str = ".") -> FileList:
        return FileList.model_validate(self._request("GET", "files", params={"path": path, "list": "1"}))

    def delete_file(self, path: str, recursive: bool = False) -> None:
        self._request("DELETE", "files", params={"path": path, **({"recursive": "1"} if recursive else {})})

    def close(self) -> None:
        """Nothing to free: the process's sandboxes share their connections to the gateway (kept alive,
        closed at exit). Kept so that `with` and existing callers work unchanged."""

    def __enter__(self) -> RemoteSandbox:
        return self

    def __exit__(self, *_: object) -> None:
        try:
            if self.claimed is not None:
                self.release()
        finally:
            self.close()


class AsyncProcess(_ProcessHandle):
    """`Process` for asyncio (from `AsyncSandbox.start`): the same methods, awaited."""

    def __init__(self, sandbox: AsyncSandbox, info: ProcessInfo):
        super().__init__(info)
        self.sandbox = sandbox

    async def _call(self, method: str, action: str = "", **kwargs: Any) -> Any:
        return await self.sandbox._request(method, self._path(action), **kwargs)

    async def read(self, wait: float = 0.0, stdout: int | None = None, stderr: int | None = None) -> ProcessOutput:
        return self._advance(await self._call("GET", "output", params=self._read_params(wait, stdout, stderr), wait=wait))

    async def stream(self) -> AsyncIterator[Output | ProcessInfo]:
        while True:
            for event in self._events(await self.read(wait=MAX_PROCESS_WAIT_SECONDS)):
                yield event
                if isinstance(event, ProcessInfo):
                    return

    async def write(self, data: str, close: bool = False) -> int:
        written = 0
        for body in self._stdin_bodies(data, close):
            written += StdinWritten.model_validate(await self._call("POST", "stdin", json=body)).written
        return written

    async def close_stdin(self) -> None:
        await self.write("", close=True)

    async def signal(self, signal: str) -> ProcessInfo:
        self.info = ProcessInfo.model_validate(await self._call("POST", "signal", json={"signal": signal}))
        return self.info

    async def kill(self) -> ProcessInfo:
        return await self.signal("KILL")

    async def wait(self, timeout: float | None = None) -> ProcessInfo:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = _poll_seconds(deadline)
            self.info = ProcessInfo.model_validate(await self._call("GET", params={"wait": wait}, wait=wait))
            if self.info.state == "exited":
                return self.info
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"process {self.id} still runs after {timeout}s")


async def _async_file_chunks(source: IO[bytes]) -> AsyncIterator[bytes]:
    import asyncio

    while chunk := await asyncio.to_thread(source.read, FILE_CHUNK_BYTES):
        yield chunk


class AsyncSandbox:
    """`RemoteSandbox` for asyncio: `await AsyncSandbox.connect(...).run(...)`, `async for e in .stream(...)`."""

    def __init__(self, name: str, namespace: str, gateway: str, token: Callable[[], str],
                 verify: ssl.SSLContext | bool = True):
        import httpx

        self.name, self.namespace, self.gateway, self._token = name, namespace, gateway, token
        self._http = httpx.AsyncClient(verify=verify)
        self.base = f"{gateway}/v1/namespaces/{namespace}/sandboxes/{name}"
        self.url = f"{self.base}/run"
        self.claimed: Claimed | None = None

    @classmethod
    async def create(cls, pool: str, namespace: str = "default", *, ttl: float | str | None = None,
                     env: dict[str, str] | None = None, wait: float = 60.0, gateway: str | None = None,
                     token: str | None = None, ca: str | Path | None = None) -> AsyncSandbox:
        import asyncio

        import httpx

        sandbox = cls("", namespace, *gateway_credentials(gateway, token, ca))
        address, token_of = sandbox.gateway, sandbox._token
        body = claim_request(pool, ttl, env, wait).model_dump_json()
        deadline = time.monotonic() + wait + 10
        try:
            while True:
                try:
                    response = await sandbox._http.post(claims_url(address, namespace, pool), content=body,
                                                        timeout=httpx_timeout(wait + 10),
                                                        headers={"Authorization": f"Bearer {token_of()}", **JSON_HEADERS})
                except httpx.TransportError:
                    if not _claim_again(None, deadline):
                        raise
                else:
                    if not _claim_again(response.status_code, deadline):
                        break
                await asyncio.sleep(CLAIM_RETRY_SECONDS)
            claimed = Claimed.model_validate(_answer(response.status_code, response.content))
        except BaseException:
            await sandbox.aclose()
            raise
        sandbox.name, sandbox.claimed = claimed.name, claimed
        sandbox.base = f"{address}/v1/namespaces/{namespace}/sandboxes/{claimed.name}"
        sandbox.url = f"{sandbox.base}/run"
        return sandbox

    async def release(self) -> None:
        if self.claimed is None:
            raise ValueError(f"{self.name} was not taken from a pool with AsyncSandbox.create: nothing to release")
        response = await self._http.delete(f"{claims_url(self.gateway, self.namespace, self.claimed.pool)}/{self.name}",
                                           headers={"Authorization": f"Bearer {self._token()}"})
        _answer(response.status_code, response.content)
        self.claimed = None

    @classmethod
    def connect(cls, name: str, namespace: str = "default", *, gateway: str | None = None,
                token: str | None = None, ca: str | Path | None = None) -> AsyncSandbox:
        return cls(name, namespace, *gateway_credentials(gateway, token, ca))

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

    async def _request(self, method: str, path: str, *, wait: float = 0.0, headers: dict[str, str] | None = None,
                       **kwargs: Any) -> Any:
        import httpx

        response = await self._http.request(method, f"{self.base}/{path}",
                                            timeout=httpx.Timeout(CONNECT_SECONDS, read=wait + 60),
                                            headers={"Authorization": f"Bearer {self._token()}", **(headers or {})},
                                            **kwargs)
        return _answer(response.status_code, response.content)

    async def start(self, argv: Sequence[str] | str, **limits: Any) -> AsyncProcess:
        body, _ = run_request(argv, **limits)
        return AsyncProcess(self, ProcessInfo.model_validate(
            await self._request("POST", "processes", content=body.model_dump_json(), headers=JSON_HEADERS)))

    async def processes(self) -> list[ProcessInfo]:
        return ProcessList.model_validate(await self._request("GET", "processes")).processes

    async def process(self, process_id: str) -> AsyncProcess:
        return AsyncProcess(self, ProcessInfo.model_validate(await self._request("GET", f"processes/{process_id}")))

    async def upload(self, source: str | Path | IO[bytes], path: str, mode: int | None = None) -> FileEntry:
        """`RemoteSandbox.upload` for asyncio (the local file is read in a worker thread, piece by piece)."""
        if isinstance(source, (str, Path)):
            with open(source, "rb") as opened:
                return await self.upload(opened, path, mode)
        params = {"path": path, **({"mode": f"{mode:o}"} if mode is not None else {})}
        return FileEntry.model_validate(await self._request(
            "PUT", "files", params=params, content=_async_file_chunks(source),
            headers={"Content-Length": str(_size_of(source)), "Content-Type": "application/octet-stream"}))

    async def download(self, path: str, destination: str | Path | IO[bytes]) -> int:
        import asyncio

        import httpx

        if isinstance(destination, (str, Path)):
            with open(destination, "wb") as opened:
                return await self.download(path, opened)
        async with self._http.stream("GET", f"{self.base}/files", params={"path": path},
                                     timeout=httpx.Timeout(CONNECT_SECONDS, read=300),
                                     headers={"Authorization": f"Bearer {self._token()}"}) as response:
            if response.status_code != 200:
                raise error_of(response.status_code, await response.aread())
            written = 0
            async for chunk in response.aiter_bytes(FILE_CHUNK_BYTES):
                await asyncio.to_thread(destination.write, chunk)
                written += len(chunk)
            return written

    async def list_files(self, path: str = ".") -> FileList:
        return FileList.model_validate(await self._request("GET", "files", params={"path": path, "list": "1"}))

    async def delete_file(self, path: str, recursive: bool = False) -> None:
        await self._request("DELETE", "files", params={"path": path, **({"recursive": "1"} if recursive else {})})

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *_: object) -> None:
        try:
            if self.claimed is not None:
                await self.release()
        finally:
            await self.aclose()


def httpx_timeout(read: float) -> Any:
    import httpx

    return httpx.Timeout(CONNECT_SECONDS, read=read)


def _last(events: list[Output | RunResult]) -> RunResult:
    if not events or not isinstance(events[-1], RunResult):
        raise ApiError(502, "the gateway's stream ended before the call's result")
    return events[-1]


class Sandbox:
    def __init__(self, name: str, namespace: str = "default", socket: Path | str | None = None):
        self.name = name
        self.namespace = namespace
        self.socket = Path(socket) if socket else runtime_socket(namespace, name)
        # Frames over kept-alive connections (agentkube.ebpf.frames): HTTP's parsing and headers were a
        # quarter of a millisecond of every call, a new connection per call a third. Each new connection's
        # server is vetted before anything is sent to it. A runtime of an older release refuses the upgrade
        # to frames, and this sandbox then speaks HTTP to it.
        self._frames: FrameClient | None = FrameClient(self.socket, upgrade=True, check_server=_not_a_tool_call,
                                                       server_name="the sandbox runtime")
        self._http = Client(self.socket, check_server=_not_a_tool_call)

    @staticmethod
    def connect(name: str, namespace: str = "default", *, gateway: str | None = None,
                token: str | None = None, ca: str | Path | None = None) -> RemoteSandbox:
        """The sandbox through the gateway, from a pod of the cluster or from outside (module doc). `ca`:
        the PEM file that signed the gateway's certificate (default: AGENTKUBE_GATEWAY_CA, else the CA the
        chart publishes, read from the API server)."""
        return RemoteSandbox(name, namespace, *gateway_credentials(gateway, token, ca))

    @staticmethod
    def create(pool: str, namespace: str = "default", *, ttl: float | str | None = None, env: dict[str, str] | None = None,
               wait: float = 60.0, gateway: str | None = None, token: str | None = None,
               ca: str | Path | None = None) -> RemoteSandbox:
        """A new sandbox from the warm pool `pool`, through the gateway, once it runs; `release()` (or the end
        of a `with`) deletes it, and the operator does after `ttl` (module doc)."""
        return RemoteSandbox.create(pool, namespace, ttl=ttl, env=env, wait=wait, gateway=gateway, token=token, ca=ca)

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
        return RunResult.model_validate(self._request("run", "POST", "/v1/run", body, wait))

    def status(self) -> SandboxStatus:
        """The sandbox as the node agent sees it, including when it was last active."""
        self._wait_for_runtime()
        return SandboxStatus.model_validate(self._request("status", "GET", "/v1/status"))

    def _request(self, op: str, method: str, path: str, body: RunRequest | None = None,
                 timeout: float | None = None) -> object:
        """One request to the runtime: the frame `op`, or `method path` in HTTP to a runtime without frames."""
        if self._frames is not None:
            fields: dict[str, object] = {} if body is None else {"run": body.model_dump(mode="json")}
            try:
                return self._frames.send(op, fields, timeout=timeout)
            except FramesRefused:
                self._frames = None
        return self._http.request(method, path, body, timeout=timeout)

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
