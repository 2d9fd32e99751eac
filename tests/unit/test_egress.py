"""Egress compilation and the DNS answering's decisions (ebpf/egress.py): pure, no kernel."""

import ipaddress
import sys

import pytest

from agentkube.contract import NON_PUBLIC, tool_network
from agentkube.ebpf import egress
from agentkube.ebpf.egress import ClusterNetworks, Decision, Record

CLUSTER = ClusterNetworks(egress.networks(["10.244.0.0/16"]), egress.networks(["10.96.0.0/12"]))
SUFFIXES = egress.search_suffixes("team")
ip = ipaddress.ip_address


def as_bytes(words) -> bytes:
    return b"".join(w.to_bytes(4, sys.byteorder) for w in words)


def test_each_mode_compiles_to_its_entry():
    for mode in ("none", "cluster", "internet"):
        assert egress.compile_policy(tool_network(mode)) == egress.PolicyEntry(egress.MODES[mode])
    entry = egress.compile_policy(tool_network(["10.1.0.0/16:443", "[::1]:80", "pypi.org:443"]))
    assert entry.mode == egress.MODES["explicit"]
    (v4, v6) = entry.rules  # the domain rule is opened by lookups, not compiled
    assert (v4.port, v4.family, v6.port, v6.family) == (443, 4, 80, 6)
    # Words hold the address bytes in packet order, as the program loads them from the packet.
    assert as_bytes(v4.addr)[:4] == bytes([10, 1, 0, 0]) and as_bytes(v4.mask)[:4] == bytes([255, 255, 0, 0])
    assert as_bytes(v6.addr) == bytes(15) + b"\x01"
    assert egress.compile_policy(tool_network(["203.0.113.0/24:*"])).rules[0].port == 0


def test_lpm_keys_keep_families_apart():
    v4 = egress.lpm_key(ipaddress.ip_network("10.0.0.0/8"))
    assert (v4.prefixlen, v4.data[:2], len(v4.data)) == (16, bytes([4, 10]), 20)
    mapped = egress.lpm_key(ipaddress.ip_network("::ffff:0:0/96"))
    assert (mapped.prefixlen, mapped.data[0]) == (8 + 96, 6)
    assert len(egress.refused_to_internet()) == len(NON_PUBLIC)
    assert egress.bpf_defines()["MODE_EXPLICIT"] == egress.MODES["explicit"]


def test_cluster_networks_come_from_nodes_and_service_cidrs():
    nodes = [{"spec": {"podCIDRs": ["10.244.0.0/24", "fd00:10:244::/64"]}}, {"spec": {"podCIDR": "10.244.1.0/24"}},
             {"spec": {}}]
    assert [str(n) for n in egress.pod_cidrs_of(nodes)] == ["10.244.0.0/24", "10.244.1.0/24", "fd00:10:244::/64"]
    assert [str(n) for n in egress.service_cidrs_of([{"spec": {"cidrs": ["10.96.0.0/12"]}}, {}])] == ["10.96.0.0/12"]
    assert egress.cluster_dns_of({"spec": {"clusterIP": "10.96.0.10"}}) == "10.96.0.10"
    assert egress.cluster_dns_of({"spec": {"clusterIP": "None"}}) is None


@pytest.mark.parametrize("pattern,name,matches", [
    ("pypi.org", "pypi.org", True), ("pypi.org", "files.pypi.org", False), ("*.example.com", "a.example.com", True),
    ("*.example.com", "a.b.example.com", True), ("*.example.com", "example.com", False),
    ("*.example.com", "badexample.com", False),
])
def test_fqdn_matching(pattern, name, matches):
    network = tool_network([f"{pattern}:443"])
    assert (egress.decide(network, name + ".") is Decision.FORWARD) == matches


def test_dns_decisions_per_mode():
    assert egress.decide(tool_network("none"), "pypi.org") is Decision.REFUSE
    assert egress.decide(tool_network("cluster"), "anything.example") is Decision.FORWARD
    assert egress.decide(tool_network("internet"), "kubernetes.default.svc.cluster.local") is Decision.FORWARD
    explicit = tool_network(["PyPI.org:443", "10.0.0.0/8:*"])
    assert egress.decide(explicit, "PYPI.ORG.") is Decision.FORWARD  # names compare case-insensitively
    assert egress.decide(explicit, "evil.example") is Decision.REFUSE
    # The resolver's search-list walk towards an allowed name: NXDOMAIN, not counted ...
    assert egress.decide(explicit, "pypi.org.team.svc.cluster.local", SUFFIXES) is Decision.SEARCH_MISS
    # ... a cluster name that is not allowed: NXDOMAIN (so the walk goes on), counted.
    assert egress.decide(explicit, "db.team.svc.cluster.local", SUFFIXES) is Decision.NOT_FOUND
    assert egress.decide(tool_network(["10.0.0.0/8:*"]), "pypi.org") is Decision.REFUSE  # CIDR rules name nothing


