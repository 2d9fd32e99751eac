"""The node's cluster networking decisions: kube-proxy's flags, the Corefile, the kube-dns objects, the
identities and RBAC of both, and the firewall that keeps pods' packets on this machine."""

import ipaddress
from pathlib import Path

from agentkube.devenv import config, network, node
from agentkube.devenv.config import Layout, Ports
from agentkube.devenv.versions import COREDNS, GO_PROGRAMS, KUBE_ROUTER, program_path

LAYOUT = Layout(Path("/state"))
PORTS = Ports(etcd_client=1, etcd_peer=2, apiserver=3, controller_manager=4, prometheus=5, scheduler=6, kubelet=7,
              kubelet_healthz=8, kube_proxy_healthz=9, kube_proxy_metrics=10, coredns_ready=11)


def _flags(argv: list[str]) -> dict[str, str]:
    return dict(arg.removeprefix("--").partition("=")[::2] for arg in argv[1:] if arg.startswith("--"))


def test_cluster_addresses_fit_together():
    services = ipaddress.ip_network(node.SERVICE_CIDR)
    assert ipaddress.ip_address(node.CLUSTER_DNS_IP) in services
    assert ipaddress.ip_address(config.KUBERNETES_SERVICE_IP) in services
    assert not services.overlaps(ipaddress.ip_network(node.POD_SUBNET))
    assert config.SERVICE_CIDR == node.SERVICE_CIDR  # one source of truth, re-exported


def test_the_controller_manager_gives_the_one_node_the_whole_pod_subnet():
    flags = _flags(config.controller_manager_command(Path("kcm"), LAYOUT, PORTS))
    assert flags["allocate-node-cidrs"] == "true" and flags["cluster-cidr"] == node.POD_SUBNET
    assert flags["node-cidr-mask-size"] == node.POD_SUBNET.split("/")[1]


def test_kube_proxy_runs_iptables_mode_as_its_own_identity_and_leaves_host_settings_alone():
    flags = _flags(config.kube_proxy_command(Path("kube-proxy"), LAYOUT, PORTS))
    assert flags["kubeconfig"] == str(LAYOUT.client_kubeconfig("kube-proxy-client"))
    assert config.CLIENT_CERTIFICATES["kube-proxy-client"] == config.KUBE_PROXY
    assert config.KUBE_PROXY.user == "system:kube-proxy" and not config.KUBE_PROXY.groups
    assert flags["proxy-mode"] == "iptables" and flags["hostname-override"] == node.NODE_NAME
    assert flags["cluster-cidr"] == node.POD_SUBNET
    assert flags["nodeport-addresses"] == f"{node.NODE_IP}/32", "NodePorts never on the uplink"
    assert flags["iptables-localhost-nodeports"] == "false"
    assert flags["healthz-bind-address"] == "127.0.0.1:9" and flags["metrics-bind-address"] == "127.0.0.1:10"
    for conntrack in ("conntrack-max-per-core", "conntrack-tcp-timeout-established", "conntrack-tcp-timeout-close-wait"):
        assert flags[conntrack] == "0"
    assert config.kube_proxy_health_url(PORTS) == "http://127.0.0.1:9/healthz"
    assert "--cleanup" in network.kube_proxy_cleanup_command(Path("kube-proxy"))


def _server_blocks(corefile: str) -> list[str]:
    return [line.removesuffix("{").strip() for line in corefile.splitlines() if line and not line[0].isspace()
            and line.rstrip().endswith("{")]


