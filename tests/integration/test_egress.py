"""Egress modes on the real kernel: an escape matrix (as root, `--local`).

The test builds its own small world, and nothing leaves the machine: a network namespace behind a veth pair
holds a "cluster" host (10.250.0.10, in the agent's --pod-cidr), a "public" host (203.0.113.10, TEST-NET,
which the contract counts as public), a stand-in metadata endpoint (169.254.169.254) and a DNS zone
(10.250.0.53, the agent's --upstream-dns); the host routes them through the veth. The node's own address
is served by a listener on the host. One tool call per egress mode tries every destination and lookup;
exactly the allowed ones succeed, the others are dropped by the egress program (a UDP send fails with
EPERM, a TCP connect times out: TCP retransmits a dropped SYN) or get a refused lookup, and the call's usage
counts each of them. The servers stop by themselves."""

import ipaddress
import json
import os
import subprocess
import sys
import textwrap

import pytest

from agentkube.ebpf.egress import MIN_TTL_SECONDS
from agentkube.ebpf.local import LocalNodeAgent
from agentkube.ebpf.unixhttp import request

PY = sys.executable
TAG = f"{os.getpid() % 100000}"
NETNS = f"ak-egress-{TAG}"
VETH_HOST, VETH_NS = f"akeg{TAG}h", f"akeg{TAG}n"
POD_CIDR, SERVICE_CIDR = "10.250.0.0/24", "10.251.0.0/16"
HOST_SIDE, NS_SIDE = "10.250.0.1", "10.250.0.2"
CLUSTER_HOST, ZONE_DNS = "10.250.0.10", "10.250.0.53"
PUBLIC, PUBLIC_TTL0, METADATA = "203.0.113.10", "203.0.113.11", "169.254.169.254"
ROUTED = (PUBLIC, PUBLIC_TTL0, METADATA)
DNS = f"169.254.53.{2 + os.getpid() % 250}"  # the agent's DNS answering, on a dummy interface it makes
PORT = 8080
LIFETIME = 300  # the servers' own deadline (s)


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


def node_address() -> str:
    route = json.loads(sh("ip", "-j", "route", "show", "default").stdout)[0]
    link = json.loads(sh("ip", "-j", "addr", "show", "dev", route["dev"]).stdout)[0]
    return next(a["local"] for a in link["addr_info"] if a["family"] == "inet")


ZONE_SERVER = textwrap.dedent("""
    import socket, sys, threading, time
    from dnslib import RR, RCODE
    from dnslib.server import BaseResolver, DNSLogger, DNSServer

    zone, lifetime = sys.argv[1], float(sys.argv[2])
    records = RR.fromZone(zone)

    class Zone(BaseResolver):
        def resolve(self, request, handler):
            reply, name, seen = request.reply(), str(request.q.qname).lower(), set()
            while name not in seen:
                seen.add(name)
                found = [rr for rr in records if str(rr.rname).lower() == name]
                reply.rr += found
                cname = next((rr for rr in found if rr.rtype == 5), None)
                if cname is None:
                    break
                name = str(cname.rdata).lower()
            if not reply.rr:
                reply.header.rcode = RCODE.NXDOMAIN
            return reply

    quiet = DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data")
    for tcp in (False, True):
        DNSServer(Zone(), address="%(dns)s", port=53, tcp=tcp, logger=quiet).start_thread()

    def greet():  # a TCP greeter on every address of the namespace: says which address it was reached at
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", %(port)d))
        sock.listen(64)
        while True:
            conn, _ = sock.accept()
            with conn:
                conn.sendall(conn.getsockname()[0].encode())

    threading.Thread(target=greet, daemon=True).start()
    print("ready", flush=True)
    time.sleep(lifetime)
""") % {"dns": ZONE_DNS, "port": PORT}


