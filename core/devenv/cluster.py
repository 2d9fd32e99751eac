"""`DevEnv`: one local environment — etcd, kube-apiserver, kube-controller-manager and Prometheus, and with
`with_node` a node (containerd, kube-scheduler, kubelet, kube-proxy, CoreDNS, the node agent, kube-router's
network policy controller) — living in one state directory. `up()` is idempotent, `down()` leaves no process and no file behind, and the
state file lets a later command (`agentkube dev down`) find what an earlier one started."""

import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import requests
import yaml

from agentkube.contract import AGENT_SOCKET
from agentkube.devenv import capacity, config, images, knative, localnode, localpath, network, node, pki, process
from agentkube.devenv.config import Layout, Ports
from agentkube.devenv.install import InstallError, ensure_go_program, ensure_knative, ensure_traefik, require_binary
from agentkube.devenv.versions import KUBERNETES_VERSION, bin_dir
from agentkube.ebpf import csi

POLL_INTERVAL = 0.1


class DevEnvError(RuntimeError):
    """The environment could not be started; the message says which part and why."""


@dataclass(frozen=True)
class Component:
    name: str  # also the name of its binary, unless `binary` says otherwise
    command: Callable[[Path, Layout, Ports], list[str]]
    health_url: Callable[[Ports], str] | None = None
    health_client: str | None = None  # the client certificate its health check presents, if it needs one
    health_socket: Callable[[Layout], Path] | None = None  # or: healthy once this unix socket accepts
    health_probe: Callable[[], bool] | None = None  # or: healthy once this says so (a part with no server)
    binary: str | None = None


STORE = "etcd"
APISERVER_NAME = "kube-apiserver"


def control_plane(host: str) -> tuple[Component, ...]:
    """etcd, kube-apiserver (listening on `host`) and kube-controller-manager, in start order; each waits for
    the ones before it to be healthy."""
    return (
        Component(STORE, config.etcd_command, config.etcd_health_url, "apiserver-etcd-client"),
        Component(APISERVER_NAME, partial(config.apiserver_command, host=host), partial(config.apiserver_health_url, host=host),
                  "admin"),
        Component("kube-controller-manager", config.controller_manager_command, config.controller_manager_health_url),
    )
PROMETHEUS = Component("prometheus", config.prometheus_command, config.prometheus_health_url)
# With a node, Prometheus listens on the node's address instead (the bridge, never beyond this machine), so
# that pods reach it: the installed operator's autoscaling loop reads Knative's metrics there.
PROMETHEUS_ON_NODE = Component("prometheus", partial(config.prometheus_command, host=node.NODE_IP),
                               partial(config.prometheus_health_url, host=node.NODE_IP))
CONTAINERD = Component("containerd", lambda binary, layout, ports: node.containerd_command(layout.node),
                       health_socket=lambda layout: layout.node.containerd_socket)
# The node, in start order after containerd (which comes first, so that the images can be imported).
NODE = (
    Component("kube-scheduler", config.scheduler_command, config.scheduler_health_url),
    Component("kubelet", config.kubelet_command, config.kubelet_health_url),
    Component("kube-proxy", config.kube_proxy_command, config.kube_proxy_health_url),
    Component("coredns", config.coredns_command, config.coredns_health_url),
    Component("node-agent", lambda python, layout, ports: node.node_agent_command(
                  python, layout.node, layout.client_kubeconfig("node-agent")),
              health_socket=lambda layout: AGENT_SOCKET, binary=sys.executable),
)
# NetworkPolicy enforcement; it reads its own Node at start, so it starts once the node has registered.
NETWORK_POLICY = Component("kube-router", config.kube_router_command, health_probe=localnode.kube_router_ready)
# Volumes for claims (sandbox workspaces); its helper pods need a Ready node. It serves nothing to probe:
# running is healthy.
LOCAL_PATH = Component("local-path-provisioner", config.local_path_provisioner_command, health_probe=lambda: True)
NODE_COMPONENTS_AFTER_READY = (NETWORK_POLICY, LOCAL_PATH)
NODE_READY_SECONDS = 120.0
# Knative's four Deployments pulling nothing (images are imported) and starting on two shared cores.
KNATIVE_READY_SECONDS = 240.0
KNATIVE_TARGETS = "knative-targets"
# Karpenter's Deployment (one small pod) and kwok's first heartbeat.
CAPACITY_READY_SECONDS = 120.0
KWOK = "kwok"
TRAEFIK = "traefik"
# Where the node agent runs: a host process that `up` starts (the default), or nowhere, for a node agent
# that the chart's DaemonSet runs (one per node: two would share the sockets and the pins).
NODE_AGENT_MODES = ("host", "none")


