"""Where a tool call's time goes: `/bin/true` run N times through the node agent, with a timestamp around
each stage, on both sides — the runtime (spawn, placement round trip, release to exit, finish round trip)
and the agent (each step of placing and of finishing a call). The agent runs in this process (its API
server in a thread) so that its steps can be wrapped with timers; the runtime is a worker process inside
the sandbox, as in tool_call_overhead.py.

Three ways into the same runtime take turns in blocks of 50 calls (so that this machine's noise falls on
all three alike):
  direct  the runtime's call path itself (`run_call` in the worker, no server in front of it);
  socket  the SDK (`agentkube.client.Sandbox`, this process) → the runtime's unix socket (HTTP, JSON answer);
  port    HTTP/1.1 with a bearer token → the runtime's TCP port (chunked NDJSON), as the gateway calls it.
The difference between a path's whole call and `direct` is what its transport costs; the runtime's HTTP
stages (worker side) split it further. The port's check that a peer is not the pod itself is switched off
here (loopback is all this benchmark has); everything else on that path, the token check included, runs.

Stages that do not exist on the path being measured are left out, so the same script measures the path
before and after a change. Prints and writes bench/results/NAME.{json,md} (medians in µs).

    .venv/bin/python bench/tool_call_stages.py [--calls 1000] [--paths direct,socket,port]
"""

from __future__ import annotations

import argparse
import functools
import http.client
import importlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from nodeagent_common import SandboxWorker, machine, main_or_worker, serve_worker, write_results  # noqa: E402

TOOL = ["/bin/true"]
INTENT = {"memory": "64Mi", "pids": 64, "network": {"egress": "none"}, "timeout": "30s"}

# (module, owner attribute or None for a module-level function, attribute, stage name), on each side.
AGENT_STAGES = [
    ("agentkube.ebpf.unixhttp", "_Handler", "_dispatch", "agent: HTTP request handled (total)"),
    ("agentkube.ebpf.agent", "NodeAgent", "place_call", "agent: place (total)"),
    ("agentkube.ebpf.agent", "NodeAgent", "start_call", "agent: start pooled call (total)"),
    ("agentkube.ebpf.agent", "NodeAgent", "require_runtime", "agent: authorize caller"),
    ("agentkube.ebpf.agent", None, "host_pid", "agent: find the child's host pid"),
    ("agentkube.ebpf.agent", None, "resolve_limits", "agent: resolve limits (contract)"),
    ("agentkube.ebpf.cgroups", "Cgroup", "create", "agent: mkdir call cgroup"),
    ("agentkube.ebpf.cgroups", "Cgroup", "apply", "agent: write limits"),
    ("agentkube.ebpf.agent", "NodeAgent", "_save_call", "agent: write-ahead record"),
    ("agentkube.ebpf.agent", "NodeAgent", "_write_record", "agent: write-ahead record"),
    ("agentkube.ebpf.bpf", "Programs", "track", "agent: BPF map entries"),
    ("agentkube.ebpf.pressure", "PressureWatcher", "watch", "agent: memory.high watch"),
    ("agentkube.ebpf.cgroups", "Cgroup", "add_process", "agent: move the process"),
    ("agentkube.ebpf.agent", "NodeAgent", "finalize", "agent: finish (total)"),
    ("agentkube.ebpf.agent", "NodeAgent", "finish_call_answer_first", "agent: finish until answered"),
    ("agentkube.ebpf.cgroups", "Cgroup", "kill", "agent: cgroup.kill"),
    ("agentkube.ebpf.cgroups", "Cgroup", "wait_empty", "agent: wait until empty"),
    ("agentkube.ebpf.cgroups", "Cgroup", "counters", "agent: read counters"),
    ("agentkube.ebpf.cgroups", "OpenCounters", "counters", "agent: read counters"),
    ("agentkube.ebpf.agent", "NodeAgent", "_await_exit_event", "agent: wait for the exit event"),
    ("agentkube.ebpf.bpf", "Programs", "set_policy", "agent: BPF egress policy of the call"),
    ("agentkube.ebpf.bpf", "Programs", "consume_events", "agent: read the call's events"),
    ("agentkube.ebpf.bpf", "Programs", "untrack", "agent: BPF map read+delete"),
    ("agentkube.ebpf.bpf", "Programs", "stats", "agent: BPF map read"),
    ("agentkube.ebpf.agent", "NodeAgent", "_append_audit", "agent: audit log append"),
    ("agentkube.ebpf.agent", "NodeAgent", "fill_pool", "agent: pool refill (off the call's path)"),
]
RUNTIME_STAGES = [
    ("os", None, "posix_spawn", "runtime: posix_spawn"),
    ("agentkube.ebpf.spawn", None, "spawn", "runtime: posix_spawn"),
    ("agentkube.ebpf.runtime", None, "_agent_call", "runtime: round trips to the agent (place/start + finish)"),
    ("agentkube.ebpf.runtime", "WarmPool", "take", "runtime: take a waiting held process"),
    ("agentkube.ebpf.runtime", None, "_write_all", "runtime: release (write the command)"),
    ("agentkube.ebpf.runtime", "_Pump", "until_exit", "runtime: release → first process exits"),
    ("agentkube.ebpf.runtime", None, "_spawn_held", "runtime: spawn the held child"),
    ("agentkube.ebpf.runtime", None, "_place", "runtime: placement round trip"),
    ("agentkube.ebpf.runtime", None, "_release_and_wait", "runtime: release → first process exits"),
    ("agentkube.ebpf.runtime", None, "_finish", "runtime: finish round trip"),
    ("agentkube.ebpf.runtime", None, "run_call", "runtime: run_call (total)"),
    ("agentkube.ebpf.runtime", None, "inside_a_call", "runtime: is the peer inside a call"),
    ("agentkube.ebpf.unixhttp", "_Handler", "_dispatch", "runtime socket: HTTP request handled (total)"),
    ("agentkube.ebpf.unixhttp", "_Handler", "_respond", "runtime socket: serialize + send the answer"),
    ("agentkube.ebpf.runtime_port", "_Handler", "_dispatch", "runtime port: HTTP request handled (total)"),
    ("agentkube.ebpf.runtime_port", "_Handler", "_allowed", "runtime port: peer + token check"),
    ("agentkube.ebpf.runtime_port", "_Handler", "_body", "runtime port: read + validate the body"),
    ("agentkube.ebpf.runtime_port", "_Handler", "_run", "runtime port: the call, streamed (total)"),
]
PATHS = ("direct", "socket", "port")
TOKEN = "bench-runtime-token"

