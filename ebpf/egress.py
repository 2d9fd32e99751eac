"""What the egress program enforces, as pure functions: a tool call's network (`agentkube.contract.ToolNetwork`)
and the cluster's networks compiled into map entries, and the decisions of the node agent's DNS answering
(forward or refuse a query; which resolved addresses a call may then reach, until when).

No I/O here: `bpf.py` writes what these return into the maps, `dns.py` answers queries with them,
`netconfig.py` discovers the cluster's networks. The BPF-side constants (modes, map sizes, the TTL floor)
live here and reach the C program as defines, so each has one source.

How a packet from a tool call is judged (programs/nodeagent.c, `egress`):

1. the pod's loopback (127/8, ::1) passes: it never leaves the pod;
2. a DNS packet (UDP/TCP, port 53) to the node agent's DNS address: dropped for `none` (counted as a
   refused lookup); otherwise it passes and the kernel records its source (address, port, protocol) → the
   call's cgroup id, which is how the DNS answering knows which call asked;
3. the node's own addresses are refused to every mode but an explicit CIDR rule (kubelet and friends
   listen there, and a node may have a public address that `internet` would otherwise admit);
4. by mode: `none` nothing; `cluster` the pod and service CIDRs (LPM trie); `internet` everything not in
   `contract.NON_PUBLIC` (LPM trie of refused ranges); `explicit` the CIDR:port rules, then the addresses
   the DNS answering resolved for the call's allowed names, each until its TTL (new connections only: the
   packets of a TCP connection opened in time keep flowing).
"""

from __future__ import annotations

import enum
import ipaddress
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from agentkube.contract import CLUSTER_DOMAIN, MAX_ALLOW_RULES, NON_PUBLIC, EgressRule, ToolNetwork, dns_search_paths, fqdn_matches

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# ----- constants shared with the BPF program (passed to it as -D defines by bpf.py) ---------------------

MODES = {"none": 1, "cluster": 2, "internet": 3, "explicit": 4}
MAX_CALLS = 4096  # concurrent calls tracked per node agent
MAX_SANDBOX_CGROUPS = 2 * MAX_CALLS  # each sandbox's own cgroups (it and its main leaf), all sandboxes together
MAX_CLUSTER_NETWORKS = 256  # pod CIDRs (one or two per node) and service CIDRs
MAX_NODE_ADDRESSES = 256
MAX_RESOLVED = 65536  # (call, address, port) entries the DNS answering may open, all calls together
MAX_DNS_SENDERS = 16384  # in-flight DNS queries remembered (LRU: the oldest are forgotten first)
DNS_PORT = 53
# A resolved address stays reachable for max(TTL, this) seconds: a TTL of 0 would otherwise let nothing
# connect (the answer arrives, then the entry is already stale). Short, so TTL-0 rebinding tricks buy little.
MIN_TTL_SECONDS = 5
PROTOCOLS = {"tcp": 6, "udp": 17}


def bpf_defines() -> dict[str, int]:
    """Every constant the C program needs, by its C name."""
    return {
        **{f"MODE_{name.upper()}": value for name, value in MODES.items()},
        "MAX_RULES": MAX_ALLOW_RULES, "MAX_CALLS": MAX_CALLS, "MAX_SANDBOX_CGROUPS": MAX_SANDBOX_CGROUPS,
        "MAX_CLUSTER_NETWORKS": MAX_CLUSTER_NETWORKS,
        "MAX_NODE_ADDRESSES": MAX_NODE_ADDRESSES, "MAX_RESOLVED": MAX_RESOLVED, "MAX_DNS_SENDERS": MAX_DNS_SENDERS,
        "IPPROTO_TCP_": PROTOCOLS["tcp"], "IPPROTO_UDP_": PROTOCOLS["udp"],
    }


# ----- addresses as the program loads them --------------------------------------------------------------

def words(packed: bytes) -> tuple[int, int, int, int]:
    """16 bytes in packet order → four u32 whose in-memory bytes are those bytes (what the program loads);
    an IPv4 address fills the first word."""
    padded = packed.ljust(16, b"\0")
    return tuple(int.from_bytes(padded[i:i + 4], sys.byteorder) for i in range(0, 16, 4))  # type: ignore[return-value]


def address_of(family: int, address_words: Sequence[int]) -> IPAddress:
    data = b"".join(w.to_bytes(4, sys.byteorder) for w in address_words)
    return ipaddress.IPv4Address(data[:4]) if family == 4 else ipaddress.IPv6Address(data)


@dataclass(frozen=True)
class RuleEntry:
    addr: tuple[int, int, int, int]
    mask: tuple[int, int, int, int]
    port: int  # 0: any
    family: int