@pytest.fixture(scope="module")
def world():
    assert os.geteuid() == 0, "the egress tests need root (network namespaces, cgroups and BPF)"
    node_ip = node_address()
    assert ipaddress.ip_address(node_ip) not in ipaddress.ip_network(POD_CIDR)
    zone = "\n".join([
        f"allowed.test. 60 A {PUBLIC}", f"denied.test. 60 A {PUBLIC}", "rebind.test. 60 CNAME inner.test.",
        f"inner.test. 60 A {CLUSTER_HOST}", f"meta.test. 60 A {METADATA}", f"node.test. 60 A {node_ip}",
        f"ttl0.test. 0 A {PUBLIC_TTL0}",
    ])
    server = None
    try:
        sh("ip", "netns", "add", NETNS)
        sh("ip", "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS, "netns", NETNS)
        sh("ip", "addr", "add", f"{HOST_SIDE}/24", "dev", VETH_HOST)
        sh("ip", "link", "set", VETH_HOST, "up")
        inside = ("ip", "netns", "exec", NETNS)
        for address in (NS_SIDE, CLUSTER_HOST, ZONE_DNS):
            sh(*inside, "ip", "addr", "add", f"{address}/24", "dev", VETH_NS)
        for address in ROUTED:
            sh(*inside, "ip", "addr", "add", f"{address}/32", "dev", "lo")
        sh(*inside, "ip", "link", "set", "lo", "up")
        sh(*inside, "ip", "link", "set", VETH_NS, "up")
        sh(*inside, "ip", "route", "add", "default", "via", HOST_SIDE)
        for address in ROUTED:
            sh("ip", "route", "add", f"{address}/32", "via", NS_SIDE)
        server = subprocess.Popen([*inside, PY, "-c", ZONE_SERVER, zone, str(LIFETIME)], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)
        assert server.stdout.readline().strip() == "ready"
        agent = LocalNodeAgent(agent_args=["--pod-cidr", POD_CIDR, "--service-cidr", SERVICE_CIDR, "--dns-address", DNS,
                                           "--upstream-dns", ZONE_DNS])
        with agent:
            yield {"agent": agent, "node_ip": node_ip}
    finally:
        if server is not None:
            server.kill()
            server.wait()
        for address in ROUTED:
            sh("ip", "route", "del", f"{address}/32", check=False)
        sh("ip", "link", "del", VETH_HOST, check=False)
        sh("ip", "netns", "del", NETNS, check=False)


class NodeListener:
    """A TCP greeter on the node's own address, for as long as the test module needs it (bounded)."""


@pytest.fixture(scope="module")
def node_server(world):
    import socket
    import threading

    sock = socket.socket()
    sock.bind((world["node_ip"], 0))
    sock.listen(16)
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve():
        deadline = __import__("time").monotonic() + LIFETIME
        while not stop.is_set() and __import__("time").monotonic() < deadline:
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(world["node_ip"].encode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    stop.set()
    thread.join()
    sock.close()


EXPLICIT = {"egress": "explicit", "allow": [{"fqdn": name, "port": PORT} for name in (
    "allowed.test", "rebind.test", "meta.test", "node.test", "ttl0.test")]}
TOOLS = {"default": {"network": {"egress": "none"}},
         "profiles": {"cluster": {"network": {"egress": "cluster"}}, "internet": {"network": {"egress": "internet"}},
                      "explicit": {"network": EXPLICIT}}}


@pytest.fixture(scope="module")
def sandbox(world):
    local = world["agent"].sandbox("egress-" + TAG, tools=json.dumps(TOOLS))
    yield local


# The tool call: every attempt, in order, as (what, outcome). A connection's outcome is what the server said
# (the address it was reached at), "blocked" (dropped by the egress program) or another error; a lookup's is
# its rcode and A records.
PROBE = textwrap.dedent("""
    import errno, json, socket, sys, time
    from dnslib import DNSRecord, RCODE
    dns, node_ip, node_port, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])

    def connect(host, port):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family) as s:
                s.settimeout(1.5)  # every destination answers at once here; a dropped SYN is retried until this
                s.connect((host, port))
                return s.recv(64).decode()
        except socket.timeout:
            return "blocked"
        except OSError as e:
            return "blocked" if e.errno == errno.EPERM else errno.errorcode.get(e.errno, str(e))

    def lookup(name, server=None, tcp=False):
        try:
            answer = DNSRecord.parse(DNSRecord.question(name).send(server or dns, 53, tcp=tcp, timeout=3))
            return [RCODE[answer.header.rcode], sorted(str(rr.rdata) for rr in answer.rr if rr.rtype == 1)]
        except socket.timeout:
            return "no answer"
        except OSError as e:
            return "blocked" if e.errno == errno.EPERM else errno.errorcode.get(e.errno, str(e))

    results = []
    for kind, *args in steps:
        if kind == "sleep":
            time.sleep(args[0])
            continue
        host = node_ip if args[0] == "NODE" else args[0]
        port = node_port if args[0] == "NODE" else (args[1] if len(args) > 1 else 0)
        outcome = connect(host, port) if kind == "connect" else lookup(*args)
        results.append([kind, *args, outcome])
    print(json.dumps(results))
""")


def run_probe(world, sandbox, node_port, profile, steps):
    result = sandbox.client.run([PY, "-c", PROBE, DNS, world["node_ip"], str(node_port), json.dumps(steps)],
                                profile=profile, timeout=120)
    assert result.exit_code == 0, result.stderr
    return [tuple(json.dumps(x) if isinstance(x, list) else x for x in step) for step in json.loads(result.stdout)], result


def connect(host, port=PORT):
    return ["connect", host, port]


# Every mode tries the same escapes; the mode decides which succeed.
COMMON = [connect(CLUSTER_HOST), connect("NODE"), connect(METADATA), connect(PUBLIC), connect(f"::ffff:{CLUSTER_HOST}"),
          ["lookup", "allowed.test", ZONE_DNS],  # another resolver, directly
          ["lookup", "allowed.test"], ["lookup", "denied.test"]]
OK = json.dumps(["NOERROR", [PUBLIC]])


def outcomes(results):
    return [r[-1] for r in results]


def test_none_reaches_nothing_and_its_lookups_never_leave_the_kernel(world, sandbox, node_server):
    results, call = run_probe(world, sandbox, node_server, None, COMMON)
    assert outcomes(results) == ["blocked"] * 8
    assert call.usage.connections_blocked == 6  # 5 connections and the direct lookup
    assert call.usage.dns_refused == 2  # both lookups through the node agent, dropped in the kernel


def test_cluster_reaches_the_cluster_networks_only(world, sandbox, node_server):
    results, call = run_probe(world, sandbox, node_server, "cluster", COMMON)
    assert outcomes(results) == [CLUSTER_HOST, "blocked", "blocked", "blocked", CLUSTER_HOST, OK, OK, OK]
    assert (call.usage.connections_blocked, call.usage.dns_refused) == (3, 0)


def test_internet_reaches_public_addresses_only(world, sandbox, node_server):
    results, call = run_probe(world, sandbox, node_server, "internet", COMMON)
    # The node's address here is itself in TEST-NET (public by the contract): refused as the node's.
    assert outcomes(results) == ["blocked", "blocked", "blocked", PUBLIC, "blocked", "blocked", OK, OK]
    assert (call.usage.connections_blocked, call.usage.dns_refused) == (5, 0)


def test_explicit_domains_open_exactly_what_allowed_names_resolve_to_for_their_ttl(world, sandbox, node_server):
    steps = [*COMMON[:6],
             ["lookup", "denied.test"], ["lookup", "denied.test", None, True],  # refused, over UDP and TCP
             ["lookup", "allowed.test", None, True],  # over TCP: allowed, opens the address
             connect(PUBLIC), connect(PUBLIC, PORT + 1),  # the rule's port only
             ["lookup", "rebind.test"], connect(CLUSTER_HOST),  # CNAME chain to a private address
             ["lookup", "meta.test"], connect(METADATA),
             ["lookup", "node.test"], connect("NODE"),
             ["lookup", "ttl0.test"], connect(PUBLIC_TTL0), ["sleep", MIN_TTL_SECONDS + 1], connect(PUBLIC_TTL0)]
    results, call = run_probe(world, sandbox, node_server, "explicit", steps)
    assert outcomes(results) == [
        "blocked", "blocked", "blocked", "blocked", "blocked", "blocked",  # nothing before a lookup; no other resolver
        json.dumps(["REFUSED", []]), json.dumps(["REFUSED", []]), OK, PUBLIC, "blocked",
        json.dumps(["NOERROR", [CLUSTER_HOST]]), "blocked",
        json.dumps(["NOERROR", [METADATA]]), "blocked",
        json.dumps(["NOERROR", [world["node_ip"]]]), "blocked",
        json.dumps(["NOERROR", [PUBLIC_TTL0]]), PUBLIC_TTL0, "blocked",  # TTL 0: the floor, then closed
    ]
    assert call.usage.connections_blocked == sum(o == "blocked" for o in outcomes(results))
    assert call.usage.dns_refused == 2
    # After the call, nothing it opened is left in the maps.
    pins = f"/sys/fs/bpf/{world['agent'].instance}/resolved"
    assert json.loads(sh("bpftool", "-j", "map", "dump", "pinned", pins).stdout) == []


def test_a_query_no_tool_call_sent_is_refused(world):
    from dnslib import RCODE, DNSRecord

    answer = DNSRecord.parse(DNSRecord.question("allowed.test").send(DNS, 53, timeout=3))
    assert RCODE[answer.header.rcode] == "REFUSED"


def test_refused_lookups_are_audited_and_exported(world, sandbox):
    agent = world["agent"]
    audit = [json.loads(line) for line in agent.audit_log.read_text().splitlines()]
    assert any(r["usage"]["dns_refused"] > 0 for r in audit)
    metrics = request(agent.socket, "GET", "/metrics")
    assert "agentkube_tool_call_dns_refused_total" in metrics


# A socket keeps the cgroup it was made in. A call that hands its socket to another call, then ends, leaves
# a socket whose cgroup no longer has a call's policy; the other call must not be able to send through it.
SMUGGLE_RECEIVER = textwrap.dedent("""
    import array, os, socket, sys, time
    name, go, host, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind("\\0" + name)
    server.listen(1)
    server.settimeout(30)
    conn, _ = server.accept()
    _, fds, _, _ = socket.recv_fds(conn, 1, 1)
    smuggled = socket.socket(fileno=fds[0])
    deadline = time.monotonic() + 30
    while not os.path.exists(go) and time.monotonic() < deadline:  # the sender's call has ended
        time.sleep(0.05)
    smuggled.settimeout(1.5)
    try:
        smuggled.connect((host, port))
        print(smuggled.recv(64).decode())
    except (socket.timeout, PermissionError):
        print("blocked")
""")
SMUGGLE_SENDER = textwrap.dedent("""
    import socket, sys, time
    name = sys.argv[1]
    made = socket.socket()  # made in this call's cgroup, never used here
    for _ in range(300):
        try:
            channel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            channel.connect("\\0" + name)
            break
        except (ConnectionRefusedError, FileNotFoundError):
            time.sleep(0.05)
    socket.send_fds(channel, [b"x"], [made.fileno()])
""")


def test_a_socket_handed_on_by_a_call_that_ended_reaches_nothing(world, sandbox, tmp_path):
    import threading

    name, go = f"ak-smuggle-{TAG}", tmp_path / "go"
    received: dict = {}
    receiver = threading.Thread(target=lambda: received.update(result=sandbox.client.run(
        [PY, "-c", SMUGGLE_RECEIVER, name, str(go), PUBLIC, str(PORT)], timeout=60)))
    receiver.start()
    try:
        sender = sandbox.client.run([PY, "-c", SMUGGLE_SENDER, name], timeout=60)
        assert sender.exit_code == 0, sender.stderr
    finally:
        go.touch()
        receiver.join(timeout=90)
    result = received["result"]
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == "blocked"