def test_chain_addresses_follow_cnames_from_the_queried_name_only():
    answers = [Record("www.pypi.org.", "CNAME", 300, "cdn.fastly.net."), Record("cdn.fastly.net.", "A", 60, "151.101.0.223"),
               Record("cdn.fastly.net.", "AAAA", 600, "2a04:4e42::223"), Record("other.net.", "A", 60, "198.51.100.9")]
    assert egress.chain_addresses("www.pypi.org", answers) == [(ip("151.101.0.223"), 60), (ip("2a04:4e42::223"), 300)]
    loop = [Record("a.", "CNAME", 5, "b."), Record("b.", "CNAME", 5, "a.")]
    assert egress.chain_addresses("a.", loop) == []


def test_only_reachable_addresses_are_opened():
    for blocked in ("169.254.169.254", "127.0.0.1", "10.0.0.5", "192.168.1.1", "::1", "fe80::1", "::ffff:10.0.0.5",
                    "::ffff:8.8.8.8", "fd00::1"):
        assert not egress.reachable(ip(blocked), "evil.example.com", CLUSTER), blocked
    assert egress.reachable(ip("203.0.113.10"), "evil.example.com", CLUSTER)  # TEST-NET stands in for public
    # A cluster address only for a name under the cluster domain (no rebinding a public name inside).
    assert egress.reachable(ip("10.96.0.20"), "api.team.svc.cluster.local", CLUSTER)
    assert not egress.reachable(ip("10.96.0.20"), "api.example.com", CLUSTER)
    assert not egress.reachable(ip("10.1.0.1"), "x.team.svc.cluster.local", CLUSTER)  # outside the cluster's ranges


def test_resolved_entries_carry_ports_and_ttl_with_a_floor():
    network = tool_network(["pypi.org:443", "pypi.org:80", "*.pypi.org:*"])
    answers = [Record("pypi.org.", "A", 0, "203.0.113.10"), Record("pypi.org.", "A", 120, "10.0.0.1")]
    entries = egress.resolved_entries(7, network, "pypi.org.", answers, CLUSTER, now_ns=10**9)
    # TTL 0 still gets the floor; the private address is not opened; two ports, one entry each.
    assert [(e.cgroup_id, str(e.address), e.port, e.expires_ns) for e in entries] == [
        (7, "203.0.113.10", 80, 10**9 + egress.MIN_TTL_SECONDS * 10**9),
        (7, "203.0.113.10", 443, 10**9 + egress.MIN_TTL_SECONDS * 10**9)]
    any_port = egress.resolved_entries(7, network, "files.pypi.org", [Record("files.pypi.org", "A", 30, "203.0.113.11")],
                                       CLUSTER, now_ns=0)
    assert [(e.port, e.expires_ns) for e in any_port] == [(0, 30 * 10**9)]
    assert egress.resolved_entries(7, network, "evil.example", answers, CLUSTER, now_ns=0) == []


def test_ttl_expiry():
    expires = egress.expiry_ns(now_ns=1000, ttl=60)
    assert not egress.is_expired(expires, 1000 + 59 * 10**9)
    assert egress.is_expired(expires, 1000 + 60 * 10**9)
    assert egress.expiry_ns(0, -5) == egress.MIN_TTL_SECONDS * 10**9


def test_sandbox_pods_resolve_through_the_node_agent():
    from agentkube.contract import NODE_DNS_ADDRESS
    from agentkube.operator import api, sandbox

    spec = api.AgentSandboxSpec.model_validate({"template": {"image": "sandbox:dev"}})
    body = {"apiVersion": "agentkube.dev/v1alpha1", "kind": "AgentSandbox", "metadata": {"name": "s1", "namespace": "team", "uid": "u"}}
    pod = sandbox.pod_manifest(body, spec)["spec"]
    assert pod["dnsPolicy"] == "None"
    assert pod["dnsConfig"]["nameservers"] == [NODE_DNS_ADDRESS]
    assert pod["dnsConfig"]["searches"] == list(egress.search_suffixes("team"))


def test_egress_flags():
    from agentkube.ebpf.netconfig import EgressConfig

    local = EgressConfig.from_flags(local=True, pod_cidrs=["10.250.0.0/24"], service_cidrs=[], dns_address=None,
                                    upstream_dns=None, cluster_domain="cluster.local", kubeconfig=None, instance="x")
    assert local.dns_address is None and not local.kubernetes  # --local answers DNS only when told where
    with pytest.raises(ValueError, match="upstream"):
        EgressConfig.from_flags(local=True, pod_cidrs=[], service_cidrs=[], dns_address="169.254.53.2",
                                upstream_dns=None, cluster_domain="cluster.local", kubeconfig=None, instance="x")
    node = EgressConfig.from_flags(local=False, pod_cidrs=[], service_cidrs=[], dns_address=None,
                                   upstream_dns="10.96.0.10:5353", cluster_domain="cluster.local", kubeconfig=None,
                                   instance="agentkube")
    assert (str(node.dns_address), node.upstream_dns, node.kubernetes) == ("169.254.20.10", ("10.96.0.10", 5353), True)
