"""Where a tool call's time goes: `/bin/true` run N times through the node agent, with a timestamp around
each stage, on both sides — the runtime (spawn, placement round trip, release to exit, finish round trip)
and the agent (each step of placing and of finishing a call). The agent runs in this process (its API
server in a thread) so that its steps can be wrapped with timers; the runtime is a worker process inside
the sandbox, as in tool_call_overhead.py.

Stages that do not exist on the path being measured are left out, so the same script measures the path
before and after a change. Prints and writes bench/results/tool_call_stages.{json,md} (medians in µs).

    .venv/bin/python bench/tool_call_stages.py [--calls 1000]
"""

from __future__ import annotations

import argparse
import functools
import importlib
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
    ("agentkube.ebpf.bpf", "Programs", "track", "agent: BPF map entries"),
    ("agentkube.ebpf.pressure", "PressureWatcher", "watch", "agent: memory.high watch"),
    ("agentkube.ebpf.cgroups", "Cgroup", "add_process", "agent: move the process"),
    ("agentkube.ebpf.agent", "NodeAgent", "finalize", "agent: finish (total)"),
    ("agentkube.ebpf.cgroups", "Cgroup", "kill", "agent: cgroup.kill"),
    ("agentkube.ebpf.cgroups", "Cgroup", "wait_empty", "agent: wait until empty"),
    ("agentkube.ebpf.cgroups", "Cgroup", "counters", "agent: read counters"),
    ("agentkube.ebpf.agent", "NodeAgent", "_await_exit_event", "agent: wait for the exit event"),
    ("agentkube.ebpf.bpf", "Programs", "set_policy", "agent: BPF egress policy of the call"),
    ("agentkube.ebpf.bpf", "Programs", "consume_events", "agent: read the call's events"),
    ("agentkube.ebpf.bpf", "Programs", "untrack", "agent: BPF map read+delete"),
    ("agentkube.ebpf.agent", "NodeAgent", "_append_audit", "agent: audit log append"),
    ("agentkube.ebpf.agent", "NodeAgent", "fill_pool", "agent: pool refill (off the call's path)"),
]
RUNTIME_STAGES = [
    ("os", None, "posix_spawn", "runtime: posix_spawn"),
    ("agentkube.ebpf.runtime", None, "_agent_call", "runtime: round trips to the agent (place/start + finish)"),
    ("agentkube.ebpf.runtime", "WarmPool", "take", "runtime: take a waiting held process"),
    ("agentkube.ebpf.runtime", None, "_write_all", "runtime: release (write the command)"),
    ("agentkube.ebpf.runtime", "_Pump", "until_exit", "runtime: release → first process exits"),
    ("agentkube.ebpf.runtime", None, "_spawn_held", "runtime: spawn the held child"),
    ("agentkube.ebpf.runtime", None, "_place", "runtime: placement round trip"),
    ("agentkube.ebpf.runtime", None, "_release_and_wait", "runtime: release → first process exits"),
    ("agentkube.ebpf.runtime", None, "_finish", "runtime: finish round trip"),
]

_totals: dict[str, int] = defaultdict(int)
_lock = threading.Lock()


def instrument(stages) -> list[str]:
    """Wrap each stage that exists with a timer adding to its per-call total; returns the stages found."""
    found = []
    for module_name, owner_name, attribute, label in stages:
        module = importlib.import_module(module_name)
        owner = getattr(module, owner_name) if owner_name else module
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
    from agentkube.ebpf.held import held_binary
    from agentkube.ebpf.models import RunRequest, SandboxRef
    from agentkube.ebpf.runtime import WarmPool, favor_latency, run_call

    favor_latency()  # as the runtime does

    ref = SandboxRef(name=name)
    request = RunRequest(argv=TOOL, intent=INTENT)
    program = held_binary()
    pool = WarmPool(Path(agent_socket), ref, program) if program and os.environ.get("AGENTKUBE_BENCH_POOL", "1") == "1" else None

    def handle(command):
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--name", default="tool_call_stages", help="results file name (bench/results/NAME.*)")
    args = parser.parse_args()
    instrument(AGENT_STAGES)
    from agentkube.ebpf.api import NodeAgentServer

    with tempfile.TemporaryDirectory(prefix="agentkube-stages-") as scratch:
        socket_path = Path(scratch) / "agent.sock"
        instance = f"agentkube-stages-{os.getpid()}"
        server = NodeAgentServer(socket_path, Path(scratch) / "state", instance=instance)
        server.server.start()
        sandbox = SandboxWorker(socket_path, "bench-stages", __file__, memory="1Gi", pids=1024)
        try:
            sandbox.ask({"calls": 50})  # warm up (imports, first connections, pool)
            take()
            runtime_side: dict[str, list[float]] = defaultdict(list)
            agent_side: dict[str, list[float]] = defaultdict(list)
            for _ in range(args.calls // 50):
                for call in sandbox.ask({"calls": 50})["per_call"]:
                    for label, ns in call.items():
                        runtime_side[label].append(ns / 1000)
                # The agent's totals over the block, per call (the agent's threads are not per call).
                for label, ns in take().items():
                    agent_side[label].append(ns / 1000 / 50)
        finally:
            sandbox.close()
            server.server.stop()
            server.agent.teardown()
    rows = []
    result: dict[str, dict[str, float]] = {}
    for label, values in [*runtime_side.items(), *agent_side.items()]:
        result[label] = {"median_us": statistics.median(values)}
        if label.startswith("runtime"):
            result[label]["p99_us"] = sorted(values)[int(0.99 * (len(values) - 1))]
        rows.append([label, f"{result[label]['median_us']:.0f}",
                     f"{result[label]['p99_us']:.0f}" if "p99_us" in result[label] else "–"])
    write_results(args.name, {"machine": machine(), "calls": args.calls, "tool": TOOL, "stages": result},
                  f"Where a tool call's time goes: `/bin/true` × {args.calls}, µs",
                  ["stage", "median µs", "p99 µs"], rows,
                  "Runtime stages per call; agent stages are per-call averages over blocks of 50 calls (median of "
                  "blocks); the agent ran in the benchmark's process (its steps wrapped with timers).")


if __name__ == "__main__":
    main_or_worker(main, worker)