@dataclass(frozen=True)
class PolicyEntry:
    mode: int
    rules: tuple[RuleEntry, ...] = ()


def rule_entry(rule: EgressRule) -> RuleEntry:
    network = rule.network
    return RuleEntry(words(network.network_address.packed), words(network.netmask.packed), rule.port or 0,
                     network.version)


def compile_policy(network: ToolNetwork) -> PolicyEntry:
    """The call's entry in `policies`. Domain rules compile to nothing here: their addresses are added
    when the call resolves them (`resolved_entries`)."""
    if network.egress == "explicit":
        return PolicyEntry(MODES["explicit"], tuple(rule_entry(r) for r in network.allow if r.cidr is not None))
    return PolicyEntry(MODES[network.egress])


@dataclass(frozen=True)
class LpmKey:
    """A key of the program's LPM tries: the family byte, then the address; the prefix counts the family
    byte, so IPv4 and IPv6 ranges share a trie without one ever matching the other."""

    prefixlen: int
    data: bytes  # 20 bytes: family, 16 address bytes, 3 zero bytes (the C struct's padding)


def lpm_key(network: IPNetwork) -> LpmKey:
    return LpmKey(8 + network.prefixlen, (bytes([network.version]) + network.network_address.packed).ljust(20, b"\0"))


def lpm_entries(networks: Iterable[IPNetwork]) -> set[LpmKey]:
    return {lpm_key(n) for n in networks}


def refused_to_internet() -> set[LpmKey]:
    return lpm_entries(NON_PUBLIC)


def node_address_entries(addresses: Iterable[IPAddress]) -> set[LpmKey]:
    return lpm_entries(ipaddress.ip_network(a) for a in addresses)


@dataclass(frozen=True)
class Sender:
    """Who sent a DNS query, as the kernel recorded it: source address, port and protocol."""

    address: IPAddress
    port: int
    protocol: int


# ----- the cluster's networks ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ClusterNetworks:
    pod_cidrs: tuple[IPNetwork, ...] = ()
    service_cidrs: tuple[IPNetwork, ...] = ()
    domain: str = CLUSTER_DOMAIN

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        return self.pod_cidrs + self.service_cidrs

    def contains(self, address: IPAddress) -> bool:
        return any(address.version == n.version and address in n for n in self.networks)


def networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(sorted({ipaddress.ip_network(c, strict=False) for c in cidrs}, key=lambda n: (n.version, n)))


def pod_cidrs_of(nodes: Iterable[dict]) -> tuple[IPNetwork, ...]:
    """Every Node's `spec.podCIDRs` (and the older single `spec.podCIDR`)."""
    cidrs: list[str] = []
    for node in nodes:
        spec = node.get("spec") or {}
        cidrs += spec.get("podCIDRs") or ([spec["podCIDR"]] if spec.get("podCIDR") else [])
    return networks(cidrs)


def service_cidrs_of(service_cidr_objects: Iterable[dict]) -> tuple[IPNetwork, ...]:
    """`networking.k8s.io/v1` ServiceCIDR objects' `spec.cidrs` (the API server's --service-cluster-ip-range
    shows up as the `kubernetes` ServiceCIDR)."""
    return networks(c for obj in service_cidr_objects for c in (obj.get("spec") or {}).get("cidrs") or ())


def cluster_dns_of(service: dict) -> str | None:
    """The cluster DNS Service's ClusterIP (kube-dns in kube-system), the upstream of the DNS answering."""
    spec = service.get("spec") or {}
    ip = spec.get("clusterIP")
    return ip if ip and ip != "None" else None


# ----- DNS: which queries are forwarded, which answers open which addresses ---------------------------

class Decision(enum.Enum):
    FORWARD = "forward"  # to the cluster DNS; the answer goes back unchanged
    REFUSE = "refuse"  # REFUSED, counted as a refused lookup
    SEARCH_MISS = "search-miss"  # NXDOMAIN, not counted: a resolver walking its search list towards an allowed name
    NOT_FOUND = "not-found"  # NXDOMAIN, counted: a cluster name not allowed (NXDOMAIN lets the search list go on)


def normalize(name: str) -> str:
    return name.rstrip(".").lower()


def search_suffixes(namespace: str, domain: str = CLUSTER_DOMAIN) -> tuple[str, ...]:
    """The search paths a sandbox pod's resolver appends (the operator writes them into its dnsConfig)."""
    return tuple(dns_search_paths(namespace, domain))


def under(name: str, domain: str) -> bool:
    return name == domain or name.endswith("." + domain)


