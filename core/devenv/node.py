"""The local node's configuration, as pure functions: containerd, CNI, kubelet and kube-scheduler.

One node per machine, as kind and k3s make one out of the same parts: containerd and runc from Debian,
the bridge/host-local/portmap CNI plugins, and the kubelet from the pinned Kubernetes module. Every path
lives under the environment's directory, except what the kernel and the tools keep in fixed places
(the bridge, network namespaces under /run/netns, the kubepods cgroups, the node agent's /run/agentkube),
which is why a machine runs one node at a time (a lock file says whose it is).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentkube.contract import CLUSTER_DOMAIN

NODE_NAME = "agentkube-node"
# The pods' subnet. The bridge holds its first address, which is also the node's InternalIP: the
# apiserver reaches the kubelet there for logs, exec and port-forward, and pods route through it (their
# default gateway). No masquerade, and the node's firewall (`network.firewall_rules`) drops whatever
# pods send towards any other interface, so nothing they send leaves this machine.
BRIDGE = "agentkube0"
POD_SUBNET = "10.88.0.0/24"
NODE_IP = "10.88.0.1"
# The cluster's addresses, for whoever must know them (the apiserver, kube-proxy, the node agent's
# `cluster` egress mode): the Services' range, and the cluster DNS (the `kube-dns` Service, by custom the
# tenth address of the range) under the cluster's domain.
SERVICE_CIDR = "10.96.0.0/16"
CLUSTER_DNS_IP = "10.96.0.10"
DNS_PORT = 53
# Links whose host end is named so (veths into network namespaces the tests make as "test hosts") are
# the only interfaces besides the bridge that pods' traffic may be forwarded to.
TEST_LINK_PREFIX = "akt"
CNI_NETWORK = "agentkube"
CNI_BIN_DIR = Path("/usr/lib/cni")
RUNC = Path("/usr/sbin/runc")
CONTAINERD = Path("/usr/bin/containerd")
CTR = Path("/usr/bin/ctr")
# containerd's CRI plugin keeps pod images in this containerd namespace.
CONTAINERD_NAMESPACE = "k8s.io"
# Fixed by containerd 1.6 (not configurable): where pod network namespaces are bind-mounted.
NETNS_DIR = Path("/run/netns")
# One node per machine: the bridge, /run/netns, the kubepods cgroups and the node agent's sockets are global.
NODE_LOCK = Path("/run/agentkube-dev-node.lock")


@dataclass(frozen=True)
class NodeLayout:
    """The node's files, all under the environment's directory."""

    root: Path

    @property
    def containerd_config(self) -> Path:
        return self.root / "containerd" / "config.toml"

    @property
    def containerd_root(self) -> Path:
        return self.root / "containerd" / "root"

    @property
    def containerd_state(self) -> Path:
        return self.root / "containerd" / "state"

    @property
    def containerd_socket(self) -> Path:
        return self.root / "containerd" / "containerd.sock"

    @property
    def cni_conf_dir(self) -> Path:
        return self.root / "cni" / "net.d"

    @property
    def cni_ipam_dir(self) -> Path:
        return self.root / "cni" / "ipam"

    @property
    def kubelet_root(self) -> Path:
        return self.root / "kubelet"

    @property
    def kubelet_config(self) -> Path:
        return self.root / "kubelet-config.yaml"

    @property
    def resolv_conf(self) -> Path:
        return self.root / "resolv.conf"

    @property
    def corefile(self) -> Path:
        return self.root / "coredns" / "Corefile"

    @property
    def images(self) -> Path:
        return self.root / "images"


def containerd_config(layout: NodeLayout, pause_image: str) -> str:
    """containerd 1.6's config (version 2): CRI with runc under the cgroupfs driver, CNI from Debian."""
    return f"""\
version = 2
root = "{layout.containerd_root}"
state = "{layout.containerd_state}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "{layout.containerd_socket}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause_image}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  # Lowering a process's oom_score_adj (the kubelet asks -998 for pause) needs CAP_SYS_RESOURCE, which
  # root does not have everywhere (not on these VMs): never ask for less than containerd's own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{RUNC}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{layout.cni_conf_dir}"
    max_conf_num = 1
"""