def node_components(node_agent: str) -> tuple[Component, ...]:
    """The node's processes after containerd, in start order, for a node-agent mode."""
    if node_agent not in NODE_AGENT_MODES:
        raise ValueError(f"node agent {node_agent!r}: one of {', '.join(NODE_AGENT_MODES)}")
    return tuple(c for c in NODE if node_agent == "host" or c.name != "node-agent")


def issue_credentials(now: datetime.datetime) -> dict[str, pki.KeyPair]:
    """Every certificate of one environment, by file name. Each client identity comes from `config`, so
    which component may do what is decided there and checked by the unit tests."""
    ca, ca_key = pki.new_ca("agentkube-dev-ca", now)
    front_proxy_ca, front_proxy_ca_key = pki.new_ca("agentkube-dev-front-proxy-ca", now)
    loopback: dict[str, Any] = {"dns_names": ("localhost",), "ip_addresses": (config.LOOPBACK,)}
    credentials = {
        "ca": ca,
        "etcd": pki.issue(ca, ca_key, "etcd", now, server=True, client=True, **loopback),
        "apiserver": pki.issue(
            ca, ca_key, "kube-apiserver", now, server=True,
            dns_names=config.APISERVER_DNS_NAMES, ip_addresses=(config.LOOPBACK, config.KUBERNETES_SERVICE_IP, node.NODE_IP),
        ),
        "controller-manager": pki.issue(ca, ca_key, "kube-controller-manager", now, server=True, **loopback),
        "scheduler": pki.issue(ca, ca_key, "kube-scheduler", now, server=True, **loopback),
        "kubelet": pki.issue(ca, ca_key, config.KUBELET.user, now, server=True, dns_names=(node.NODE_NAME,),
                             ip_addresses=(node.NODE_IP, config.LOOPBACK)),
        "front-proxy-ca": front_proxy_ca,
        "front-proxy-client": pki.issue(front_proxy_ca, front_proxy_ca_key, config.FRONT_PROXY_CLIENT.user, now, client=True),
    }
    for name, identity in config.CLIENT_CERTIFICATES.items():
        credentials[name] = pki.issue(ca, ca_key, identity.user, now, organizations=identity.groups, client=True)
    return credentials


def _optional_binary(name: str) -> Path | None:
    try:
        return require_binary(name)
    except InstallError:
        return None


# Temporary environments (tests, benchmarks) live in <tmp>/agentkube-<owner pid>-<random>.
TEMPORARY_PREFIX = "agentkube-"


def temporary_env(*, with_prometheus: bool = True, with_node: bool = False, node_agent: str = "host",
                  with_knative: bool = False, with_capacity: bool = False) -> "DevEnv":
    """An environment in a fresh temporary directory whose processes die with this Python process.

    `down()` removes the directory. A process killed outright (SIGKILL) cannot do that, so every new
    temporary environment first sweeps the directories of owners that no longer exist."""
    sweep_abandoned()
    root = Path(tempfile.mkdtemp(prefix=f"{TEMPORARY_PREFIX}{os.getpid()}-"))
    return DevEnv(root, tie_to_parent=True, with_prometheus=with_prometheus, with_node=with_node, node_agent=node_agent,
                  with_knative=with_knative, with_capacity=with_capacity)


