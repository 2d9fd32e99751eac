"""The local node's cluster networking, as pure functions: kube-proxy (iptables mode) for ClusterIPs,
CoreDNS for names, and the host firewall that keeps every packet a pod sends on this machine.

Nothing here touches the host; `localnode` applies the firewall and the sysctls, `cluster` starts the
processes and applies the objects.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from agentkube.contract import CLUSTER_DOMAIN
from agentkube.devenv.node import (
    BRIDGE,
    CLUSTER_DNS_IP,
    DNS_PORT,
    NODE_IP,
    NODE_NAME,
    POD_SUBNET,
    TEST_LINK_PREFIX,
)

LOOPBACK = "127.0.0.1"

# ----- host firewall ------------------------------------------------------------------------------------
# The chain is in the mangle table's FORWARD hook, which the kernel runs before the filter table's: no
# ACCEPT that kube-proxy (KUBE-FORWARD accepts masquerade-marked and established packets) or anything else
# puts in filter FORWARD can let a pod's packet past it.
FIREWALL_TABLE = "mangle"
FIREWALL_CHAIN = "AGENTKUBE-NODE-FORWARD"
FIREWALL_HOOK = "FORWARD"


def firewall_jump() -> list[str]:
    """The rule in FORWARD that sends everything arriving from the pods' bridge to the node's chain.

    Matched by the interface it came in on, not by source address: a pod that forges its source address
    (CAP_NET_RAW) is caught all the same."""
    return ["-i", BRIDGE, "-m", "comment", "--comment", "agentkube dev node: pods stay on this machine",
            "-j", FIREWALL_CHAIN]


def firewall_rules() -> list[list[str]]:
    """The node chain, in order: forwarded pod traffic may go back onto the bridge (other pods, the node's
    own address after kube-proxy's DNAT) or into the tests' hosts (veths named TEST_LINK_PREFIX*, into
    network namespaces on this machine); everything else — the machine's uplink above all — is dropped."""
    return [
        ["-o", BRIDGE, "-j", "RETURN"],
        ["-o", f"{TEST_LINK_PREFIX}+", "-j", "RETURN"],
        ["-j", "DROP"],
    ]


# The chains the node's own parts make: the kubelet's (KUBE-FIREWALL, its canaries), kube-proxy's (KUBE-*)
# and the node firewall. One node per machine, so whatever chain carries these prefixes is the node's.
NODE_CHAIN_PREFIXES = ("KUBE-", "AGENTKUBE-")
IPTABLES_TABLES = ("filter", "nat", "mangle", "raw")
_BUILTIN_CHAINS = {"INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"}


def node_chain_removal(listing: str) -> list[list[str]]:
    """From one table's `iptables -S`: the commands that take the node's chains away — first the rules that
    jump to them from the built-in chains, then every node chain flushed, then every one deleted (they
    jump to each other, so none can be deleted before all are empty)."""
    jumps, chains = [], []
    for line in listing.splitlines():
        words = shlex.split(line)
        if len(words) > 1 and words[0] == "-N" and words[1].startswith(NODE_CHAIN_PREFIXES):
            chains.append(words[1])
        elif (len(words) > 1 and words[0] == "-A" and words[1] in _BUILTIN_CHAINS and "-j" in words
              and words[words.index("-j") + 1].startswith(NODE_CHAIN_PREFIXES)):
            jumps.append(["-D", *words[1:]])
    return jumps + [["-F", chain] for chain in chains] + [["-X", chain] for chain in chains]


# Kernel settings the node needs, left as they are by `dev down` (they are harmless without the bridge,
# and another user of the machine may rely on them): routing between the bridge and the tests' links, and
# bridged pod-to-pod packets through iptables so that kube-proxy's DNAT sees them.
HOST_SYSCTLS = {
    "net.ipv4.ip_forward": "1",
    "net.bridge.bridge-nf-call-iptables": "1",
}


def sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


# ----- kube-proxy -----------------------------------------------------------------------------------------
def kube_proxy_command(binary: Path, kubeconfig: Path, healthz_port: int, metrics_port: int) -> list[str]:
    return [
        str(binary),
        f"--kubeconfig={kubeconfig}",
        f"--hostname-override={NODE_NAME}",
        "--proxy-mode=iptables",
        # Pod traffic to a Service is not masqueraded; other sources (the host) are, to the node's address.
        f"--cluster-cidr={POD_SUBNET}",
        # NodePorts answer on the bridge's address only, never on the machine's uplink.
        f"--nodeport-addresses={NODE_IP}/32",
        # Otherwise kube-proxy sets route_localnet on every interface for NodePorts on 127.0.0.1.
        "--iptables-localhost-nodeports=false",
        f"--healthz-bind-address={LOOPBACK}:{healthz_port}",
        f"--metrics-bind-address={LOOPBACK}:{metrics_port}",
        # 0 leaves the host's conntrack table size and timeouts as they are: this is a shared machine.
        "--conntrack-max-per-core=0",
        "--conntrack-tcp-timeout-established=0",
        "--conntrack-tcp-timeout-close-wait=0",
        "--profiling=false",
        "--v=1",
    ]


def kube_proxy_cleanup_command(binary: Path) -> list[str]:
    """Removes every KUBE-* chain and rule kube-proxy made (its own `--cleanup`), once it has stopped."""
    return [str(binary), "--cleanup", "--proxy-mode=iptables"]


# ----- CoreDNS ------------------------------------------------------------------------------------------
def corefile(kubeconfig: Path, ready_port: int) -> str:
    """The cluster DNS: names under the cluster's domain (and reverse lookups of cluster addresses) from
    the API, through the `kubernetes` plugin.

    There is deliberately no `forward` plugin and no other zone: a name outside the cluster is never
    sent to a resolver off this machine. CoreDNS answers REFUSED for a zone it does not serve, and the
    `kubernetes` plugin NXDOMAIN for an unknown name in its zones (no `fallthrough`)."""
    return f"""\
{CLUSTER_DOMAIN}:{DNS_PORT} in-addr.arpa:{DNS_PORT} ip6.arpa:{DNS_PORT} {{
    bind {CLUSTER_DNS_IP}
    errors
    ready {LOOPBACK}:{ready_port}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods disabled
    }}
    cache 30
    loadbalance
}}
"""


def coredns_command(binary: Path, corefile_path: Path) -> list[str]:
    return [str(binary), "-conf", str(corefile_path)]


DNS_SERVICE = "kube-dns"
DNS_NAMESPACE = "kube-system"
# Marks the EndpointSlice as ours, so that no Kubernetes controller takes it over or deletes it.
ENDPOINTSLICE_MANAGER = "agentkube-devenv"
_DNS_PORTS = (("dns", "UDP"), ("dns-tcp", "TCP"))


def dns_objects() -> list[dict[str, Any]]:
    """The `kube-dns` Service at the cluster DNS address, without a selector (CoreDNS is a host process,
    not a pod), and the EndpointSlice that points it at the address CoreDNS listens on: the ClusterIP
    itself, which the bridge holds (`localnode.create_bridge`).

    Why not the node's address: kube-proxy would DNAT queries to it, and a NetworkPolicy that lets a pod
    reach DNS by selecting `k8s-app: kube-dns` pods (the operator's sandbox policy does) can match no host
    process, so kube-router would drop every query. Traffic to the Services' range is what kube-router
    lets through, and with the ClusterIP as its own endpoint the destination stays in that range."""
    labels = {"k8s-app": DNS_SERVICE, "kubernetes.io/name": "CoreDNS"}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": DNS_SERVICE, "namespace": DNS_NAMESPACE, "labels": labels},
        "spec": {
            "clusterIP": CLUSTER_DNS_IP,
            "ports": [{"name": name, "port": DNS_PORT, "targetPort": DNS_PORT, "protocol": protocol}
                      for name, protocol in _DNS_PORTS],
        },
    }
    slice_ = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{DNS_SERVICE}-host",
            "namespace": DNS_NAMESPACE,
            "labels": {**labels, "kubernetes.io/service-name": DNS_SERVICE,
                       "endpointslice.kubernetes.io/managed-by": ENDPOINTSLICE_MANAGER},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [CLUSTER_DNS_IP], "conditions": {"ready": True}, "nodeName": NODE_NAME}],
        "ports": [{"name": name, "port": DNS_PORT, "protocol": protocol} for name, protocol in _DNS_PORTS],
    }
    return [service, slice_]