_totals: dict[str, int] = defaultdict(int)
_lock = threading.Lock()


def instrument(stages) -> list[str]:
    """Wrap each stage that exists with a timer adding to its per-call total; returns the stages found."""
    found = []
    for module_name, owner_name, attribute, label in stages:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:  # a module an older version of the code does not have
            continue
        owner = getattr(module, owner_name, None) if owner_name else module  # None: a class an older version lacks
        original = getattr(owner, attribute, None)
        if original is None:
            continue

        def timed(*args, __original=original, __label=label, **kwargs):
            started = time.perf_counter_ns()
            try:
                return __original(*args, **kwargs)
            finally:
                with _lock:
                    _totals[__label] += time.perf_counter_ns() - started

        setattr(owner, attribute, functools.wraps(original)(timed))
        if owner_name is None:  # a function imported by name elsewhere: wrap those references too
            for other in list(sys.modules.values()):
                name = getattr(other, "__name__", "")
                if name.startswith("agentkube") and other is not module and getattr(other, attribute, None) is original:
                    setattr(other, attribute, getattr(owner, attribute))
        found.append(label)
    return found


def take() -> dict[str, int]:
    with _lock:
        snapshot = dict(_totals)
        _totals.clear()
    return snapshot


def worker(agent_socket: str, name: str) -> None:
    instrument(RUNTIME_STAGES)
    from agentkube.contract import token_verifier
    from agentkube.ebpf import runtime_port
    from agentkube.ebpf.held import held_binary
    from agentkube.ebpf.models import RunRequest, SandboxRef
    from agentkube.ebpf.runtime import SandboxRuntime, WarmPool, favor_latency, run_call

    favor_latency()  # as the runtime does

    ref = SandboxRef(name=name)
    request = RunRequest(argv=TOOL, intent=INTENT)
    program = held_binary()
    pool = WarmPool(Path(agent_socket), ref, program) if program and os.environ.get("AGENTKUBE_BENCH_POOL", "1") == "1" else None
    # The runtime's two servers, as `agentkube sandbox-runtime` runs them, sharing the one pool.
    scratch = Path(tempfile.mkdtemp(prefix="agentkube-stages-runtime-"))
    runtime = SandboxRuntime(ref, Path(agent_socket), scratch / "runtime.sock", pool_size=0)
    runtime.pool = pool
    runtime.server.start()
    runtime_port.from_inside_the_pod = lambda peer, local: False  # loopback only here (module doc)
    port = runtime_port.RuntimePortServer(ref, Path(agent_socket), token_verifier(TOKEN), 0, "127.0.0.1", pool=pool)
    port.start()

    def handle(command):
        if command.get("endpoints"):
            return {"socket": str(runtime.server.path), "port": port.server_address[1]}
        if command.get("take"):
            return {"totals": take()}
        per_call = []
        for _ in range(command["calls"]):
            take()
            started = time.perf_counter_ns()
            result = run_call(Path(agent_socket), ref, request, pool)
            total = time.perf_counter_ns() - started
            assert result.exit_code == 0, result
            per_call.append({**take(), "runtime: whole call": total})
        return {"per_call": per_call}

    serve_worker(handle)


