"""Cost of the egress program: TCP throughput over loopback from a tool call, side by side in one run,
with the node agent's `cgroup_skb` egress program

  (1) not attached (a sandbox whose attachment was removed for the benchmark),
  (2) attached, call allowed everything (no policy entry: one map lookup per packet),
  (3) attached, call limited to loopback (the packet is parsed and checked against the policy).

The sender is a tool call that streams a fixed number of bytes to a receiver on 127.0.0.1 and times it.
Throughput on a shared 2-CPU machine swings by ±30% between runs, more than the program can cost; so the
kernel's own BPF run-time statistics (kernel.bpf_stats_enabled, switched on for the run and restored) also
give the program's time per packet and its share of the sender's wall time, which noise does not move.
Writes bench/results/egress_cost.{json,md}.

    .venv/bin/python bench/egress_cost.py [--rounds 5] [--mib 1024]
"""

import argparse
import json
import os
import subprocess
import socket
import statistics
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from nodeagent_common import SandboxWorker, machine, main_or_worker, serve_worker, write_results  # noqa: E402

GOAL_LOSS = 0.05

SENDER = r"""
import socket, sys, time
port, total = int(sys.argv[1]), int(sys.argv[2])
chunk = b"x" * (1 << 20)
s = socket.create_connection(("127.0.0.1", port))
start = time.perf_counter()
sent = 0
while sent < total:
    s.sendall(chunk)
    sent += len(chunk)
s.shutdown(socket.SHUT_WR)
s.recv(1)  # the receiver closes once it has read everything
print(sent / (time.perf_counter() - start))
"""


def worker(agent_socket: str, name: str) -> None:
    from agentkube.ebpf.models import RunRequest, SandboxRef
    from agentkube.ebpf.runtime import run_call

    def handle(command):
        request = RunRequest(argv=[sys.executable, "-c", SENDER, str(command["port"]), str(command["bytes"])],
                             intent={"network": command["network"], "cpu": "1", "memory": "256Mi", "timeout": "120s"})
        result = run_call(Path(agent_socket), SandboxRef(name=name), request)
        if result.exit_code != 0:
            raise RuntimeError(result.stderr)
        return {"bytes_per_second": float(result.stdout), "blocked": result.usage.connections_blocked}

    serve_worker(handle)


def bpftool(*args: str):
    return json.loads(subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, check=True).stdout)


def program_stats(program_id: int) -> tuple[int, int]:
    """(runs, nanoseconds) the kernel has counted for a program since statistics were switched on."""
    shown = bpftool("prog", "show", "id", str(program_id))
    return shown.get("run_cnt", 0), shown.get("run_time_ns", 0)


class Receiver:
    """Reads connections to the end on 127.0.0.1; stops by itself once closed or after its lifetime."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(600)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        buffer = bytearray(1 << 20)
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                while conn.recv_into(buffer):
                    pass

    def close(self):
        self.sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mib", type=int, default=1024)
    args = parser.parse_args()
    from agentkube.ebpf.agent import NodeAgent
    from agentkube.ebpf.api import routes
    from agentkube.ebpf.unixhttp import UnixHttpServer

    workdir = Path(tempfile.mkdtemp(prefix="agentkube-bench-"))
    agent = NodeAgent(workdir / "state", instance=f"agentkube-bench-{os.getpid()}")
    server = UnixHttpServer(workdir / "agent.sock", routes(agent))
    server.start()
    receiver = Receiver()
    configs = {"not_attached": ("bench-plain", {"egress": "explicit", "allow": [{"cidr": "0.0.0.0/0"}]}), "attached_all": ("bench-egress", {"egress": "explicit", "allow": [{"cidr": "0.0.0.0/0"}]}),
               "attached_loopback": ("bench-egress", {"egress": "none"})}
    throughput = {name: [] for name in configs}
    program = {name: [] for name in configs}
    workers = {}
    stats_before = Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip()
    try:
        for name in ("bench-plain", "bench-egress"):
            workers[name] = SandboxWorker(server.path, name, __file__, memory="1Gi")
        plain = agent.sandboxes["default/bench-plain"].cgroup
        agent.programs.detach_egress(plain.unified_dir, plain.id)
        egress = agent.sandboxes["default/bench-egress"].cgroup
        program_id = next(p["id"] for p in bpftool("cgroup", "show", str(egress.unified_dir)) if p["name"] == "egress")
        Path("/proc/sys/kernel/bpf_stats_enabled").write_text("1")
        names = list(configs)
        for round_number in range(args.rounds):
            # Each round starts with a different configuration, so that whatever favours the first or
            # last run of a round (CPU frequency, caches, the other tenants) falls on all of them alike.
            shift = round_number % len(names)
            for config in names[shift:] + names[:shift]:
                sandbox, network = configs[config]
                before = program_stats(program_id)
                answer = workers[sandbox].ask({"port": receiver.port, "bytes": args.mib << 20, "network": network})
                after = program_stats(program_id)
                assert answer["blocked"] == 0
                throughput[config].append(answer["bytes_per_second"])
                seconds = (args.mib << 20) / answer["bytes_per_second"]
                runs, nanoseconds = after[0] - before[0], after[1] - before[1]
                program[config].append({"packets": runs, "ns_per_packet": nanoseconds / runs if runs else 0.0,
                                        "share_of_wall_time": nanoseconds / 1e9 / seconds})
    finally:
        Path("/proc/sys/kernel/bpf_stats_enabled").write_text(stats_before)
        for running in workers.values():
            running.close()
        receiver.close()
        server.stop()
        agent.teardown()

    medians = {name: statistics.median(values) for name, values in throughput.items()}
    program_cost = {name: {"packets_per_run": statistics.median(r["packets"] for r in runs),
                           "ns_per_packet": statistics.median(r["ns_per_packet"] for r in runs),
                           "share_of_wall_time": statistics.median(r["share_of_wall_time"] for r in runs)}
                    for name, runs in program.items()}
    base = medians["not_attached"]
    result = {
        "machine": machine(), "rounds": args.rounds, "mib_per_run": args.mib,
        "bytes_per_second": throughput, "median_bytes_per_second": medians,
        "loss_vs_not_attached": {name: 1 - m / base for name, m in medians.items()},
        "program_cost": program_cost,
        "goal": f"under {GOAL_LOSS:.0%} lower throughput with the program attached",
    }
    rows = [[name.replace("_", " "), f"{m / 2**30:.2f}", f"{m / base - 1:+.1%}",
             f"{program_cost[name]['packets_per_run']:.0f}", f"{program_cost[name]['ns_per_packet']:.0f}",
             f"{program_cost[name]['share_of_wall_time']:.3%}"] for name, m in medians.items()]
    write_results("egress_cost", result,
                  f"Cost of the egress program: loopback TCP throughput from a tool call ({args.rounds} rounds × {args.mib} MiB)",
                  ["egress program", "median GiB/s", "vs. not attached", "program runs per run", "ns per packet",
                   "program's share of wall time"], rows, f"Goal: {result['goal']}.")


if __name__ == "__main__":
    main_or_worker(main, worker)