def sweep_abandoned() -> list[Path]:
    removed = []
    for path in Path(tempfile.gettempdir()).glob(f"{TEMPORARY_PREFIX}*-*"):
        owner = path.name.removeprefix(TEMPORARY_PREFIX).split("-")[0]
        if not owner.isdigit() or psutil.pid_exists(int(owner)):
            continue
        try:
            abandoned = DevEnv(path)
        except (ValueError, TypeError, KeyError) as error:  # written by another version of agentkube: not ours to judge
            print(f"leaving {path} alone: its state is not this version's ({error})")
            continue
        if abandoned.is_removable():
            abandoned.down()  # a node's containers, mounts and bridge too, not only the directory
            removed.append(path)
    return removed


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((config.LOOPBACK, 0))
        return sock.getsockname()[1]


def _write_private(path: Path, data: bytes) -> None:
    """Owner-only, and atomic: a reader (or a crash) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    partial.replace(path)


def build_artifacts(with_node: bool, with_knative: bool, with_capacity: bool) -> list[Path]:
    """Build what such an environment runs that is made here rather than installed, unless cached: the
    images the node imports (their archives are returned) and the Knative, Traefik, Karpenter and kwok
    programs. Only the first call on a machine is slow (Debian root filesystems, minutes of `go build`);
    `agentkube dev install` makes it ahead of time, so that no environment's start waits for it."""
    archives = [images.pause_archive(), images.sandbox_archive(), *images.component_archives()] if with_node else []
    if with_knative:
        archives += [*knative.image_archives(ensure_knative()), images.model_server_archive()]
        ensure_traefik()
    if with_capacity:
        archives.append(capacity.image_archive(ensure_go_program("karpenter")))
        ensure_go_program("kwok")
    return archives