class PortClient:
    """The gateway's leg: POST /v1/run with the runtime token on a kept-alive connection, the chunked NDJSON
    answer read to its last event (http.client: the stream is read as the gateway reads it, whole)."""

    def __init__(self, port: int):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.body = json.dumps({"argv": TOOL, "intent": INTENT}).encode()
        self.headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}

    def run(self) -> dict:
        self.connection.request("POST", "/v1/run", body=self.body, headers=self.headers)
        response = self.connection.getresponse()
        lines = response.read().splitlines()
        assert response.status == 200, lines
        return json.loads(lines[-1])["result"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="per path")
    parser.add_argument("--paths", default=",".join(PATHS), help="which ways in, comma-separated (module doc)")
    parser.add_argument("--name", default="tool_call_stages", help="results file name (bench/results/NAME.*)")
    args = parser.parse_args()
    paths = [p for p in args.paths.split(",") if p]
    assert set(paths) <= set(PATHS), f"--paths: choose among {PATHS}"
    instrument(AGENT_STAGES)
    from agentkube.client import Sandbox
    from agentkube.ebpf.api import NodeAgentServer

    block = 50
    whole: dict[str, list[float]] = {p: [] for p in paths}
    runtime_side: dict[str, dict[str, list[float]]] = {p: defaultdict(list) for p in paths}
    agent_side: dict[str, dict[str, list[float]]] = {p: defaultdict(list) for p in paths}
    direct_calls: list[tuple[float, dict[str, float]]] = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="agentkube-stages-") as scratch:
        socket_path = Path(scratch) / "agent.sock"
        instance = f"agentkube-stages-{os.getpid()}"
        server = NodeAgentServer(socket_path, Path(scratch) / "state", instance=instance)
        server.server.start()
        sandbox = SandboxWorker(socket_path, "bench-stages", __file__, memory="1Gi", pids=1024)
        try:
            endpoints = sandbox.ask({"endpoints": True})
            sdk = Sandbox("bench-stages", socket=endpoints["socket"])
            gateway_leg = PortClient(endpoints["port"])

            def through(path: str, client_run) -> list[dict]:
                per_call = []
                for _ in range(block):
                    started = time.perf_counter_ns()
                    result = client_run()
                    total = time.perf_counter_ns() - started
                    assert result["exit_code"] == 0, result
                    per_call.append(total)
                totals = sandbox.ask({"take": True})["totals"]  # the runtime's stages over the block
                return [{"whole": ns, **{label: value / block for label, value in totals.items() if mine(path, label)}}
                        for ns in per_call]

            def mine(path: str, label: str) -> bool:
                # A server's stage ends just after its client has the answer, so the block's last one can land in
                # the next block's totals: each path keeps only its own server's stages.
                return not label.startswith(("runtime port:", "runtime socket:")) or \
                    label.startswith({"socket": "runtime socket:", "port": "runtime port:"}.get(path, "-"))

            def run_path(path: str) -> list[dict]:
                if path == "direct":
                    return [{**{k: v for k, v in call.items() if k != "runtime: whole call" and mine(path, k)},
                             "whole": call["runtime: whole call"]} for call in sandbox.ask({"calls": block})["per_call"]]
                if path == "socket":
                    return through(path, lambda: sdk.run(TOOL, memory="64Mi", pids=64, network="none", timeout="30s").model_dump())
                return through(path, gateway_leg.run)

            for path in paths:  # warm up: imports, first connections, the pool
                run_path(path)
            take()
            for round_ in range(args.calls // block):
                order = paths[round_ % len(paths):] + paths[:round_ % len(paths)]  # each path takes each place in turn
                for path in order:
                    for call in run_path(path):
                        whole[path].append(call.pop("whole") / 1000)
                        for label, ns in call.items():
                            runtime_side[path][label].append(ns / 1000)
                        if path == "direct":  # per-call stages: kept whole, for where the slowest calls' time goes
                            direct_calls.append((whole[path][-1], {label: ns / 1000 for label, ns in call.items()}))
                    # The agent's totals over the block, per call (the agent's threads are not per call).
                    for label, ns in take().items():
                        agent_side[path][label].append(ns / 1000 / block)
        finally:
            sandbox.close()
            server.server.stop()
            server.agent.teardown()
    load_after = os.getloadavg()

    def median(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    def p99(values: list[float]) -> float:
        return sorted(values)[int(0.99 * (len(values) - 1))]

    result: dict = {"whole": {}, "stages": {}}
    rows = []
    for path in paths:
        result["whole"][path] = {"median_us": median(whole[path]), "p99_us": p99(whole[path]),
                                 "added_to_direct_median_us": median(whole[path]) - median(whole[paths[0]])}
        rows.append([f"**{path}: whole call**", *(f"{median(whole[path]):.0f}" if p == path else "" for p in paths),
                     f"p99 {p99(whole[path]):.0f}"])
    # The tail: the runtime's stages of the slowest 5% of direct calls (median over them), beside all calls'.
    slowest = sorted(direct_calls, key=lambda call: call[0])[int(0.95 * len(direct_calls)):]
    tail = {label: median([stages.get(label, 0.0) for _, stages in slowest])
            for label in dict.fromkeys(label for _, stages in slowest for label in stages)}
    result["direct_slowest_5_percent"] = {"calls": len(slowest), "whole_median_us": median([w for w, _ in slowest]),
                                          "stages_median_us": tail}
    if slowest and paths[0] == "direct":
        rows.append(["**direct: the slowest 5% of calls** (their median)", f"{median([w for w, _ in slowest]):.0f}",
                     *([""] * (len(paths) - 1)), f"{len(slowest)} calls"])
        rows += [[f"  {label} (slowest 5%)", f"{value:.0f}", *([""] * (len(paths) - 1)), ""] for label, value in tail.items()]
    labels = list(dict.fromkeys(label for path in paths for side in (runtime_side, agent_side) for label in side[path]))
    for label in labels:
        cells = []
        for path in paths:
            values = runtime_side[path].get(label) or agent_side[path].get(label) or []
            result["stages"].setdefault(label, {})[path] = {"median_us": median(values)} if values else None
            cells.append(f"{median(values):.0f}" if values else "–")
        rows.append([label, *cells, ""])
    write_results(args.name, {"machine": machine(), "calls_per_path": args.calls, "tool": TOOL, "paths": paths,
                              "load_average_before": load_before, "load_average_after": load_after, **result},
                  f"Where a tool call's time goes: `/bin/true` × {args.calls} per path, µs (median)",
                  ["stage", *(f"{p} µs" for p in paths), "note"], rows,
                  "Paths take turns in blocks of 50 calls (module doc). Whole calls are per call, timed by the caller "
                  "(direct: in the runtime's process; socket, port: in the benchmark's). Runtime stages: per call "
                  "(direct), or per-call averages over a block (socket, port). Agent stages: per-call averages over a "
                  "block (median of blocks); the agent ran in the benchmark's process (its steps wrapped with timers) "
                  "and its stages include the work of every agent thread, pool refills too. Load average "
                  f"before/after: {load_before[0]:.2f} / {load_after[0]:.2f} (other work on the machine included).")


if __name__ == "__main__":
    main_or_worker(main, worker)