def test_coredns_serves_only_the_cluster_and_forwards_nothing_off_this_machine():
    corefile = config.corefile(LAYOUT, PORTS)
    (zones,) = _server_blocks(corefile)
    assert zones.split() == ["cluster.local:53", "in-addr.arpa:53", "ip6.arpa:53"], "no `.` zone"
    assert "forward" not in corefile and "proxy" not in corefile and "fallthrough" not in corefile
    assert f"bind {node.CLUSTER_DNS_IP}\n" in corefile
    assert f"kubeconfig {LAYOUT.client_kubeconfig('coredns-client')}\n" in corefile
    assert "ready 127.0.0.1:11\n" in corefile and config.coredns_health_url(PORTS) == "http://127.0.0.1:11/ready"
    assert config.coredns_command(Path("coredns"), LAYOUT, PORTS)[1:] == ["-conf", str(LAYOUT.node.corefile)]


def test_coredns_identity_may_only_list_and_watch_what_its_kubernetes_plugin_reads():
    role, binding = network.coredns_rbac(config.COREDNS.user)
    assert config.CLIENT_CERTIFICATES["coredns-client"] == config.COREDNS and not config.COREDNS.groups
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    assert granted == {(group, resource, verb) for group, resource in
                       (("", "services"), ("", "namespaces"), ("discovery.k8s.io", "endpointslices"))
                       for verb in ("list", "watch")}
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": config.COREDNS.user}]