class DevEnv:
    def __init__(self, state_dir: Path, *, tie_to_parent: bool = False, with_prometheus: bool = True,
                 with_node: bool = False, node_agent: str = "host", with_knative: bool = False,
                 with_capacity: bool = False):
        """`tie_to_parent`: the processes die with this Python process (tests); otherwise they outlive it
        (`agentkube dev up`). `with_node`: also a node that runs pods (one per machine). `node_agent`:
        `host` starts the node agent as a host process, `none` leaves it to the chart's DaemonSet.
        `with_knative`: also Knative Serving, as pods on the node (implies `with_node`). `with_capacity`:
        also Karpenter (KWOK provider) and kwok, for simulated spot and on-demand nodes (implies `with_node`:
        Karpenter runs as a pod, and the scheduler runs with the node)."""
        self.layout = Layout(Path(state_dir))
        self.tie_to_parent = tie_to_parent
        self.with_knative = with_knative
        self.with_capacity = with_capacity
        self.with_node = with_node or with_knative or with_capacity
        self.node_components = node_components(node_agent)
        self.node_agent = node_agent
        self.with_prometheus = with_prometheus
        self.ports: Ports | None = None
        self.processes: list[process.ProcessRecord] = []
        # Seconds from starting each component to its first healthy answer, in start order (last `up`).
        self.startup_seconds: dict[str, float] = {}
        self._load_state()

    @property
    def components(self) -> tuple[Component, ...]:
        """The control plane and Prometheus (on the node's address when there is a node)."""
        return control_plane(self.host) + (((PROMETHEUS_ON_NODE if self.with_node else PROMETHEUS),) if self.with_prometheus else ())

    @property
    def host(self) -> str:
        """Where the API server listens: loopback, or with a node the node's address (on its bridge, never beyond
        this machine), so that pods — the chart's operator and node agent — reach it through the `kubernetes`
        Service."""
        return node.NODE_IP if self.with_node else config.LOOPBACK

    # ----- state -----------------------------------------------------------------------------------
    def _load_state(self) -> None:
        if self.layout.state.is_file():
            state = json.loads(self.layout.state.read_text())
            self.ports = Ports(**state["ports"])
            self.processes = [process.ProcessRecord.from_json(p) for p in state["processes"]]
            self.with_node = self.with_node or state.get("with_node", False)
            self.with_knative = self.with_knative or state.get("with_knative", False)
            self.with_capacity = self.with_capacity or state.get("with_capacity", False)
            self.node_agent = state.get("node_agent", "host")
            self.node_components = node_components(self.node_agent)

    def _save_state(self) -> None:
        assert self.ports is not None
        state = {
            "kubernetes_version": KUBERNETES_VERSION,
            "ports": asdict(self.ports),
            "with_node": self.with_node,
            "with_knative": self.with_knative,
            "with_capacity": self.with_capacity,
            "node_agent": self.node_agent,
            "processes": [p.to_json() for p in self.processes],
        }
        _write_private(self.layout.state, json.dumps(state, indent=2).encode())

    # ----- public API ------------------------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        return self.layout.kubeconfig

    @property
    def apiserver_url(self) -> str:
        return config.apiserver_url(self._require_ports(), self.host)

    @property
    def prometheus_url(self) -> str:
        return config.prometheus_url(self._require_ports(), node.NODE_IP if self.with_node else config.LOOPBACK)

    def environ(self) -> dict[str, str]:
        """This process's environment, pointed at this environment: KUBECONFIG, and kubectl/helm first on PATH.
        kubectl's discovery cache goes to the environment's directory unless the caller chose a place: without
        HOME it would be `.kube/` in the working directory (once the repository, where it got committed)."""
        path = f"{bin_dir()}{os.pathsep}{os.environ.get('PATH', '')}"
        cache = os.environ.get("KUBECACHEDIR") or str(self.layout.root / "kube-cache")
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PATH": path, "KUBECACHEDIR": cache}

    def status(self) -> dict[str, bool]:
        """Whether each component is running and answering its health check."""
        running = {record.name: process.is_running(record) for record in self.processes}
        return {c.name: running.get(c.name, False) and self._healthy(c) for c in self._all_components()}

    def is_removable(self) -> bool:
        """An empty directory, or one that holds an environment's state."""
        root = self.layout.root
        return root.is_dir() and (self.layout.state.is_file() or not any(root.iterdir()))

    def is_up(self) -> bool:
        return self.ports is not None and all(self.status().values())

    def up(self, timeout: float = 120.0) -> "DevEnv":
        if self.is_up():
            return self
        self.down()  # leftovers of a crashed or partial run: start clean
        binaries = {c.name: require_binary(c.binary or c.name) for c in self._all_components()}
        # Outside the deadline: on a machine that has not run `agentkube dev install`, builds take minutes.
        archives = build_artifacts(self.with_node, self.with_knative, self.with_capacity)
        deadline = time.monotonic() + timeout
        try:
            self.layout.root.mkdir(parents=True, mode=0o700)
            self.ports = Ports(*(free_port() for _ in fields(Ports)))
            self._save_state()  # first, so that `down` recognises the directory as an environment's
            self._write_files()
            if self.with_node:  # the node's address, on its bridge, before Prometheus listens there
                localnode.acquire(self.layout.root)
                localnode.create_bridge()
            for component in self.components:
                self._start(component, binaries[component.name], deadline)
            if self.with_node:
                self._up_node(binaries, archives, deadline + NODE_READY_SECONDS)
            if self.with_knative:
                self._up_knative(deadline + NODE_READY_SECONDS + KNATIVE_READY_SECONDS)
            if self.with_capacity:
                self._up_capacity(deadline + NODE_READY_SECONDS + KNATIVE_READY_SECONDS + CAPACITY_READY_SECONDS)
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Stop every process and remove the state directory. Refuses a directory that holds anything
        but an environment (a mistyped --state-dir must never delete someone's files)."""
        root = self.layout.root
        if root.exists() and not self.is_removable():
            raise DevEnvError(f"{root} is not empty and holds no agentkube environment: refusing to use or delete it")
        if self.with_node:
            self._down_node()
        # Everything else first, together; etcd last, since the apiserver needs it to shut down cleanly.
        process.stop([r for r in self.processes if r.name != STORE])
        process.stop([r for r in self.processes if r.name == STORE])
        self.processes = []
        self.ports = None
        shutil.rmtree(self.layout.root, ignore_errors=True)

    def stop_apiserver(self) -> None:
        """Stop kube-apiserver alone (an outage, for testing that clients ride it out); etcd and every other
        process keep running, and `start_apiserver` brings it back on the same address and port."""
        self._require_ports()
        process.stop([r for r in self.processes if r.name == APISERVER_NAME])
        self.processes = [r for r in self.processes if r.name != APISERVER_NAME]
        self._save_state()

    def start_apiserver(self, timeout: float = 60.0) -> None:
        """Start kube-apiserver again with the same command line: same port, certificates and etcd, so that
        every client reconnects to what it knew. A no-op while it runs."""
        self._require_ports()
        if any(r.name == APISERVER_NAME and process.is_running(r) for r in self.processes):
            return
        self.processes = [r for r in self.processes if r.name != APISERVER_NAME]
        apiserver = next(c for c in self.components if c.name == APISERVER_NAME)
        self._start(apiserver, require_binary(APISERVER_NAME), time.monotonic() + timeout)

    def restart_apiserver(self, down_for: float = 0.0, timeout: float = 60.0) -> None:
        """Stop kube-apiserver, leave it down for `down_for` seconds, start it again; returns once healthy."""
        self.stop_apiserver()
        time.sleep(down_for)
        self.start_apiserver(timeout)

    def start_alongside(self, name: str, argv: list[str]) -> Path:
        """Start a process that belongs to this environment (`down` stops it), in place of an earlier one of
        the same name; returns its log."""
        self.stop_alongside(name)
        log = self.layout.log(name)
        self.processes.append(process.start(name, argv, log, tie_to_parent=self.tie_to_parent))
        self._save_state()
        return log

    def stop_alongside(self, name: str) -> None:
        process.stop([r for r in self.processes if r.name == name])
        self.processes = [r for r in self.processes if r.name != name]
        self._save_state()

    def add_scrape_target(self, job: str, addresses: list[str], labels: dict[str, str] | None = None) -> None:
        """Have Prometheus scrape `addresses` (host:port) under the job name `job`, from its next refresh."""
        group = config.scrape_target_group(job, addresses, labels)
        _write_private(self.layout.scrape_targets / f"{job}.json", json.dumps(group).encode())

    def write_token_kubeconfig(self, name: str, token: str) -> Path:
        """A kubeconfig (owner-only, inside the environment) that authenticates with `token`: run a
        component as its service account, with exactly the permissions RBAC gives it."""
        document = config.token_kubeconfig(self.apiserver_url, self.layout.cert("ca").read_bytes(), name, token)
        path = self.layout.root / f"{name}.kubeconfig"
        _write_private(path, yaml.safe_dump(document).encode())
        return path

    def remove_scrape_target(self, job: str) -> None:
        (self.layout.scrape_targets / f"{job}.json").unlink(missing_ok=True)

    def __enter__(self) -> "DevEnv":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    # ----- internals -------------------------------------------------------------------------------
    def _all_components(self) -> tuple[Component, ...]:
        return self.components + ((CONTAINERD, *self.node_components, *NODE_COMPONENTS_AFTER_READY) if self.with_node else ())

    def _start(self, component: Component, binary: Path, deadline: float) -> None:
        started = time.monotonic()
        argv = component.command(binary, self.layout, self._require_ports())
        self.processes.append(
            process.start(component.name, argv, self.layout.log(component.name), tie_to_parent=self.tie_to_parent)
        )
        self._save_state()
        self._wait_healthy(component, deadline)
        self.startup_seconds[component.name] = time.monotonic() - started

    def _up_node(self, binaries: dict[str, Path], archives: list[Path], deadline: float) -> None:
        layout, ports = self.layout, self._require_ports()
        started = time.monotonic()
        localnode.acquire(layout.root)
        localnode.create_bridge()
        # The firewall before forwarding is on and before any pod exists: no packet of a pod ever leaves.
        localnode.install_firewall()
        localnode.set_host_sysctls()
        node_layout = layout.node
        for directory in (node_layout.cni_conf_dir, node_layout.kubelet_root, node_layout.corefile.parent):
            directory.mkdir(parents=True, exist_ok=True)
        _write_private(node_layout.resolv_conf, node.resolv_conf().encode())
        _write_private(node_layout.corefile, config.corefile(layout, ports).encode())
        _write_private(node_layout.containerd_config, node.containerd_config(node_layout, images.PAUSE_IMAGE).encode())
        _write_private(node_layout.cni_conf_dir / f"10-{node.CNI_NETWORK}.conflist",
                       json.dumps(node.cni_conflist(node_layout)).encode())
        _write_private(node_layout.kubelet_config, yaml.safe_dump(
            node.kubelet_config(node_layout, layout.pki, ports.kubelet, ports.kubelet_healthz)).encode())
        self._start(CONTAINERD, binaries[CONTAINERD.name], deadline)
        self._kubectl_apply(node.node_rbac(config.APISERVER_KUBELET_CLIENT.user, config.NODE_AGENT.user)
                            + network.coredns_rbac(config.COREDNS.user) + network.kube_router_rbac(config.KUBE_ROUTER.user)
                            + network.dns_objects() + localpath.objects(config.LOCAL_PATH_PROVISIONER.user)
                            # The node agent's CSIDriver goes with the node agent: the chart has its own.
                            + ([csi.csi_driver_object()] if self.node_agent == "host" else []))
        config_dir = config.local_path_config_dir(layout)
        for name, content in localpath.config_files(localpath.data_dir(node_layout.root), images.SANDBOX_IMAGE).items():
            _write_private(config_dir / name, content.encode())
        for component in self.node_components:
            self._start(component, binaries[component.name], deadline)
        # While the kubelet registers its node (it needs no image for that), the images go into containerd.
        for archive in archives:
            images.import_archive(node.CTR, node_layout.containerd_socket, node.CONTAINERD_NAMESPACE, archive)
        self._wait_node_ready(deadline)
        for component in NODE_COMPONENTS_AFTER_READY:
            self._start(component, binaries[component.name], deadline)
        self.startup_seconds["node"] = time.monotonic() - started

    def _down_node(self) -> None:
        node_processes = {component.name for component in (*NODE, *NODE_COMPONENTS_AFTER_READY)}
        process.stop([r for r in self.processes if r.name in node_processes])
        netns = localnode.remove_containers(self.layout.node)
        process.stop([r for r in self.processes if r.name == CONTAINERD.name])
        self.processes = [r for r in self.processes if r.name not in node_processes | {CONTAINERD.name}]
        # The bridge, the kubepods cgroups and pod netns are the machine's: only the node's owner clears them.
        if localnode.other_owner(self.layout.root) is None:
            localnode.clean_host(self.layout.node, self.layout.root, netns, _optional_binary("kube-proxy"))

    def _up_knative(self, deadline: float) -> None:
        """Knative's install applied as Knative documents it: CRDs first (its own objects of those kinds
        follow in the same install), then everything else, then each Deployment Available."""
        started = time.monotonic()
        documents = knative.load_documents()
        crds = [doc for doc in documents if doc["kind"] == "CustomResourceDefinition"]
        self._kubectl_apply(crds + knative.pod_discovery_rbac(config.PROMETHEUS.user))
        self._kubectl("wait", "--for=condition=Established", "--timeout=60s",
                      *(f"crd/{doc['metadata']['name']}" for doc in crds))
        self._kubectl_apply([doc for doc in documents if doc["kind"] != "CustomResourceDefinition"])
        self._start_traefik()
        for name in knative.DEPLOYMENTS:
            remaining = max(1, int(deadline - time.monotonic()))
            try:
                self._kubectl("-n", knative.SYSTEM_NAMESPACE, "rollout", "status", f"deployment/{name}",
                              f"--timeout={remaining}s")
            except DevEnvError as error:
                pods = subprocess.run([str(require_binary("kubectl")), "-n", knative.SYSTEM_NAMESPACE, "get", "pods",
                                       "-o", "wide"], capture_output=True, text=True, env=self.environ()).stdout
                raise DevEnvError(f"Knative's {name} not available in time: {error}\n{pods}") from None
        self._wait_knative_admits(deadline)
        # Prometheus scrapes Knative's pods through a target file kept current by a process of this
        # environment (Debian's Prometheus has no Kubernetes service discovery).
        self.start_alongside(KNATIVE_TARGETS, [sys.executable, "-m", "agentkube", "dev", "knative-targets",
                                               "--state-dir", str(self.layout.root)])
        self.startup_seconds["knative"] = time.monotonic() - started

    def _up_capacity(self, deadline: float) -> None:
        """Karpenter's CRDs and node class, its chart (a pod on the real node) with the simulator's instance
        types, and kwok as a host process under its own service account."""
        started = time.monotonic()
        crds = capacity.crds()
        self._kubectl_apply(crds)
        self._kubectl("wait", "--for=condition=Established", "--timeout=60s",
                      *(f"crd/{doc['metadata']['name']}" for doc in crds))
        self._kubectl_apply([capacity.NODE_CLASS, {"apiVersion": "v1", "kind": "Namespace",
                                                   "metadata": {"name": capacity.SYSTEM_NAMESPACE}}])
        self._kubectl_apply([capacity.instance_types_configmap(), *capacity.chart_documents(self.environ())])
        self.start_kwok()
        remaining = max(1, int(deadline - time.monotonic()))
        try:
            self._kubectl("-n", capacity.SYSTEM_NAMESPACE, "rollout", "status", f"deployment/{capacity.RELEASE}",
                          f"--timeout={remaining}s")
        except DevEnvError as error:
            pods = subprocess.run([str(require_binary("kubectl")), "-n", capacity.SYSTEM_NAMESPACE, "get", "pods", "-o", "wide"],
                                  capture_output=True, text=True, env=self.environ()).stdout
            raise DevEnvError(f"Karpenter not available in time: {error}\n{pods}") from None
        self.startup_seconds["capacity"] = time.monotonic() - started

    def start_kwok(self) -> None:
        """kwok as a host process under its own service account (kwok's RBAC from its module), the kubelet of
        every Node annotated `capacity.KWOK_NODE_ANNOTATION`: Karpenter's, or a benchmark's own."""
        self._kubectl_apply(capacity.kwok_rbac())
        token = self._kubectl("-n", capacity.KWOK_NAMESPACE, "create", "token", capacity.KWOK_ACCOUNT,
                              "--duration=48h").strip()
        kubeconfig = self.write_token_kubeconfig(capacity.KWOK_ACCOUNT, token)
        config_path = self.layout.root / "kwok.yaml"
        _write_private(config_path, capacity.kwok_config(capacity.kwok_stages()).encode())
        self.start_alongside(KWOK, capacity.kwok_command(require_binary("kwok"), kubeconfig, config_path))

    def start_scheduler(self) -> None:
        """kube-scheduler for an environment without a node (with one, `up` starts it): simulated nodes
        (kwok's) then get pods bound to them."""
        scheduler = next(c for c in NODE if c.name == "kube-scheduler")
        self.start_alongside(scheduler.name, scheduler.command(require_binary(scheduler.name), self.layout, self._require_ports()))

    def _wait_knative_admits(self, deadline: float) -> None:
        """Until Knative's webhook answers: its Deployment is Available before the webhook has made its
        certificate and put it into the webhook configurations, and until then every Knative object and
        every change to Knative's ConfigMaps is refused."""
        probe = yaml.safe_dump(knative.admission_probe()).encode()
        while True:
            result = subprocess.run([str(require_binary("kubectl")), "create", "--dry-run=server", "-f", "-"],
                                    input=probe, capture_output=True, env=self.environ())
            if result.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise DevEnvError(f"Knative's webhook does not admit a Service: {result.stderr.decode()[-1500:]}")
            time.sleep(1)

    def _start_traefik(self) -> None:
        """Knative's KIngress: Traefik as a host process on the node's address, as its service account."""
        port = free_port()
        self._kubectl_apply(knative.traefik_objects(node.NODE_IP, node.NODE_NAME, port, network.ENDPOINTSLICE_MANAGER))
        token = self._kubectl("-n", knative.SYSTEM_NAMESPACE, "create", "token", knative.TRAEFIK_ACCOUNT,
                              "--duration=48h").strip()
        path = self.layout.root / "traefik.yml"
        _write_private(path, yaml.safe_dump(knative.traefik_config(
            f"{node.NODE_IP}:{port}", self.apiserver_url, token, str(self.layout.cert("ca")))).encode())
        self.start_alongside(TRAEFIK, [str(ensure_traefik()), f"--configFile={path}"])

    def _kubectl(self, *args: str) -> str:
        result = subprocess.run([str(require_binary("kubectl")), *args], capture_output=True, text=True, env=self.environ())
        if result.returncode != 0:
            raise DevEnvError(f"kubectl {' '.join(args)} failed: {result.stderr[-2000:]}")
        return result.stdout

    def _kubectl_apply(self, documents: list[dict]) -> None:
        manifest = yaml.safe_dump_all(documents).encode()
        result = subprocess.run([str(require_binary("kubectl")), "apply", "--server-side", "-f", "-"], input=manifest,
                                capture_output=True, env=self.environ())
        if result.returncode != 0:
            raise DevEnvError(f"kubectl apply failed: {result.stderr.decode()[-2000:]}")

    def _wait_node_ready(self, deadline: float) -> None:
        while True:
            result = subprocess.run(
                [str(require_binary("kubectl")), "get", "node", node.NODE_NAME, "-o",
                 "jsonpath={.status.conditions[?(@.type=='Ready')].status}"], capture_output=True, text=True,
                env=self.environ())
            if result.stdout.strip() == "True":
                return
            if time.monotonic() > deadline:
                raise DevEnvError(f"node {node.NODE_NAME} not Ready in time; the kubelet's log ends:\n"
                                  f"{process.log_tail(self.layout.log('kubelet'))}")
            time.sleep(0.5)

    def _require_ports(self) -> Ports:
        if self.ports is None:
            raise DevEnvError(f"no environment in {self.layout.root}: run `agentkube dev up`")
        return self.ports

    def _write_files(self) -> None:
        layout, ports = self.layout, self._require_ports()
        credentials = issue_credentials(datetime.datetime.now(datetime.UTC))
        for name, pair in credentials.items():
            _write_private(layout.cert(name), pair.cert_pem)
            _write_private(layout.key(name), pair.key_pem)
        service_account_key = pki.new_key()
        _write_private(layout.key("service-account"), pki.key_pem(service_account_key))
        _write_private(layout.service_account_public_key, pki.public_key_pem(service_account_key))

        kubeconfigs = [(layout.kubeconfig, "admin"), (layout.controller_manager_kubeconfig, "controller-manager-client")]
        kubeconfigs += [(layout.client_kubeconfig(name), name) for name in ("scheduler-client", "kubelet-client", "node-agent",
                                                                "kube-proxy-client", "coredns-client", "kube-router-client",
                                                                "local-path-provisioner-client", "prometheus")]
        for path, name in kubeconfigs:
            user = config.CLIENT_CERTIFICATES[name].user
            document = config.kubeconfig(
                config.apiserver_url(ports, self.host), credentials["ca"].cert_pem, credentials[name].cert_pem,
                credentials[name].key_pem, user
            )
            _write_private(path, yaml.safe_dump(document).encode())

        layout.scrape_targets.mkdir(parents=True, exist_ok=True)
        layout.prometheus_data.mkdir(parents=True, exist_ok=True)
        _write_private(layout.prometheus_config, yaml.safe_dump(config.prometheus_config(layout, ports, self.host)).encode())

    def _healthy(self, component: Component) -> bool:
        if self.ports is None:
            return False
        if component.health_socket:
            return localnode.socket_accepts(component.health_socket(self.layout))
        if component.health_probe:
            return component.health_probe()
        client = component.health_client
        assert component.health_url is not None  # a component is checked by a socket, a probe or a URL
        cert = (str(self.layout.cert(client)), str(self.layout.key(client))) if client else None
        try:
            response = requests.get(component.health_url(self.ports), cert=cert, verify=str(self.layout.cert("ca")), timeout=2)
            return response.status_code == 200
        except requests.RequestException:
            return False

    def _wait_healthy(self, component: Component, deadline: float) -> None:
        name = component.name
        record = next(r for r in self.processes if r.name == name)
        while not self._healthy(component):
            if not process.is_running(record):
                raise DevEnvError(f"{name} exited during start-up; its log ends:\n{process.log_tail(self.layout.log(name))}")
            if time.monotonic() > deadline:
                raise DevEnvError(f"{name} not healthy in time; its log ends:\n{process.log_tail(self.layout.log(name))}")
            time.sleep(POLL_INTERVAL)
