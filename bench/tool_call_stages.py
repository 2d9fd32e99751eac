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

The direct path also gets a timeline per call: absolute CLOCK_MONOTONIC marks on the runtime's call thread
(its requests to the agent, the release, the wait for the exit), in the agent (the start and the finish, by
call id) and from the kernel (the call's exec and exit events carry bpf_ktime_get_ns, the same clock), so
that the hand-offs between the processes (a request's way in, its answer's way out, release → exec, exit →
the runtime's notice) are measured rather than left as the difference of two totals.

Stages that do not exist on the path being measured are left out, so the same script measures the path
before and after a change. Prints and writes bench/results/NAME.{json,md} (medians in µs).

    .venv/bin/python bench/tool_call_stages.py [--calls 1000] [--paths direct,socket,port] [--gap-ms 0]
"""

from __future__ import annotations

import argparse
import functools
import http.client
import importlib
import json
import os
import resource
import shutil
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
    ("agentkube.ebpf.agent", None, "unified_cgroup_of", "agent: fill: read the process's cgroup"),
    ("agentkube.ebpf.agent", None, "read_ppid", "agent: fill: read the process's parent"),
    ("agentkube.ebpf.agent", None, "traced_by", "agent: fill: is it traced"),
    ("agentkube.ebpf.agent", None, "prefer_as_oom_victim", "agent: fill: oom_score_adj"),
    ("agentkube.ebpf.cgroups", "Cgroup", "open_counters", "agent: fill: open the counter files"),
    ("agentkube.ebpf.agent", "NodeAgent", "runtime_sandbox", "agent: the caller's sandbox (memo)"),
]
RUNTIME_STAGES = [
    ("os", None, "posix_spawn", "runtime: posix_spawn"),
    ("agentkube.ebpf.spawn", None, "spawn", "runtime: posix_spawn"),
    ("agentkube.ebpf.held", "Forker", "fork", "runtime: the forker's fork (refill)"),
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
# The agent's CPU time (its thread's, user + system) in the steps that use most of it, per call.
AGENT_CPU_STAGES = [
    ("agentkube.ebpf.agent", "NodeAgent", "fill_pool", "agent CPU: fill (pool refill)"),
    ("agentkube.ebpf.agent", "NodeAgent", "start_call", "agent CPU: start"),
    ("agentkube.ebpf.agent", "NodeAgent", "finish_call_answer_first", "agent CPU: finish until answered"),
    ("agentkube.ebpf.cgroups", "Cgroup", "remove", "agent CPU: cgroup removal (remover thread)"),
    ("agentkube.ebpf.frames", None, "read_frame", "agent CPU: frames read (all connections)"),
]
PATHS = ("direct", "socket", "port")
TOKEN = "bench-runtime-token"

_totals: dict[str, int] = defaultdict(int)
_lock = threading.Lock()


def machine_busy_seconds() -> float:
    """CPU time the whole machine has spent busy since boot (/proc/stat: user, nice, system, irq, softirq, steal)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return sum(int(fields[i]) for i in (1, 2, 3, 6, 7, 8)) / os.sysconf("SC_CLK_TCK")


def instrument(stages, clock=time.perf_counter_ns) -> list[str]:
    """Wrap each stage that exists with a timer adding to its per-call total (wall time by default; with
    `time.thread_time_ns`, its thread's CPU time); returns the stages found."""
    found = []
    for module_name, owner_name, attribute, label in stages:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:  # a module an older version of the code does not have
            continue
        owner = getattr(module, owner_name, None) if owner_name else module  # None: a class an older version lacks
        original = getattr(owner, attribute, None)
        if original is None or not callable(original):
            continue

        def timed(*args, __original=original, __label=label, **kwargs):
            started = clock()
            try:
                return __original(*args, **kwargs)
            finally:
                with _lock:
                    _totals[__label] += clock() - started

        setattr(owner, attribute, functools.wraps(original)(timed))
        if owner_name is None:  # a function imported by name elsewhere: wrap those references too
            for other in list(sys.modules.values()):
                name = getattr(other, "__name__", "")
                if name.startswith("agentkube") and other is not module and getattr(other, attribute, None) is original:
                    setattr(other, attribute, getattr(owner, attribute))
        found.append(label)
    return found


def instrument_after_answer() -> None:
    """The CPU time of what a finish does after its answer (the second value `_finalize` returns)."""
    from agentkube.ebpf import agent

    original = getattr(agent.NodeAgent, "_finalize", None)
    if original is None:
        return

    def finalize(self, *args, **kwargs):
        record, rest = original(self, *args, **kwargs)

        def timed_rest():
            started = time.thread_time_ns()
            try:
                rest()
            finally:
                with _lock:
                    _totals["agent CPU: finish after the answer"] += time.thread_time_ns() - started

        return record, timed_rest

    agent.NodeAgent._finalize = finalize


def take() -> dict[str, int]:
    with _lock:
        snapshot = dict(_totals)
        _totals.clear()
    return snapshot


# The timeline (module doc): marks are (label, begin ns, end ns) on one side, per call.
_marks: list[tuple[str, int, int]] = []
_agent_marks: dict[str, dict[str, int]] = defaultdict(dict)  # call id → label → ns
# call id → its first exec / exit → ktime ns (a call cgroup can serve several calls one after another: an event
# is the call's that was running in its cgroup then, by the agent's own table)
_event_times: dict[str, dict[str, int]] = defaultdict(dict)


def mark_runtime(module_name: str, owner_name: str | None, attribute: str, label) -> None:
    """Wrap a runtime function so that, on the thread that runs the direct path's calls, its begin and end
    go to `_marks`; `label` may be a function of the call's arguments."""
    module = importlib.import_module(module_name)
    owner = getattr(module, owner_name) if owner_name else module
    original = getattr(owner, attribute, None)
    if original is None:
        return
    caller = threading.get_ident()

    def marked(*args, **kwargs):
        if threading.get_ident() != caller:
            return original(*args, **kwargs)
        begin = time.perf_counter_ns()
        try:
            return original(*args, **kwargs)
        finally:
            _marks.append((label(*args, **kwargs) if callable(label) else label, begin, time.perf_counter_ns()))

    setattr(owner, attribute, functools.wraps(original)(marked))
    if owner_name is None:
        for other in list(sys.modules.values()):
            if getattr(other, "__name__", "").startswith("agentkube") and getattr(other, attribute, None) is original:
                setattr(other, attribute, marked)


def mark_agent() -> None:
    """The agent's start and finish of each call (begin, end), and its calls' first exec and exit events."""
    from agentkube.ebpf import agent

    def wrap(attribute: str, label: str, call_id_of) -> None:
        original = getattr(agent.NodeAgent, attribute, None)
        if original is None:
            return

        def marked(self, *args, **kwargs):
            begin = time.perf_counter_ns()
            answer = original(self, *args, **kwargs)
            end = time.perf_counter_ns()
            call_id = call_id_of(args, answer)
            _agent_marks[call_id][f"{label} begin"] = begin
            _agent_marks[call_id][f"{label} end"] = end
            return answer

        setattr(agent.NodeAgent, attribute, functools.wraps(original)(marked))

    wrap("start_call", "agent start", lambda args, answer: answer.call_id)
    wrap("finish_call_answer_first", "agent finish", lambda args, answer: args[1])
    original_event = agent.NodeAgent._on_event

    def on_event(self, event):
        if event.kind in ("exec", "exit"):
            call_id = self._by_cgroup.get(event.cgroup_id)
            if call_id is not None:
                _event_times[call_id].setdefault(event.kind, event.timestamp_ns)
        return original_event(self, event)

    agent.NodeAgent._on_event = on_event


# The timeline's segments: (name, from mark, to mark), each a per-call difference.
TIMELINE = [
    ("runtime: call begins → start request sent", "call begin", "start request begin"),
    ("hand-off: start request → agent begins", "start request begin", "agent start begin"),
    ("agent: start", "agent start begin", "agent start end"),
    ("hand-off: start answer → runtime has it", "agent start end", "start request end"),
    ("runtime: answer → release written", "start request end", "release begin"),
    ("release written → exec event (held wakes, execs)", "release begin", "exec"),
    ("exec event → exit event (the command runs)", "exec", "exit"),
    ("exit event → runtime notices (pidfd)", "exit", "exit noticed"),
    ("runtime: noticed → finish request sent (reap)", "exit noticed", "finish request begin"),
    ("hand-off: finish request → agent begins", "finish request begin", "agent finish begin"),
    ("agent: finish until answered", "agent finish begin", "agent finish end"),
    ("hand-off: finish answer → runtime has it", "agent finish end", "finish request end"),
    ("runtime: answer → result (drain, RunResult)", "finish request end", "call end"),
]
# Beside the chain (the chain's segments add up to the call): where the agent releases a pooled process itself,
# the exec follows its start rather than the runtime's write (which then writes what did not fit of the command).
TIMELINE_BESIDE = [
    ("beside: agent's start done → exec event", "agent start end", "exec"),
    ("beside: start request sent → exec event", "start request begin", "exec"),
]


def timeline(runtime_marks: dict[str, int], call_id: str) -> dict[str, float] | None:
    """A call's segments in µs, or None if a mark is missing (a call that went another way)."""
    marks = {**runtime_marks, **_agent_marks.get(call_id, {})}
    marks.update(_event_times.get(call_id, {}))
    if any(start not in marks or end not in marks for _, start, end in TIMELINE):
        return None
    return {name: (marks[end] - marks[start]) / 1000 for name, start, end in TIMELINE + TIMELINE_BESIDE}


def worker(agent_socket: str, name: str) -> None:
    instrument(RUNTIME_STAGES)
    from agentkube.contract import token_verifier
    from agentkube.ebpf import runtime_port
    from agentkube.ebpf.held import held_binary
    from agentkube.ebpf.models import RunRequest, SandboxRef
    from agentkube.ebpf.runtime import SandboxRuntime, WarmPool, favor_latency, run_call

    favor_latency()  # as the runtime does
    mark_runtime("agentkube.ebpf.runtime", None, "_agent_call", lambda socket, op, *a, **k: f"{op} request")
    mark_runtime("agentkube.ebpf.runtime", None, "_write_all", "release")
    mark_runtime("agentkube.ebpf.runtime", "_Pump", "until_exit", "exit noticed")

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
        per_call, marks = [], []
        cpu_before = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        for _ in range(command["calls"]):
            time.sleep(command.get("gap", 0.0))  # untimed: the pool's refill done before the next call
            take()
            _marks.clear()
            started = time.perf_counter_ns()
            result = run_call(Path(agent_socket), ref, request, pool)
            ended = time.perf_counter_ns()
            assert result.exit_code == 0, result
            per_call.append({**take(), "runtime: whole call": ended - started})
            # Each mark's begin, and for the wait for the exit its end (when the runtime noticed it).
            call_marks = {"call begin": started, "call end": ended}
            for label, begin, end in _marks:
                call_marks.setdefault(f"{label} begin", begin)
                call_marks.setdefault(f"{label} end", end)
                call_marks.setdefault(label, begin)
            call_marks["exit noticed"] = call_marks.pop("exit noticed end", 0) or call_marks.get("exit noticed", 0)
            if "release begin" not in call_marks and "start request end" in call_marks:
                # Released by the agent, its whole command written before the start: nothing left to write.
                call_marks["release begin"] = call_marks["start request end"]
            marks.append({"call_id": result.call_id, "marks": call_marks})
        cpu_after = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        # CPU time (user + system) over the block: the runtime's own threads (the refill's included), and its
        # reaped children (held processes, which became the calls' commands); the gaps' sleeps cost none.
        cpu = {who: sum(getattr(after, f) - getattr(before, f) for f in ("ru_utime", "ru_stime"))
               for who, before, after in (("runtime", cpu_before[0], cpu_after[0]),
                                          ("calls' processes", cpu_before[1], cpu_after[1]))}
        return {"per_call": per_call, "marks": marks, "cpu_seconds": cpu}

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
    parser.add_argument("--gap-ms", type=float, default=0.0,
                        help="direct path: a pause before each call (untimed), as between an agent's calls; 0: back to back")
    parser.add_argument("--name", default="tool_call_stages", help="results file name (bench/results/NAME.*)")
    args = parser.parse_args()
    paths = [p for p in args.paths.split(",") if p]
    assert set(paths) <= set(PATHS), f"--paths: choose among {PATHS}"
    instrument(AGENT_STAGES)
    instrument(AGENT_CPU_STAGES, clock=time.thread_time_ns)
    instrument_after_answer()
    mark_agent()
    from agentkube.client import Sandbox
    from agentkube.ebpf.api import NodeAgentServer
    from agentkube.ebpf.runtime import favor_latency

    favor_latency()  # as `node-agent run` does: the agent's threads hand the interpreter's lock over as it does

    block = 50
    whole: dict[str, list[float]] = {p: [] for p in paths}
    runtime_side: dict[str, dict[str, list[float]]] = {p: defaultdict(list) for p in paths}
    agent_side: dict[str, dict[str, list[float]]] = {p: defaultdict(list) for p in paths}
    direct_calls: list[tuple[float, dict[str, float]]] = []
    direct_marks: list[dict] = []
    cpu_per_call: dict[str, list[float]] = defaultdict(list)
    machine_per_call: list[float] = []  # the whole machine's busy CPU over each direct block, per call
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="agentkube-stages-") as scratch:
        socket_path = Path(scratch) / "agent.sock"
        instance = f"agentkube-stages-{os.getpid()}"
        server = NodeAgentServer(socket_path, Path(scratch) / "state", instance=instance)
        server.server.start()
        sandbox = SandboxWorker(socket_path, "bench-stages", __file__, memory="1Gi", pids=1024)
        endpoints: dict = {}
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
                    agent_cpu, machine_cpu = resource.getrusage(resource.RUSAGE_SELF), machine_busy_seconds()
                    answer = sandbox.ask({"calls": block, "gap": args.gap_ms / 1000})
                    agent_after = resource.getrusage(resource.RUSAGE_SELF)
                    machine_per_call.append((machine_busy_seconds() - machine_cpu) * 1e6 / block)
                    direct_marks.extend(answer.get("marks", []))
                    # CPU per call (µs) over the block: the agent is this process (its main thread waits meanwhile).
                    for who, seconds in {**answer.get("cpu_seconds", {}), "agent": sum(
                            getattr(agent_after, f) - getattr(agent_cpu, f) for f in ("ru_utime", "ru_stime"))}.items():
                        cpu_per_call[who].append(seconds * 1e6 / block)
                    return [{**{k: v for k, v in call.items() if k != "runtime: whole call" and mine(path, k)},
                             "whole": call["runtime: whole call"]} for call in answer["per_call"]]
                if path == "socket":
                    return through(path, lambda: sdk.run(TOOL, memory="64Mi", pids=64, network="none", timeout="30s").model_dump())
                return through(path, gateway_leg.run)

            for path in paths:  # warm up: imports, first connections, the pool
                run_path(path)
            take()
            direct_marks.clear()
            cpu_per_call.clear()
            machine_per_call.clear()
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
            server.agent.programs.consume_events()  # the last calls' exit events, if no finish read them
        finally:
            sandbox.close()  # kills the worker (the sandbox's main process)
            server.server.stop()
            server.agent.teardown()
            if endpoints:  # the worker's runtime socket directory, which it cannot remove once killed
                shutil.rmtree(Path(endpoints["socket"]).parent, ignore_errors=True)
    load_after = os.getloadavg()
    timelines = [t for t in (timeline(call["marks"], call["call_id"]) for call in direct_marks) if t is not None]

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
    if timelines:
        segments = {name: [t[name] for t in timelines] for name, _, _ in TIMELINE + TIMELINE_BESIDE}
        result["direct_timeline"] = {"calls": len(timelines), "of": len(direct_marks),
                                     "segments_median_us": {name: median(v) for name, v in segments.items()},
                                     "segments_p90_us": {name: sorted(v)[int(0.9 * (len(v) - 1))] for name, v in segments.items()}}
        rows.append([f"**direct: timeline of a call** (median of {len(timelines)} calls; p90 in the note)",
                     f"{sum(median(segments[name]) for name, _, _ in TIMELINE):.0f}", *([""] * (len(paths) - 1)),
                     "sum of the chain's medians"])
        rows += [[f"  {name}", f"{median(v):.0f}", *([""] * (len(paths) - 1)),
                  f"p90 {result['direct_timeline']['segments_p90_us'][name]:.0f}"] for name, v in segments.items()]
    if cpu_per_call:
        # Back to back on a 2-CPU machine, a call can be no shorter than its CPU time, the refill's included,
        # divided by the CPUs (what runs beside it on them).
        result["direct_cpu_per_call_us"] = {who: median(v) for who, v in cpu_per_call.items()}
        result["direct_cpu_per_call_us"]["total"] = sum(result["direct_cpu_per_call_us"].values())
        rows.append(["**direct: CPU time per call** (user + system, median of blocks)",
                     f"{result['direct_cpu_per_call_us']['total']:.0f}", *([""] * (len(paths) - 1)),
                     "all processes; refills included"])
        rows += [[f"  CPU: {who}", f"{value:.0f}", *([""] * (len(paths) - 1)), ""]
                 for who, value in result["direct_cpu_per_call_us"].items() if who != "total"]
        # The kernel's own threads too (a memory cgroup's teardown, RCU callbacks), but anything else running.
        result["direct_machine_cpu_per_call_us"] = median(machine_per_call)
        rows.append(["  CPU: whole machine (every process and kernel thread, others' work included)",
                     f"{result['direct_machine_cpu_per_call_us']:.0f}", *([""] * (len(paths) - 1)), ""])
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
