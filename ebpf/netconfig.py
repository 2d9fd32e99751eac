"""The edges of egress enforcement: where the node agent learns the cluster's networks (flags, or the
Kubernetes API: Nodes' `spec.podCIDRs`, `networking.k8s.io/v1` ServiceCIDRs, the `kube-dns` Service),
the node's own addresses (its interfaces), and the dummy interface that carries the DNS answering's
node-local address. What to make of them is decided in `egress.py`; this module only fetches and applies,
and refreshes every REFRESH_SECONDS (pod CIDRs come and go with nodes)."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from agentkube.contract import CLUSTER_DOMAIN, NODE_DNS_ADDRESS
from agentkube.ebpf import egress
from agentkube.ebpf.egress import ClusterNetworks, IPAddress, IPNetwork

log = logging.getLogger(__name__)
REFRESH_SECONDS = 30.0
KUBERNETES_DNS_INTERFACE = "agentkube-dns"


@dataclass(frozen=True)
class EgressConfig:
    """How the node agent enforces egress beyond the per-call maps (flags of `node-agent run`)."""

    pod_cidrs: tuple[IPNetwork, ...] = ()  # given: override discovery
    service_cidrs: tuple[IPNetwork, ...] = ()
    dns_address: IPAddress | None = None  # where the DNS answering listens; None: no DNS answering
    dns_port: int = egress.DNS_PORT
    upstream_dns: tuple[str, int] | None = None  # None: the kube-dns Service's ClusterIP (Kubernetes mode)
    cluster_domain: str = CLUSTER_DOMAIN
    kubeconfig: str | None = None
    kubernetes: bool = False  # discover what the flags leave out from the API
    interface: str = KUBERNETES_DNS_INTERFACE

    @classmethod
    def from_flags(cls, *, local: bool, pod_cidrs: list[str], service_cidrs: list[str], dns_address: str | None,
                   upstream_dns: str | None, cluster_domain: str, kubeconfig: str | None, instance: str) -> EgressConfig:
        """`--local` answers DNS only when given an address (and needs an upstream then); Kubernetes mode
        answers on the contract's NODE_DNS_ADDRESS unless told otherwise."""
        address = dns_address or (None if local else NODE_DNS_ADDRESS)
        if local and address and not upstream_dns:
            raise ValueError("--local with --dns-address needs --upstream-dns HOST[:PORT]")
        upstream = None
        if upstream_dns:
            host, _, port = upstream_dns.rpartition(":") if upstream_dns.count(":") == 1 else (upstream_dns, "", "")
            upstream = (host, int(port or egress.DNS_PORT))
        # Interface names are at most 15 characters; a --local agent's is per instance (tests run several).
        interface = KUBERNETES_DNS_INTERFACE if not local else ("akdns-" + hashlib.sha256(instance.encode()).hexdigest()[:9])
        return cls(pod_cidrs=egress.networks(pod_cidrs), service_cidrs=egress.networks(service_cidrs),
                   dns_address=ipaddress.ip_address(address) if address else None, upstream_dns=upstream,
                   cluster_domain=cluster_domain, kubeconfig=kubeconfig, kubernetes=not local, interface=interface)


def local_addresses() -> set[IPAddress]:
    """Every address on this network namespace's interfaces, loopback's aside (the program admits the
    pod's loopback before it looks at node addresses)."""
    shown = json.loads(subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, check=True).stdout)
    found = set()
    for link in shown:
        for info in link.get("addr_info", ()):
            address = ipaddress.ip_address(info["local"])
            if not address.is_loopback:
                found.add(address)
    return found


def ensure_address(interface: str, address: IPAddress) -> str:
    """Put `address` on a dummy interface of that name (made if missing), as NodeLocal DNSCache does; on a
    kernel without the dummy driver, on the loopback interface (local delivery works the same). Returns the
    interface that carries it."""
    links = json.loads(subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout)
    if not any(link["ifname"] == interface for link in links):
        made = subprocess.run(["ip", "link", "add", interface, "type", "dummy"], capture_output=True, text=True)
        if made.returncode != 0:
            log.info("no dummy interface (%s): the DNS address goes on lo", made.stderr.strip())
            interface = "lo"
    subprocess.run(["ip", "addr", "replace", f"{address}/{address.max_prefixlen}", "dev", interface], check=True,
                   capture_output=True)
    subprocess.run(["ip", "link", "set", interface, "up"], check=True, capture_output=True)
    return interface


