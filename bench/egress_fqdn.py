"""Cost of domain egress rules: a tool call that resolves 10 allowed names through the node agent's DNS
answering and connects to each, against the same call allowed the same 10 addresses as CIDR rules (which
connects without resolving), in one run, rounds alternating. Also the egress program's own run time per
packet in each case (kernel.bpf_stats_enabled, switched on for the run and restored).

Nothing leaves the machine: a network namespace behind a veth pair holds the 10 "public" hosts
(203.0.113.20-29, TEST-NET) with a TCP greeter and the DNS zone the agent forwards to. Writes
bench/results/egress_fqdn.{json,md}.

    .venv/bin/python bench/egress_fqdn.py [--rounds 15]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from nodeagent_common import machine, summary, write_results  # noqa: E402

NAMES = [f"host{i}.bench.test" for i in range(10)]
ADDRESSES = [f"203.0.113.{20 + i}" for i in range(10)]
TAG = str(os.getpid() % 100000)
NETNS, VETH_HOST, VETH_NS = f"ak-bench-{TAG}", f"akbn{TAG}h", f"akbn{TAG}n"
HOST_SIDE, NS_SIDE, ZONE_DNS = "10.252.0.1", "10.252.0.2", "10.252.0.53"
DNS = f"169.254.54.{2 + os.getpid() % 250}"
PORT = 8080

SERVERS = textwrap.dedent("""
    import socket, sys, threading, time
    from dnslib import RR
    from dnslib.server import BaseResolver, DNSLogger, DNSServer
    records = RR.fromZone(sys.argv[1])
    class Zone(BaseResolver):
        def resolve(self, request, handler):
            reply = request.reply()
            reply.rr += [rr for rr in records if str(rr.rname).lower() == str(request.q.qname).lower()]
            return reply
    DNSServer(Zone(), address="%s", port=53, logger=DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data")).start_thread()
    def greet():
        sock = socket.socket(); sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", %d)); sock.listen(64)
        while True:
            conn, _ = sock.accept()
            with conn:
                conn.sendall(b"x")
    threading.Thread(target=greet, daemon=True).start()
    print("ready", flush=True)
    time.sleep(float(sys.argv[2]))
""") % (ZONE_DNS, PORT)

# The tool call: resolve (or not) and connect to each destination; prints its own elapsed seconds.
CALL = textwrap.dedent("""
    import json, socket, sys, time
    from dnslib import DNSRecord
    dns, port, mode, targets = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
    start = time.perf_counter()
    for target in targets:
        if mode == "fqdn":
            answer = DNSRecord.parse(DNSRecord.question(target).send(dns, 53, timeout=3))
            target = str(answer.rr[0].rdata)
        with socket.create_connection((target, port), timeout=3) as s:
            assert s.recv(1) == b"x"
    print(time.perf_counter() - start)
""")


def sh(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True)


def bpftool(*args):
    return json.loads(sh("bpftool", "-j", *args).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    from agentkube.ebpf.cgroups import detect_layout
    from agentkube.ebpf.local import LocalNodeAgent
    from agentkube.ebpf.unixhttp import request

    zone = "\n".join(f"{name}. 60 A {address}" for name, address in zip(NAMES, ADDRESSES))
    tools = {"default": {"network": {"egress": "none"}}, "profiles": {
        "fqdn": {"network": {"egress": "explicit", "allow": [{"fqdn": n, "port": PORT} for n in NAMES]}},
        "cidr": {"network": {"egress": "explicit", "allow": [{"cidr": f"{a}/32", "port": PORT} for a in ADDRESSES]}}}}
    inside = ("ip", "netns", "exec", NETNS)
    server = None
    stats_before = Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip()
    wall = {"fqdn": [], "cidr": []}
    inner = {"fqdn": [], "cidr": []}
    program = {"fqdn": [], "cidr": []}
    try:
        sh("ip", "netns", "add", NETNS)
        sh("ip", "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS, "netns", NETNS)
        sh("ip", "addr", "add", f"{HOST_SIDE}/24", "dev", VETH_HOST)
        sh("ip", "link", "set", VETH_HOST, "up")
        for address in (NS_SIDE, ZONE_DNS):
            sh(*inside, "ip", "addr", "add", f"{address}/24", "dev", VETH_NS)
        for address in ADDRESSES:
            sh(*inside, "ip", "addr", "add", f"{address}/32", "dev", "lo")
            sh("ip", "route", "add", f"{address}/32", "via", NS_SIDE)
        sh(*inside, "ip", "link", "set", "lo", "up")
        sh(*inside, "ip", "link", "set", VETH_NS, "up")
        sh(*inside, "ip", "route", "add", "default", "via", HOST_SIDE)
        server = subprocess.Popen([*inside, sys.executable, "-c", SERVERS, zone, "900"], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)
        assert server.stdout.readline().strip() == "ready"
        with LocalNodeAgent(agent_args=["--dns-address", DNS, "--upstream-dns", ZONE_DNS]) as agent:
            sandbox = agent.sandbox("bench-fqdn", tools=json.dumps(tools))
            cgroup = request(agent.socket, "GET", "/v1/sandboxes/default/bench-fqdn")["cgroup"]
            unified = detect_layout().unified.mount / cgroup.lstrip("/")
            program_id = next(p["id"] for p in bpftool("cgroup", "show", str(unified)) if p["name"] == "egress")
            Path("/proc/sys/kernel/bpf_stats_enabled").write_text("1")
            for round_number in range(args.rounds + 1):  # round 0 warms up (imports, caches) and is dropped
                order = ["fqdn", "cidr"] if round_number % 2 else ["cidr", "fqdn"]
                for mode in order:
                    targets = NAMES if mode == "fqdn" else ADDRESSES
                    before = bpftool("prog", "show", "id", str(program_id))
                    start = time.perf_counter()
                    result = sandbox.client.run([sys.executable, "-c", CALL, DNS, str(PORT), mode, json.dumps(targets)],
                                                profile=mode, timeout=60)
                    elapsed = time.perf_counter() - start
                    after = bpftool("prog", "show", "id", str(program_id))
                    assert result.exit_code == 0 and result.usage.connections_blocked == 0, result.stderr
                    if round_number == 0:
                        continue
                    wall[mode].append(elapsed)
                    inner[mode].append(float(result.stdout))
                    runs = after.get("run_cnt", 0) - before.get("run_cnt", 0)
                    ns = after.get("run_time_ns", 0) - before.get("run_time_ns", 0)
                    program[mode].append({"packets": runs, "ns_per_packet": ns / runs if runs else 0.0})
    finally:
        Path("/proc/sys/kernel/bpf_stats_enabled").write_text(stats_before)
        if server is not None:
            server.kill()
            server.wait()
        for address in ADDRESSES:
            sh("ip", "route", "del", f"{address}/32", check=False)
        sh("ip", "link", "del", VETH_HOST, check=False)
        sh("ip", "netns", "del", NETNS, check=False)

    medians = {mode: {"call_wall_seconds": statistics.median(wall[mode]),
                      "inside_call_seconds": statistics.median(inner[mode]),
                      "packets_per_call": statistics.median(p["packets"] for p in program[mode]),
                      "ns_per_packet": statistics.median(p["ns_per_packet"] for p in program[mode])}
               for mode in wall}
    ratios = {key: medians["fqdn"][key] / medians["cidr"][key] for key in medians["fqdn"]}
    result = {"machine": machine(), "rounds": args.rounds, "names": len(NAMES), "medians": medians,
              "fqdn_over_cidr": ratios, "wall": {m: summary(v) for m, v in wall.items()},
              "inside": {m: summary(v) for m, v in inner.items()}}
    rows = [[mode, f"{m['call_wall_seconds'] * 1e3:.1f}", f"{m['inside_call_seconds'] * 1e3:.2f}",
             f"{m['packets_per_call']:.0f}", f"{m['ns_per_packet']:.0f}"] for mode, m in medians.items()]
    rows.append(["fqdn / cidr", f"{ratios['call_wall_seconds']:.2f}×", f"{ratios['inside_call_seconds']:.2f}×",
                 f"{ratios['packets_per_call']:.2f}×", f"{ratios['ns_per_packet']:.2f}×"])
    write_results("egress_fqdn", result,
                  f"Domain rules vs CIDR rules: a call reaching 10 destinations ({args.rounds} rounds, medians)",
                  ["rules", "call wall ms (SDK)", "inside the call ms (resolve + connect ×10)",
                   "egress program runs per call", "ns per packet"], rows,
                  "fqdn: each destination is resolved through the node agent's DNS answering (which forwards to the "
                  "zone and writes the address into the call's map before answering), then connected; cidr: the "
                  "same 10 addresses as /32 rules, connected directly.")


if __name__ == "__main__":
    main()
