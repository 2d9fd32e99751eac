"""Reaction to a memory burst: how long after a tool call crosses its memory.high the node agent knows,
against a loop that polls every call's memory usage every 100 ms, both watching the same calls.

Each burst is a tool call (64 MiB max, high at 90%) that touches 54 MiB (plus the interpreter) in 256 KiB steps, reads its own
cgroup's usage after each step and reports the step during which usage first reached memory.high (so
the crossing lies between the step's start and end); it goes on to the end of the 54 MiB (a few MiB past
high), holds the memory for 300 ms and exits. (On v1 the kernel checks usage thresholds every 128
pages charged, so a burst that stopped right at the threshold could go unnoticed until it grew again.) The
agent's time is when its watcher (v1: a usage-threshold eventfd; v2: inotify on memory.events) woke up,
as the call's record reports it (`memory_high_first_seen`); the agent runs in its own process.
Writes bench/results/memory_burst_reaction.{json,md}.

    .venv/bin/python bench/memory_burst_reaction.py [--bursts 100]
"""

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from nodeagent_common import SandboxWorker, machine, main_or_worker, serve_worker, summary, write_results  # noqa: E402

from agentkube.contract import MiB, memory_high_for  # noqa: E402
from agentkube.ebpf.cgroups import CALL_PREFIX, detect_layout  # noqa: E402

CALL_MEMORY = 64 * MiB
POLL_INTERVAL = 0.100
GOAL_P99_MS = 5.0

BURST = r"""
import mmap, os, sys, time
high = int(sys.argv[1])
paths = dict(line.split(":", 2)[1:] for line in open("/proc/self/cgroup").read().splitlines())
if "memory" in paths:
    usage_file = "/sys/fs/cgroup/memory" + paths["memory"].strip() + "/memory.usage_in_bytes"
else:
    usage_file = [l.split()[1] for l in open("/proc/self/mounts") if l.split()[2] == "cgroup2"][0] + paths[""].strip() + "/memory.current"
fd = os.open(usage_file, os.O_RDONLY)
area = mmap.mmap(-1, 54 << 20)
step, offset, crossed = 256 << 10, 0, None
while offset < len(area):
    start = time.time_ns()
    for page in range(offset, offset + step, 4096):
        area[page] = 1
    end = time.time_ns()
    offset += step
    if crossed is None and int(os.pread(fd, 32, 0)) >= high:
        crossed = (start, end)  # a burst goes on past the threshold: keep allocating to the end of the area
print(*crossed, flush=True)
time.sleep(0.3)
"""


def worker(agent_socket: str, name: str) -> None:
    from agentkube.ebpf.models import RunRequest, SandboxRef
    from agentkube.ebpf.runtime import run_call

    request = RunRequest(argv=[sys.executable, "-c", BURST, str(memory_high_for(CALL_MEMORY))],
                         intent={"memory": CALL_MEMORY, "network": {"egress": "none"}, "timeout": "60s"})

    def handle(command):
        result = run_call(Path(agent_socket), SandboxRef(name=name), request)
        return {"call_id": result.call_id, "stdout": result.stdout, "stderr": result.stderr[-500:],
                "cgroup_name": CALL_PREFIX + result.call_id}

    serve_worker(handle)


class Poller:
    """The baseline: read every running call's usage every 100 ms."""

    def __init__(self, sandbox_memory_dir: Path, usage_file: str, high: int):
        self.dir, self.usage_file, self.high = sandbox_memory_dir, usage_file, high
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.is_set():
            for child in self.dir.glob(CALL_PREFIX + "*"):
                if child.name in self.seen:
                    continue
                try:
                    if int((child / self.usage_file).read_text()) >= self.high:
                        self.seen[child.name] = time.time()
                except (FileNotFoundError, ValueError):
                    pass
            self._stop.wait(POLL_INTERVAL)

    def close(self):
        self._stop.set()
        self.thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bursts", type=int, default=100)
    args = parser.parse_args()
    from agentkube.ebpf.cgroups import Cgroup, local_root_paths, own_cgroups
    from agentkube.ebpf.local import LocalNodeAgent
    from agentkube.ebpf.models import CallRecord
    from agentkube.ebpf.unixhttp import request

    layout = detect_layout()
    high = memory_high_for(CALL_MEMORY)
    agent_ms, poll_ms, step_ms = [], [], []
    with LocalNodeAgent() as agent:  # its own process, as in production; the poller runs in this one
        sandbox = SandboxWorker(agent.socket, "bench-burst", __file__, memory="1Gi")
        try:
            root = Cgroup(layout, local_root_paths(layout, own_cgroups(agent.process.pid), agent.instance))
            usage_file = "memory.usage_in_bytes" if layout.kind == "hybrid" else "memory.current"
            poller = Poller(root.child("default_bench-burst").controller_dir("memory"), usage_file, high)
            try:
                for _ in range(args.bursts):
                    answer = sandbox.ask({})
                    if len(answer["stdout"].split()) != 2:
                        raise RuntimeError(f"the burst failed: {answer}")
                    start_ns, end_ns = map(int, answer["stdout"].split())
                    crossed = end_ns / 1e9  # the latest the crossing can have happened
                    record = CallRecord.model_validate(request(agent.socket, "GET", f"/v1/calls/{answer['call_id']}"))
                    seen = record.memory_high_first_seen
                    if seen is None or answer["cgroup_name"] not in poller.seen:
                        raise RuntimeError(f"a burst went unseen: agent {seen}, poller {answer['cgroup_name'] in poller.seen}")
                    agent_ms.append((seen - crossed) * 1000)
                    poll_ms.append((poller.seen[answer["cgroup_name"]] - crossed) * 1000)
                    step_ms.append((end_ns - start_ns) / 1e6)
            finally:
                poller.close()
        finally:
            sandbox.close()

    stats = {"agent_push": summary(agent_ms), "poll_100ms": summary(poll_ms), "crossing_step": summary(step_ms)}
    result = {
        "machine": machine(), "layout": layout.kind, "bursts": args.bursts, "call_memory": CALL_MEMORY,
        "memory_high": high, "milliseconds_after_crossing": stats,
        "p99_ratio_poll_to_agent": stats["poll_100ms"]["p99"] / max(stats["agent_push"]["p99"], 1e-6),
        "note": "latency is measured from the end of the 256 KiB step during which usage reached memory.high; "
                "the crossing happened within that step, so a negative value means the agent woke before "
                "the step finished",
        "goal": f"p99 under {GOAL_P99_MS} ms",
    }
    labels = {"agent_push": "node agent (push: eventfd / inotify)", "poll_100ms": "100 ms polling loop",
              "crossing_step": "(the crossing step's own length)"}
    rows = [[label, *(f"{stats[name][k]:.3f}" for k in ("p50", "p90", "p99", "max"))] for name, label in labels.items()]
    write_results("memory_burst_reaction", result,
                  f"Reaction to a memory burst: crossing memory.high → seen ({layout.kind} cgroups, {args.bursts} bursts)",
                  ["watcher", "p50 ms", "p90 ms", "p99 ms", "max ms"], rows,
                  f"p99 polling / p99 agent: {result['p99_ratio_poll_to_agent']:.0f}×. Goal: {result['goal']}.")


if __name__ == "__main__":
    main_or_worker(main, worker)
