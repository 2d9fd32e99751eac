"""Overhead per tool call: `/bin/true` run N times, side by side in one run, as

  (a) a bare fork+exec+wait (posix_spawn),
  (b) an agentkube tool call from inside a sandbox, the runtime's warm pool on (a held process already
      waiting in a call cgroup: start request, limits, BPF policy and write-ahead record; release, wait;
      finish: counters, BPF entries, audit; the cgroup removed and the pool refilled off the call's path),
  (b') the same without the pool (the held process started per call, its cgroup made and the process
      moved on the call's path),
  (c) cgcreate + cgexec + cgdelete (Debian's cgroup-tools, memory/cpu/pids),
  (d) a shell wrapper in AgentCgroup's style (mkdir, write the memory limit, move, exec, rmdir; memory only),

on a quiet machine and with one CPU-bound process beside it (a busy loop, nice 0), and with the node's
cgroup2 hierarchy mounted `favordynmods` (what the chart's node agent sets) and without it: a host-wide
setting under which no process move waits for an RCU grace period and every fork and exit pays a little,
bare ones included. The methods, the two conditions and the two mount settings take turns in blocks so
that machine noise falls on all of them alike; the mount is put back as it was found. Writes
bench/results/NAME.{json,md} (default tool_call_overhead). Needs root, and a machine set up by `make test`
(BCC, held.c).

    .venv/bin/python bench/tool_call_overhead.py [--calls 1000] [--block 100] [--favor-dynmods both|on|off]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from nodeagent_common import SandboxWorker, machine, main_or_worker, serve_worker, summary, write_results  # noqa: E402

from agentkube.ebpf.cgroups import detect_layout, favors_dynmods, set_favor_dynmods  # noqa: E402

TOOL = ["/bin/true"]
GOAL_ADDED_P50_MS = 1.0
GOAL_ADDED_P99_MS = 5.0
CONDITIONS = ("quiet", "cpu_busy")
DYNMODS = {"on": True, "off": False}  # the v2 mount's favordynmods; "on" is what the chart's node agent sets
METHODS = ("bare", "agentkube", "agentkube_no_pool", "cgroup_tools", "agentcgroup_wrapper")
LABELS = {"bare": "(a) bare fork+exec", "agentkube": "(b) agentkube tool call (warm pool)",
          "agentkube_no_pool": "(b') agentkube, no pool", "cgroup_tools": "(c) cgcreate+cgexec+cgdelete",
          "agentcgroup_wrapper": "(d) AgentCgroup-style wrapper"}

# AgentCgroup's prototype wraps each command in a script that makes a cgroup, writes a limit, moves
# itself in, runs the command and removes the cgroup. Same steps here, for the memory hierarchy.
WRAPPER = """\
set -e
d="$CGROUP_PARENT/tool_$$"
mkdir "$d"
echo 67108864 > "$d/memory.limit_in_bytes" 2>/dev/null || echo 67108864 > "$d/memory.max"
(echo $BASHPID > "$d/cgroup.procs"; exec "$@")
rmdir "$d"
"""


def fork_exec(argv: list[str]) -> None:
    # posix_spawn (vfork+exec): the cheapest way Python starts a process, as the runtime itself does.
    os.waitpid(os.posix_spawn(argv[0], argv, os.environ), 0)


def timed(run, calls: int) -> list[float]:
    samples = []
    for _ in range(calls):
        started = time.perf_counter_ns()
        run()
        samples.append((time.perf_counter_ns() - started) / 1e6)
    return samples


def worker(agent_socket: str, name: str) -> None:
    from agentkube.ebpf.held import held_binary
    from agentkube.ebpf.models import RunRequest, SandboxRef
    from agentkube.ebpf.runtime import WarmPool, favor_latency, run_call

    favor_latency()  # as the runtime does

    ref = SandboxRef(name=name)
    request = RunRequest(argv=TOOL, intent={"memory": "64Mi", "pids": 64, "network": {"egress": "none"}, "timeout": "30s"})
    program = held_binary()
    assert program, "no held program (make ebpf-host builds it)"
    pool = WarmPool(Path(agent_socket), ref, program)

    def handle(command):
        def one():
            result = run_call(Path(agent_socket), ref, request, pool if command["pool"] else None)
            assert result.exit_code == 0, result
        return {"samples_ms": timed(one, command["calls"])}

    serve_worker(handle)


def busy_loop() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="per method, condition and mount setting")
    parser.add_argument("--block", type=int, default=100)
    parser.add_argument("--favor-dynmods", choices=("both", *DYNMODS), default="both",
                        help="the cgroup2 mount setting(s) to measure under, in turns")
    parser.add_argument("--output", default="tool_call_overhead", help="bench/results/OUTPUT.{json,md}")
    args = parser.parse_args()
    from agentkube.ebpf.local import LocalNodeAgent

    layout = detect_layout()
    modes = tuple(DYNMODS) if args.favor_dynmods == "both" else (args.favor_dynmods,)
    found = favors_dynmods(layout)
    memory_mount = layout.hierarchy_for("memory").mount
    wrapper_parent = memory_mount / f"agentkube-bench-wrapper-{os.getpid()}"
    wrapper_parent.mkdir()
    cg_group = f"agentkube-bench-cgtools-{os.getpid()}"
    controllers = "memory,cpu,pids"
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as script:
        script.write(WRAPPER)
    samples: dict[str, dict[str, dict[str, list[float]]]] = {
        mode: {c: {m: [] for m in METHODS} for c in CONDITIONS} for mode in modes}
    env = {**os.environ, "CGROUP_PARENT": str(wrapper_parent)}
    load_before = os.getloadavg()

    def cgroup_tools():
        child = f"{cg_group}/c"
        subprocess.run(["cgcreate", "-g", f"{controllers}:{child}"], check=True)
        subprocess.run(["cgexec", "-g", f"{controllers}:{child}", *TOOL], check=True)
        subprocess.run(["cgdelete", "-g", f"{controllers}:{child}"], check=True)

    def wrapper():
        subprocess.run(["bash", script.name, *TOOL], check=True, env=env)

    with LocalNodeAgent() as agent:
        sandbox = SandboxWorker(agent.socket, "bench-overhead", __file__, memory="1Gi", pids=1024)
        try:
            sandbox.ask({"calls": 20, "pool": True})  # warm up: imports, connections, the pool
            done = 0
            while done < args.calls:
                block = min(args.block, args.calls - done)
                for mode in modes if done // args.block % 2 == 0 else modes[::-1]:  # each goes first in turn
                    if favors_dynmods(layout) != DYNMODS[mode]:
                        set_favor_dynmods(layout, DYNMODS[mode])
                    for condition in CONDITIONS:
                        busy = busy_loop() if condition == "cpu_busy" else None
                        try:
                            runs = samples[mode][condition]
                            runs["bare"] += timed(lambda: fork_exec(TOOL), block)
                            runs["agentkube"] += sandbox.ask({"calls": block, "pool": True})["samples_ms"]
                            runs["agentkube_no_pool"] += sandbox.ask({"calls": block, "pool": False})["samples_ms"]
                            runs["cgroup_tools"] += timed(cgroup_tools, block)
                            runs["agentcgroup_wrapper"] += timed(wrapper, block)
                        finally:
                            if busy:
                                busy.kill()
                                busy.wait()
                done += block
        finally:
            if favors_dynmods(layout) != found:
                set_favor_dynmods(layout, found)
            sandbox.close()
            subprocess.run(["cgdelete", "-r", "-g", f"{controllers}:{cg_group}"], capture_output=True)
            # cgdelete leaves the group in some hierarchies here: remove whatever is left, children first.
            for controller in controllers.split(","):
                group_dir = layout.hierarchy_for(controller).mount / cg_group
                if group_dir.is_dir():
                    for directory in sorted((p for p in group_dir.rglob("*") if p.is_dir()), reverse=True):
                        directory.rmdir()
                    group_dir.rmdir()
            wrapper_parent.rmdir()
            os.unlink(script.name)

    by_mode = {mode: judge(samples[mode]) for mode in modes}
    goal = (f"agentkube adds at most {GOAL_ADDED_P50_MS} ms at p50 and {GOAL_ADDED_P99_MS} ms at p99 over bare, "
            "and is faster than (c) and (d) at both, quiet and with a CPU-bound process beside it")
    result = {
        "machine": machine(), "layout": layout.kind, "calls": args.calls, "tool": TOOL,
        "favordynmods_found": found, "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "favordynmods": by_mode, "goal": goal, "goal_met": {mode: judged["goal_met"] for mode, judged in by_mode.items()},
    }
    rows = []
    for mode in modes:
        stats, added = by_mode[mode]["milliseconds"], by_mode[mode]["added_over_bare_ms"]
        for name in METHODS:
            row = [f"{LABELS[name]}, favordynmods {mode}"]
            for c in CONDITIONS:
                s_ = stats[c][name]
                row += [f"{s_['p50']:.2f}", f"{s_['p99']:.2f}", f"{added[c][name]['p50']:+.2f} / {added[c][name]['p99']:+.2f}"]
            rows.append(row)
    header = ["method"] + [f"{c} {h}" for c in ("quiet", "CPU-busy") for h in ("p50 ms", "p99 ms", "added p50 / p99")]
    verdicts = "; ".join(f"favordynmods {mode}: {'met' if by_mode[mode]['goal_met'] else 'not met'}" for mode in modes)
    write_results(args.output, result,
                  f"Overhead per tool call: `/bin/true` × {args.calls} per method, condition and mount setting "
                  f"({layout.kind} cgroups, {machine()['cpus']} CPUs)", header, rows,
                  f"Goal: {goal} — in this run {verdicts}. The chart's node agent mounts favordynmods on. "
                  f"Load average before/after: {load_before[0]:.2f} / {result['load_average_after'][0]:.2f} "
                  "(other work on the machine included).")


def judge(samples: dict[str, dict[str, list[float]]]) -> dict:
    """One mount setting's samples → percentiles, what each method adds over bare, ratios, and the goal."""
    stats = {c: {m: summary(v) for m, v in samples[c].items()} for c in CONDITIONS}
    added = {c: {m: {"p50": s["p50"] - stats[c]["bare"]["p50"], "p99": s["p99"] - stats[c]["bare"]["p99"]}
                 for m, s in stats[c].items()} for c in CONDITIONS}
    met = all(added[c]["agentkube"]["p50"] <= GOAL_ADDED_P50_MS and added[c]["agentkube"]["p99"] <= GOAL_ADDED_P99_MS
              and all(stats[c]["agentkube"][q] < stats[c][peer][q] for peer in ("cgroup_tools", "agentcgroup_wrapper")
                      for q in ("p50", "p99")) for c in CONDITIONS)
    return {"milliseconds": stats, "added_over_bare_ms": added, "goal_met": met,
            "agentkube_ratio_to": {c: {m: {q: stats[c]["agentkube"][q] / s[q] for q in ("p50", "p99")}
                                       for m, s in stats[c].items()} for c in CONDITIONS}}


if __name__ == "__main__":
    main_or_worker(main, worker)
