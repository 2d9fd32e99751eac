"""`agentkube node-agent` and `agentkube sandbox-runtime`."""

from __future__ import annotations

import threading
from pathlib import Path

import typer

from agentkube.contract import (
    AGENT_SOCKET,
    CLUSTER_DOMAIN,
    CSI_DRIVER,
    NODE_DNS_ADDRESS,
    RUNTIME_PORT,
    RUNTIME_VERIFIER_ENV,
    SANDBOX_AGENT_SOCKET,
    WORKSPACE_BYTES_ENV,
    WORKSPACE_ENV,
    runtime_socket,
)

AGENT_STATE_DIR = Path("/var/lib/agentkube/node-agent")  # running calls, sandboxes, history, audit log

node_agent_app = typer.Typer(help="The node agent: a cgroup per tool call, enforced and observed with eBPF.",
                             no_args_is_help=True)
sandbox_runtime_app = typer.Typer(help="The sandbox runtime: runs commands inside a sandbox as tool calls.",
                                  invoke_without_command=True)


@node_agent_app.command("run")
def run_node_agent(
    local: bool = typer.Option(False, "--local", help="sandboxes are cgroups this agent creates (no Kubernetes)"),
    socket: Path = typer.Option(AGENT_SOCKET, help="the API's unix socket (created 0600)"),
    sandbox_socket: Path = typer.Option(SANDBOX_AGENT_SOCKET, help="Kubernetes mode: the socket sandbox pods mount "
                                        "(0666; each request is authorized by its caller's cgroup)"),
    node_name: str | None = typer.Option(None, envvar="NODE_NAME", help="Kubernetes mode: this node's name"),
    kubeconfig: str | None = typer.Option(None, help="Kubernetes mode: credentials (default: in-cluster)"),
    kubelet_root_dir: Path = typer.Option(Path("/var/lib/kubelet"), help="Kubernetes mode: the kubelet's --root-dir"),
    csi: bool = typer.Option(True, "--csi/--no-csi", help="Kubernetes mode: serve the CSI node plugin that delivers "
                             "the sandbox socket's directory into sandbox pods (registered with the kubelet)"),
    csi_driver: str = typer.Option(CSI_DRIVER, help="Kubernetes mode: the CSI driver's name (its CSIDriver object's)"),
    state_dir: Path = typer.Option(AGENT_STATE_DIR, help="running calls, sandboxes, history, audit log"),
    instance: str = typer.Option("agentkube", help="name of the cgroup root and bpffs directory"),
    metrics_port: int | None = typer.Option(None, help="also serve /metrics on METRICS_ADDRESS:PORT"),
    metrics_address: str = typer.Option("127.0.0.1", help="where /metrics listens: loopback, or (a DaemonSet on "
                                                          "the host network) the node's own address for its Service"),
    favor_dynmods: bool = typer.Option(False, "--favor-dynmods",
                                       help="remount the v2 hierarchy with favordynmods (host-wide, left on): "
                                            "no RCU wait on each process move, a little more per fork/exit; "
                                            "the chart turns it on"),
    pod_cidr: list[str] = typer.Option([], "--pod-cidr", help="egress `cluster`: a pod CIDR (repeatable; "
                                       "default in Kubernetes mode: every Node's spec.podCIDRs)"),
    service_cidr: list[str] = typer.Option([], "--service-cidr", help="egress `cluster`: a service CIDR "
                                           "(repeatable; default in Kubernetes mode: the ServiceCIDR objects)"),
    dns_address: str | None = typer.Option(None, help="answer tool calls' DNS on this node-local address "
                                           f"(default in Kubernetes mode: {NODE_DNS_ADDRESS}; --local: none)"),
    upstream_dns: str | None = typer.Option(None, help="HOST[:PORT] allowed queries are forwarded to (default in "
                                            "Kubernetes mode: the kube-dns Service in kube-system)"),
    cluster_domain: str = typer.Option(CLUSTER_DOMAIN, help="the kubelet's --cluster-domain"),
) -> None:
    """Run the node agent until SIGTERM/SIGINT. Running calls survive a restart."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from agentkube.ebpf.api import NodeAgentServer
    from agentkube.ebpf.runtime import favor_latency, install_stop_signals

    stop = threading.Event()
    install_stop_signals(stop)
    favor_latency()
    if not local and not node_name:
        raise typer.BadParameter("give --node-name (or NODE_NAME), or run with --local", param_hint="--node-name")
    from agentkube.ebpf.netconfig import EgressConfig

    try:
        egress = EgressConfig.from_flags(local=local, pod_cidrs=pod_cidr, service_cidrs=service_cidr,
                                         dns_address=dns_address, upstream_dns=upstream_dns,
                                         cluster_domain=cluster_domain, kubeconfig=kubeconfig, instance=instance)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    server = NodeAgentServer(socket, state_dir, instance=instance, metrics_port=metrics_port, metrics_address=metrics_address,
                             favor_dynmods=favor_dynmods, local=local, egress=egress)
    if not local:
        server.serve_kubernetes(str(node_name), sandbox_socket, kubelet_root_dir, kubeconfig,
                                csi_driver=csi_driver if csi else None)
    typer.echo(f"node agent ({server.agent.layout.kind} cgroups{', local' if local else ''}) on {socket}", err=True)
    server.serve_forever(stop)


@sandbox_runtime_app.callback()
def run_sandbox_runtime(
    name: str = typer.Option(..., envvar="AGENTKUBE_SANDBOX_NAME", help="the sandbox's name"),
    namespace: str = typer.Option("default", envvar="AGENTKUBE_SANDBOX_NAMESPACE"),
    local: bool = typer.Option(False, "--local", help="register this process as a new local sandbox first"),
    agent_socket: Path = typer.Option(AGENT_SOCKET, envvar="AGENTKUBE_AGENT_SOCKET", help="the node agent's socket"),
    socket: Path | None = typer.Option(None, envvar="AGENTKUBE_SANDBOX_SOCKET",
                                       help="this runtime's socket (default /run/agentkube/sandboxes/NS/NAME.sock)"),
    memory: str = typer.Option("2Gi", help="--local: the sandbox's memory envelope (a quantity)"),
    cpu: str = typer.Option("1", help="--local: the sandbox's CPU envelope (a quantity)"),
    pids: int = typer.Option(1024, help="--local: the sandbox's pids envelope"),
    timeout: str = typer.Option("1h", help="--local: the longest call allowed (a duration)"),
    tools: str = typer.Option("{}", help="--local: the sandbox's spec.tools as JSON (default intent, profiles)"),
    pool_size: int = typer.Option(2, min=0, max=4, help="held processes kept waiting in call cgroups for the next "
                                  "calls (the warm pool; 0: none, each call starts its process and cgroup)"),
    verifier: str | None = typer.Option(None, envvar=RUNTIME_VERIFIER_ENV, help="SHA-256 of the sandbox's runtime "
                                        "token: also serve the gateway on TCP --port (set by the operator)"),
    port: int = typer.Option(RUNTIME_PORT, help="the gateway's TCP port (only with a verifier)"),
    workspace: Path | None = typer.Option(None, envvar=WORKSPACE_ENV, help="the workspace whose files the "
                                          "gateway's file API serves (set by the operator: the workspace's mount path)"),
    workspace_bytes: int = typer.Option(2**30, envvar=WORKSPACE_BYTES_ENV, min=1,
                                        help="the most one upload may write (set by the operator: spec.workspace.size)"),
) -> None:
    """Serve run requests for one sandbox until SIGTERM/SIGINT."""
    from agentkube.contract import Tools
    from agentkube.ebpf.models import EnvelopeSpec, SandboxCreate, SandboxRef
    from agentkube.ebpf.runtime import (
        SandboxRuntime,
        favor_latency,
        install_stop_signals,
        refuse_tracing,
        register_local_sandbox,
    )

    stop = threading.Event()
    install_stop_signals(stop)
    ref = SandboxRef(name=name, namespace=namespace)
    if local:
        envelope = EnvelopeSpec(memory=memory, cpu=cpu, pids=pids, timeout=timeout)
        register_local_sandbox(agent_socket, SandboxCreate(name=name, namespace=namespace, envelope=envelope,
                                                           tools=Tools.model_validate_json(tools)))
    path = socket or runtime_socket(namespace, name)
    refuse_tracing()
    favor_latency()
    runtime = SandboxRuntime(ref, agent_socket, path, pool_size=pool_size)
    gateway_port = None
    if verifier:
        from agentkube.ebpf.runtime_port import RuntimePortServer
        from agentkube.ebpf.workspace import Workspace

        gateway_port = RuntimePortServer(ref, agent_socket, verifier, port, pool=runtime.pool,
                                         workspace=Workspace(workspace, workspace_bytes) if workspace else None)
        gateway_port.start()
    typer.echo(f"sandbox runtime for {ref.key} on {path}" + (f" and TCP port {port} (gateway only)" if verifier else ""),
               err=True)
    runtime.serve(stop)
    if gateway_port is not None:
        gateway_port.stop()


if __name__ == "__main__":  # the sandbox image's entry point, without the whole CLI's dependencies
    sandbox_runtime_app()
