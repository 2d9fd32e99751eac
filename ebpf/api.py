"""The node agent's HTTP API (over its 0600 unix socket; in Kubernetes mode the sandbox routes also over
the sandbox socket that sandbox pods mount). Handlers only parse and delegate.

    POST   /v1/sandboxes                       create a sandbox (root, outside every sandbox)
    GET    /v1/sandboxes/{namespace}/{name}    its status, with last activity
    DELETE /v1/sandboxes/{namespace}/{name}    remove it (root, outside every sandbox)
    POST   /v1/calls                           place a held process as a tool call (from inside the sandbox)
    POST   /v1/calls/{call_id}/finish          report the call's first process ended; returns its record
    GET    /v1/calls/{call_id}                 a running or recently finished call
    GET    /metrics                            Prometheus exposition

The sandbox runtime's own requests also come as frames (agentkube.ebpf.frames) on the same sockets:
    fill    {name, namespace, pid}                  a held process waits in a new call cgroup (warm pool)
    start   {name, namespace, call_id, argv, intent} start a call in a waiting cgroup
    place   {name, namespace, pid, argv, intent}    place a held process as a call (no pool)
    finish  {call_id, exit_code, signal}            the call's first process ended; returns its record
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import start_http_server

from agentkube.ebpf.agent import NodeAgent
from agentkube.ebpf.frames import Answered
from agentkube.ebpf.models import CallCreate, CallFinish, CallStart, PoolFill, SandboxCreate, SandboxRef
from agentkube.ebpf.unixhttp import HttpError, UnixHttpServer

if TYPE_CHECKING:  # imported where Kubernetes mode starts: --local needs no Kubernetes client (nor gRPC)
    from agentkube.ebpf.csi import CSIPluginServer
    from agentkube.ebpf.kubernetes import PodWatcher


def _body(body: object) -> dict:
    if not isinstance(body, dict):
        raise HttpError(400, "expected a JSON object")
    return body


def routes(agent: NodeAgent, sandbox_only: bool = False) -> dict:
    """The API's routes; `sandbox_only`: just what a sandbox's runtime needs (for the sandbox socket)."""
    def ref(params):
        return SandboxRef(name=params["name"], namespace=params["namespace"])

    def create_sandbox(peer, params, body):
        return 201, agent.create_sandbox(peer, SandboxCreate.model_validate(_body(body)))

    def get_sandbox(peer, params, body):
        sandbox = agent.sandbox(ref(params))
        agent.require_runtime_or_admin(peer, sandbox)
        return 200, agent.status(sandbox)

    def delete_sandbox(peer, params, body):
        agent.delete_sandbox(peer, ref(params))
        return 200, {"deleted": ref(params).key}

    def place_call(peer, params, body):
        return 201, agent.place_call(peer, CallCreate.model_validate(_body(body)))

    def finish_call(peer, params, body):
        return 200, agent.finish_call(peer, params["call_id"], CallFinish.model_validate(_body(body or {})))

    def get_call(peer, params, body):
        return 200, agent.call(peer, params["call_id"])

    def metrics(peer, params, body):
        return 200, agent.metrics.exposition()

    return {
        ("GET", "/v1/sandboxes/{namespace}/{name}"): get_sandbox,
        ("POST", "/v1/calls"): place_call,
        ("POST", "/v1/calls/{call_id}/finish"): finish_call,
        ("GET", "/v1/calls/{call_id}"): get_call,
    } | ({} if sandbox_only else {
        ("POST", "/v1/sandboxes"): create_sandbox,
        ("DELETE", "/v1/sandboxes/{namespace}/{name}"): delete_sandbox,
        ("GET", "/metrics"): metrics,
    })


def frame_operations(agent: NodeAgent) -> dict:
    """The runtime's requests as frames: the operations of a call's path, each with its connection's memo."""
    def finish(peer, memo, message):
        call_id = message.get("call_id")
        if not isinstance(call_id, str):
            raise HttpError(400, "finish needs a call_id")
        # Answered as soon as the record is: the map entries, the record's file, history and metrics after.
        return Answered(*agent.finish_call_answer_first(peer, call_id, CallFinish.model_validate(
            {k: v for k, v in message.items() if k not in ("op", "call_id")}), memo))

    def fields(message: dict) -> dict:
        return {k: v for k, v in message.items() if k != "op"}

    return {
        "fill": lambda peer, memo, message: agent.fill_pool(peer, PoolFill.model_validate(fields(message)), memo),
        "start": lambda peer, memo, message: agent.start_call(peer, CallStart.model_validate(fields(message)), memo),
        "place": lambda peer, memo, message: agent.place_call(peer, CallCreate.model_validate(fields(message))),
        "finish": finish,
    }


class NodeAgentServer:
    """A node agent and its API server, started and stopped together."""

    def __init__(self, socket_path: Path, state_dir: Path, instance: str = "agentkube", metrics_port: int | None = None,
                 favor_dynmods: bool = False, local: bool = True, egress=None, metrics_address: str = "127.0.0.1"):
        self.agent = NodeAgent(state_dir, instance=instance, favor_dynmods=favor_dynmods, local=local, egress=egress)
        self.server = UnixHttpServer(socket_path, routes(self.agent), frames=frame_operations(self.agent))
        if metrics_port is not None:
            # One address, never all of them: loopback for a scraper on the node, or the node's own address for
            # a Service in front of a DaemonSet on the host network.
            start_http_server(metrics_port, addr=metrics_address, registry=self.agent.metrics.registry)
        self.sandbox_server: UnixHttpServer | None = None
        self.watcher: PodWatcher | None = None
        self.csi: CSIPluginServer | None = None

    def serve_kubernetes(self, node_name: str, sandbox_socket: Path, kubelet_root: Path, kubeconfig: str | None,
                         csi_driver: str | None = None) -> None:
        """Kubernetes mode: register the sandbox pods of `node_name`, and serve their runtimes on a socket
        the pods mount (only the routes a sandbox needs); with `csi_driver`, deliver that socket's directory
        into sandbox pods as that CSI driver's ephemeral inline volume."""
        from agentkube.ebpf.kubernetes import PodWatcher

        self.sandbox_server = UnixHttpServer(sandbox_socket, routes(self.agent, sandbox_only=True), mode=0o666,
                                             frames=frame_operations(self.agent))
        self.watcher = PodWatcher(self.agent, node_name, kubelet_root, kubeconfig)
        if csi_driver:
            from agentkube.ebpf.csi import CSIPluginServer, NodePlugin, api_pod_lookup

            self.csi = CSIPluginServer(NodePlugin(node_name, kubelet_root, api_pod_lookup(self.watcher.core),
                                                  driver=csi_driver, source=sandbox_socket.parent))

    def serve_forever(self, stop: threading.Event) -> None:
        self.server.start()
        if self.sandbox_server and self.watcher:
            self.sandbox_server.start()
            self.watcher.start()
            if self.csi:
                self.csi.start()  # after the sandbox socket exists: the directory it publishes is complete
        stop.wait()
        self.close()

    def close(self) -> None:
        if self.csi:
            self.csi.stop()
        if self.watcher and self.sandbox_server:
            self.watcher.close()
            self.sandbox_server.stop()
        self.server.stop()
        self.agent.stop()