def test_kube_dns_service_points_at_the_host_address_coredns_binds():
    service, endpoints = network.dns_objects()
    assert (service["metadata"]["namespace"], service["metadata"]["name"]) == ("kube-system", "kube-dns")
    assert service["spec"]["clusterIP"] == node.CLUSTER_DNS_IP and "selector" not in service["spec"]
    assert endpoints["metadata"]["labels"]["kubernetes.io/service-name"] == "kube-dns"
    assert endpoints["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] != "endpointslice-controller.k8s.io"
    assert endpoints["endpoints"][0]["addresses"] == [node.CLUSTER_DNS_IP], "its own ClusterIP: kube-router lets it through"
    service_ports = {(p["name"], p["protocol"], p["port"]) for p in service["spec"]["ports"]}
    assert service_ports == {(p["name"], p["protocol"], p["port"]) for p in endpoints["ports"]}
    assert service_ports == {("dns", "UDP", 53), ("dns-tcp", "TCP", 53)}


def test_firewall_lets_pod_traffic_reach_only_the_bridge_and_the_tests_links_and_drops_the_rest():
    jump = network.firewall_jump()
    assert jump[:2] == ["-i", node.BRIDGE] and jump[-2:] == ["-j", network.FIREWALL_CHAIN]
    assert "-s" not in jump, "matched by interface, so a forged source address is caught too"
    # mangle FORWARD runs before filter FORWARD, where kube-proxy's ACCEPTs are.
    assert (network.FIREWALL_TABLE, network.FIREWALL_HOOK) == ("mangle", "FORWARD")
    rules = network.firewall_rules()
    assert rules[-1] == ["-j", "DROP"], "the last rule drops whatever was not let through"
    allowed = [rule[rule.index("-o") + 1] for rule in rules[:-1]]
    assert allowed == [node.BRIDGE, f"{node.TEST_LINK_PREFIX}+"]
    assert all(rule[-2:] == ["-j", "RETURN"] for rule in rules[:-1])
    assert not any("MASQUERADE" in rule or "ACCEPT" in rule for rule in rules)
    assert len(network.FIREWALL_CHAIN) <= 28  # iptables' limit on chain names


def test_host_sysctls_are_forwarding_and_bridged_iptables_only():
    assert network.HOST_SYSCTLS == {"net.ipv4.ip_forward": "1", "net.bridge.bridge-nf-call-iptables": "1"}
    assert network.sysctl_path("net.ipv4.ip_forward") == Path("/proc/sys/net/ipv4/ip_forward")


def test_coredns_is_built_from_its_pinned_module_into_a_directory_per_version():
    assert GO_PROGRAMS["coredns"] == COREDNS and COREDNS.pin == "github.com/coredns/coredns@v1.15.0"
    assert program_path("coredns").parent.name == "coredns-v1.15.0"


def test_the_node_starts_kube_proxy_and_coredns_after_the_kubelet():
    from agentkube.devenv.cluster import NETWORK_POLICY, NODE
    names = [component.name for component in NODE]
    assert names.index("kubelet") < names.index("kube-proxy") < names.index("coredns")
    assert NETWORK_POLICY.name == "kube-router" and NETWORK_POLICY.health_probe is not None


def test_kube_router_runs_only_its_network_policy_controller_and_listens_nowhere():
    flags = _flags(config.kube_router_command(Path("kube-router"), LAYOUT, PORTS))
    assert flags["kubeconfig"] == str(LAYOUT.client_kubeconfig("kube-router-client"))
    assert (flags["run-firewall"], flags["run-router"], flags["run-service-proxy"]) == ("true", "false", "false")
    assert flags["enable-cni"] == "false" and flags["hostname-override"] == node.NODE_NAME
    assert flags["service-cluster-ip-range"] == node.SERVICE_CIDR
    # Its health and metrics servers would bind every address, the uplink's too.
    assert flags["health-port"] == "0" and flags["metrics-port"] == "0"
    assert GO_PROGRAMS["kube-router"] == KUBE_ROUTER and KUBE_ROUTER.package == "./cmd/kube-router"
    assert program_path("kube-router").parent.name == f"kube-router-{KUBE_ROUTER.version}"


def test_kube_router_identity_only_reads():
    role, binding = network.kube_router_rbac(config.KUBE_ROUTER.user)
    assert config.CLIENT_CERTIFICATES["kube-router-client"] == config.KUBE_ROUTER and not config.KUBE_ROUTER.groups
    verbs = {verb for rule in role["rules"] for verb in rule["verbs"]}
    assert verbs == {"get", "list", "watch"}
    resources = {resource for rule in role["rules"] for resource in rule["resources"]}
    assert resources == {"pods", "namespaces", "services", "endpoints", "nodes", "endpointslices", "networkpolicies"}
    assert binding["subjects"][0]["name"] == config.KUBE_ROUTER.user


def test_dev_down_destroys_kube_routers_ipsets_only():
    names = ["KUBE-SRC-ABC", "KUBE-DST-DEF", "inet6:KUBE-DST-X", "TMP-1", "docker-set", "KUBE-OTHER"]
    assert network.node_ipsets(names) == ["KUBE-SRC-ABC", "KUBE-DST-DEF", "inet6:KUBE-DST-X"]


IPTABLES_LISTING = """\
-P INPUT ACCEPT
-P FORWARD ACCEPT
-N KUBE-FIREWALL
-N KUBE-SERVICES
-N DOCKER
-N AGENTKUBE-NODE-FORWARD
-A INPUT -j KUBE-FIREWALL
-A FORWARD -i agentkube0 -m comment --comment "agentkube dev node: pods stay on this machine" -j AGENTKUBE-NODE-FORWARD
-A FORWARD -j DOCKER
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -j DROP
-A KUBE-SERVICES -j KUBE-FIREWALL
"""


def test_dev_down_removes_the_node_chains_and_their_jumps_and_nothing_else():
    steps = network.node_chain_removal(IPTABLES_LISTING)
    assert steps == [
        ["-D", "INPUT", "-j", "KUBE-FIREWALL"],
        ["-D", "FORWARD", "-i", "agentkube0", "-m", "comment", "--comment",
         "agentkube dev node: pods stay on this machine", "-j", "AGENTKUBE-NODE-FORWARD"],
        ["-F", "KUBE-FIREWALL"], ["-F", "KUBE-SERVICES"], ["-F", "AGENTKUBE-NODE-FORWARD"],
        ["-X", "KUBE-FIREWALL"], ["-X", "KUBE-SERVICES"], ["-X", "AGENTKUBE-NODE-FORWARD"],
    ]
    assert ["-D", "FORWARD", *network.firewall_jump()] in steps
    assert network.node_chain_removal("-P INPUT ACCEPT\n-N DOCKER\n-A FORWARD -j DOCKER\n") == []