def allowed_rules(network: ToolNetwork, name: str) -> list[EgressRule]:
    """The domain rules of `network` that admit `name` (normalized)."""
    return [r for r in network.allow if r.fqdn is not None and fqdn_matches(r.fqdn, name)]


def decide(network: ToolNetwork, qname: str, suffixes: Sequence[str] = (), domain: str = CLUSTER_DOMAIN) -> Decision:
    """What the DNS answering does with one query of a call whose network is `network`.

    `none` never gets here (the kernel drops its DNS packets), but is refused all the same. `cluster` and
    `internet` are forwarded: the kernel judges the addresses they then connect to. `explicit` is forwarded
    only for a name one of its domain rules admits. Resolvers try a short name with the search paths
    first and stop at the first REFUSED (glibc does), so a name under the cluster domain is answered
    NXDOMAIN instead; when stripping a search path leaves an allowed name, that is the resolver's walk and
    not counted."""
    name = normalize(qname)
    if network.egress in ("cluster", "internet"):
        return Decision.FORWARD
    if network.egress != "explicit":
        return Decision.REFUSE
    if allowed_rules(network, name):
        return Decision.FORWARD
    if not under(name, domain):
        return Decision.REFUSE
    for suffix in suffixes:
        if name.endswith("." + suffix) and allowed_rules(network, name[: -len(suffix) - 1]):
            return Decision.SEARCH_MISS
    return Decision.NOT_FOUND


@dataclass(frozen=True)
class Record:
    """One resource record of an answer section, as the DNS answering hands it over (dnslib parsed it)."""

    name: str
    kind: str  # "A", "AAAA", "CNAME", ...
    ttl: int
    value: str  # the address, or the CNAME's target


def chain_addresses(qname: str, answers: Sequence[Record]) -> list[tuple[IPAddress, int]]:
    """The addresses `qname` resolves to in an answer section, each with the smallest TTL along its CNAME
    chain: only records on the chain from the queried name count (an answer may carry others)."""
    name, ttl, seen = normalize(qname), None, set()
    while name not in seen:
        seen.add(name)
        cname = next((r for r in answers if r.kind == "CNAME" and normalize(r.name) == name), None)
        if cname is None:
            break
        ttl = cname.ttl if ttl is None else min(ttl, cname.ttl)
        name = normalize(cname.value)
    found = []
    for record in answers:
        if record.kind in ("A", "AAAA") and normalize(record.name) == name:
            try:
                found.append((ipaddress.ip_address(record.value), record.ttl if ttl is None else min(ttl, record.ttl)))
            except ValueError:
                continue
    return found


def reachable(address: IPAddress, qname: str, cluster: ClusterNetworks) -> bool:
    """Whether an address an allowed name resolved to may be opened: a public address, or an address of the
    cluster's networks for a name under the cluster domain. Never link-local (metadata), the node's
    loopback or another private range: whoever controls an allowed domain's zone could otherwise point it
    (directly or through a CNAME, at TTL 0) at anything inside (DNS rebinding)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return False  # no IPv4 address sneaks in dressed as IPv6
    network = ipaddress.ip_network(address)
    if all(not network.overlaps(n) for n in NON_PUBLIC if n.version == network.version):
        return True
    return under(normalize(qname), cluster.domain) and cluster.contains(address)


@dataclass(frozen=True)
class ResolvedEntry:
    cgroup_id: int
    address: IPAddress
    port: int  # 0: any
    expires_ns: int  # CLOCK_MONOTONIC, as bpf_ktime_get_ns() counts


def expiry_ns(now_ns: int, ttl: int) -> int:
    return now_ns + max(int(ttl), MIN_TTL_SECONDS) * 1_000_000_000


def resolved_entries(cgroup_id: int, network: ToolNetwork, qname: str, answers: Sequence[Record],
                     cluster: ClusterNetworks, now_ns: int) -> list[ResolvedEntry]:
    """The (call, address, port) entries an answer for an allowed name opens: every reachable address on
    the name's chain, for each port the matching rules allow, until its TTL (with the floor)."""
    rules = allowed_rules(network, normalize(qname))
    ports = sorted({r.port or 0 for r in rules})
    if 0 in ports:
        ports = [0]
    return [ResolvedEntry(cgroup_id, address, port, expiry_ns(now_ns, ttl))
            for address, ttl in chain_addresses(qname, answers) if reachable(address, qname, cluster)
            for port in ports]


def is_expired(entry_expires_ns: int, now_ns: int) -> bool:
    """The program's test for a new connection (a TCP SYN or a UDP datagram), mirrored for tests."""
    return now_ns >= entry_expires_ns