def remove_address(interface: str, address: IPAddress) -> None:
    if interface == "lo":
        subprocess.run(["ip", "addr", "del", f"{address}/{address.max_prefixlen}", "dev", "lo"], capture_output=True)
    else:
        subprocess.run(["ip", "link", "del", interface], capture_output=True)


@dataclass
class Discovered:
    cluster: ClusterNetworks = field(default_factory=ClusterNetworks)
    upstream: tuple[str, int] | None = None


class NetworkWatcher:
    """Keeps the program's tries (cluster networks, node addresses) and the DNS upstream current."""

    def __init__(self, config: EgressConfig, apply_cluster: Callable[[tuple[IPNetwork, ...]], None],
                 apply_node: Callable[[set[IPAddress]], None]):
        self.config = config
        self._apply_cluster = apply_cluster
        self._apply_node = apply_node
        self.current = Discovered(ClusterNetworks(config.pod_cidrs, config.service_cidrs, config.cluster_domain),
                                  config.upstream_dns)
        self._stop = threading.Event()
        self._api = None
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="network-watcher", daemon=True)
        self._thread.start()

    def _kubernetes(self):
        if self._api is None:
            from kubernetes import client, config

            if self.config.kubeconfig:
                config.load_kube_config(self.config.kubeconfig)
            else:
                config.load_incluster_config()
            self._api = client.ApiClient()
        return self._api

    def _discover(self) -> Discovered:
        """What the API says, for what the flags leave out. A failing request keeps what was known."""
        config, known = self.config, self.current
        pods, services, upstream = config.pod_cidrs, config.service_cidrs, config.upstream_dns
        if config.kubernetes:
            from kubernetes import client

            api = self._kubernetes()
            try:
                if not pods:
                    nodes = client.CoreV1Api(api).list_node()
                    pods = egress.pod_cidrs_of(api.sanitize_for_serialization(n) for n in nodes.items)
                if not services:
                    objects = client.CustomObjectsApi(api).list_cluster_custom_object(
                        "networking.k8s.io", "v1", "servicecidrs")
                    services = egress.service_cidrs_of(objects.get("items", ()))
                if not upstream:
                    service = client.CoreV1Api(api).read_namespaced_service("kube-dns", "kube-system")
                    ip = egress.cluster_dns_of(api.sanitize_for_serialization(service))
                    upstream = (ip, egress.DNS_PORT) if ip else None
            except Exception as error:  # the API is down or forbids: keep enforcing what was known
                log.warning("discovering the cluster's networks: %s", error)
                return known
        return Discovered(ClusterNetworks(tuple(pods), tuple(services), config.cluster_domain), upstream)

    def refresh(self) -> None:
        self.current = self._discover()
        self._apply_cluster(self.current.cluster.networks)
        self._apply_node(local_addresses())

    def _run(self) -> None:
        while not self._stop.wait(REFRESH_SECONDS):
            try:
                self.refresh()
            except Exception as error:
                log.warning("refreshing the cluster's networks: %s", error)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class EgressServices:
    """Everything egress needs beside the per-call maps, started and stopped together: the network watcher
    and, when configured, the DNS answering on its node-local address."""

    def __init__(self, config: EgressConfig, programs, call_network):
        from agentkube.ebpf.dns import DnsAnswerer

        self.config = config
        self.programs = programs
        self.watcher = NetworkWatcher(config, programs.set_cluster_networks, programs.set_node_addresses)
        self.dns: DnsAnswerer | None = None
        self._interface: str | None = None
        if config.dns_address is not None:
            self._interface = ensure_address(config.interface, config.dns_address)
            self.dns = DnsAnswerer(config.dns_address, config.dns_port, programs, call_network,
                                   lambda: self.watcher.current.cluster, lambda: self.watcher.current.upstream)
            programs.set_dns_address(config.dns_address, config.dns_port)
        else:
            programs.set_dns_address(None)

    def close(self) -> None:
        self.watcher.close()
        if self.dns is not None:
            self.dns.close()
            # The address stays only while something answers on it; the next agent process adds it again.
            remove_address(self._interface, self.config.dns_address)