def cni_conflist(layout: NodeLayout) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": CNI_NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                # Through the node for everything (ClusterIPs, the tests' hosts): what may leave the
                # bridge is decided by the node's firewall, which forwards nothing off this machine.
                "isDefaultGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET, "gateway": NODE_IP}]],
                    "dataDir": str(layout.cni_ipam_dir),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(layout: NodeLayout, pki: Path, port: int, healthz_port: int) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "tlsCertFile": str(pki / "kubelet.crt"),
        "tlsPrivateKeyFile": str(pki / "kubelet.key"),
        # Only the apiserver (its kubelet-client certificate) and authorized tokens reach the kubelet's API.
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(pki / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": f"unix://{layout.containerd_socket}",
        "imageServiceEndpoint": f"unix://{layout.containerd_socket}",
        # Debian's containerd 1.6 cannot tell the kubelet its cgroup driver, and this host has no systemd.
        "cgroupDriver": "cgroupfs",
        # This host's memory, cpu and pids controllers are on cgroup v1 (a v1+v2 hybrid).
        "failCgroupV1": False,
        "failSwapOn": False,
        "memorySwap": {"swapBehavior": "NoSwap"},
        # The base of every pod's resolv.conf names only the cluster DNS: the host's own resolvers are off
        # this machine, so even a pod with dnsPolicy Default never asks them.
        "resolvConf": str(layout.resolv_conf),
        "clusterDNS": [CLUSTER_DNS_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        # A development disk is often fuller than a node's: evict only when it is really out.
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                         "nodefs.inodesFree": "1%"},
        # Images come from local root filesystems and cannot be pulled again: never collect them.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        "maxPods": 110,
        "podCIDR": POD_SUBNET,
        "staticPodPath": "",
        "shutdownGracePeriod": "0s",
    }


def resolv_conf() -> str:
    """The kubelet's base resolv.conf (see `kubelet_config`)."""
    return f"nameserver {CLUSTER_DNS_IP}\n"


def kubelet_command(binary: Path, layout: NodeLayout, kubeconfig: Path) -> list[str]:
    return [
        str(binary),
        f"--config={layout.kubelet_config}",
        f"--kubeconfig={kubeconfig}",
        f"--root-dir={layout.kubelet_root}",
        f"--hostname-override={NODE_NAME}",
        f"--node-ip={NODE_IP}",
        "--v=1",
    ]


def containerd_command(layout: NodeLayout) -> list[str]:
    return [str(CONTAINERD), f"--config={layout.containerd_config}", "--log-level=warn"]


def scheduler_command(binary: Path, kubeconfig: Path, port: int, pki: Path) -> list[str]:
    return [
        str(binary),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={port}",
        f"--tls-cert-file={pki / 'scheduler.crt'}",
        f"--tls-private-key-file={pki / 'scheduler.key'}",
        "--leader-elect=false",
        "--profiling=false",
    ]


def node_rbac(apiserver_kubelet_client: str, node_agent: str) -> list[dict[str, Any]]:
    """What the node's parts may do beyond Kubernetes' bootstrap policy: the apiserver reaches the
    kubelet's API (logs, exec, port-forward) as its kubelet client, as kubeadm binds it; the node agent
    reads the pods of its node and reports tool-call activity on their AgentSandboxes."""
    return [
        _cluster_role_binding("agentkube:apiserver-kubelet-client", "system:kubelet-api-admin", apiserver_kubelet_client),
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "agentkube:node-agent"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
                      {"apiGroups": ["agentkube.dev"], "resources": ["agentsandboxes"], "verbs": ["get", "patch"]},
                      # egress `cluster`: pod CIDRs, service CIDRs and the cluster DNS (the DNS answering's upstream)
                      {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]},
                      {"apiGroups": ["networking.k8s.io"], "resources": ["servicecidrs"], "verbs": ["list"]},
                      {"apiGroups": [""], "resources": ["services"], "verbs": ["get"]}],
        },
        _cluster_role_binding("agentkube:node-agent", "agentkube:node-agent", node_agent),
    ]


def _cluster_role_binding(name: str, role: str, user: str) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }


def node_agent_command(python: Path, layout: NodeLayout, kubeconfig: Path) -> list[str]:
    return [
        str(python), "-m", "agentkube", "node-agent", "run",
        f"--node-name={NODE_NAME}",
        f"--kubeconfig={kubeconfig}",
        f"--kubelet-root-dir={layout.kubelet_root}",
        f"--state-dir={layout.root / 'node-agent'}",
    ]


def netns_paths(container_infos: list[dict[str, Any]]) -> set[str]:
    """The network namespaces (bind-mount paths) of containerd's containers, from `ctr containers info`."""
    paths = set()
    for info in container_infos:
        for namespace in (info.get("Spec") or {}).get("linux", {}).get("namespaces", []):
            if namespace.get("type") == "network" and namespace.get("path"):
                paths.add(namespace["path"])
    return paths