def coredns_rbac(user: str) -> list[dict[str, Any]]:
    """What CoreDNS's `kubernetes` plugin reads (with `pods disabled`), and nothing more: it lists and
    watches Services, EndpointSlices and Namespaces. kube-proxy needs no binding of ours: Kubernetes'
    bootstrap policy binds `system:node-proxier` to the user `system:kube-proxy`."""
    return _cluster_role_and_binding("agentkube:coredns", user, [
        {"apiGroups": [""], "resources": ["services", "namespaces"], "verbs": ["list", "watch"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
    ])


# ----- NetworkPolicy: kube-router's network policy controller alone -------------------------------------
# Its first sync makes this chain (jumped to from FORWARD): from then on, policies are enforced.
KUBE_ROUTER_READY_CHAIN = "KUBE-ROUTER-FORWARD"
# The ipsets it keeps pods' and policies' addresses in; they outlive it, and go after the chains that
# reference them.
KUBE_ROUTER_IPSET_PREFIXES = ("KUBE-SRC-", "KUBE-DST-", "inet6:KUBE-SRC-", "inet6:KUBE-DST-")


def kube_router_command(binary: Path, kubeconfig: Path, service_cidr: str) -> list[str]:
    return [
        str(binary),
        f"--kubeconfig={kubeconfig}",
        f"--hostname-override={NODE_NAME}",
        # Only the network policy controller: routes, BGP and Services are the bridge's and kube-proxy's.
        "--run-firewall=true",
        "--run-router=false",
        "--run-service-proxy=false",
        "--enable-cni=false",
        "--enable-ipv6=false",
        f"--service-cluster-ip-range={service_cidr}",
        # Both would listen on every address, the machine's uplink included: off. Readiness is its chain.
        "--health-port=0",
        "--metrics-port=0",
        "--v=1",
    ]


def kube_router_rbac(user: str) -> list[dict[str, Any]]:
    """Read-only: the network policy controller waits for informers on all of these before it syncs (it
    watches Services and endpoints even with the service proxy off), and reads its own Node."""
    return _cluster_role_and_binding("agentkube:kube-router", user, [
        {"apiGroups": [""], "resources": ["pods", "namespaces", "services", "endpoints"], "verbs": ["list", "watch"]},
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
        {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["list", "watch"]},
    ])


def node_ipsets(names: list[str]) -> list[str]:
    """Of the machine's ipsets (`ipset list -n`), kube-router's."""
    return [name for name in names if name.startswith(KUBE_ROUTER_IPSET_PREFIXES)]


def _cluster_role_and_binding(name: str, user: str, rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name},
         "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]},
    ]
