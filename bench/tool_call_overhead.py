"""Overhead per tool call: `/bin/true` run N times, side by side in one run, as

  (a) a bare fork+exec+wait (posix_spawn),
  (b) an agentkube tool call from inside a sandbox (fork, hold, placement by the node agent: cgroup in
      every hierarchy, limits, BPF map entries, move; release, wait, finish: kill, counters, rmdir, audit),
  (b') the same with the v2 hierarchy mounted `favordynmods` (set for those blocks only, then restored),
  (c) cgcreate + cgexec + cgdelete (Debian's cgroup-tools, memory/cpu/pids),
  (d) a shell wrapper in AgentCgroup's style (mkdir, write the memory limit, move, exec, rmdir; memory only).

The methods take turns in blocks so that machine noise falls on all of them alike. Writes
bench/results/tool_call_overhead.{json,md}. Needs root, and a machine set up by `make test` (BCC).

    .venv/bin/python bench/tool_call_overhead.py [--calls 2000] [--block 100]
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
    from agentkube.ebpf.models import RunRequest, SandboxRef
    from agentkube.ebpf.runtime import run_call

    ref = SandboxRef(name=name)
    request = RunRequest(argv=TOOL, intent={"memory": "64Mi", "pids": 64, "network": {"egress": "none"}, "timeout": "30s"})

    def handle(command):
        def one():
            result = run_call(Path(agent_socket), ref, request)
            assert result.exit_code == 0, result
        return {"samples_ms": timed(one, command["calls"])}

    serve_worker(handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--block", type=int, default=100)
    args = parser.parse_args()
    from agentkube.ebpf.local import LocalNodeAgent

    layout = detect_layout()
    memory_mount = layout.hierarchy_for("memory").mount
    wrapper_parent = memory_mount / f"agentkube-bench-wrapper-{os.getpid()}"
    wrapper_parent.mkdir()
    cg_group = f"agentkube-bench-cgtools-{os.getpid()}"
    controllers = "memory,cpu,pids"
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as script:
        script.write(WRAPPER)
    samples = {"bare": [], "agentkube": [], "agentkube_favordynmods": [], "cgroup_tools": [], "agentcgroup_wrapper": []}
    favored_before = favors_dynmods(layout)
    env = {**os.environ, "CGROUP_PARENT": str(wrapper_parent)}

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
            done = 0
            while done < args.calls:
                block = min(args.block, args.calls - done)
                samples["bare"] += timed(lambda: fork_exec(TOOL), block)
                samples["agentkube"] += sandbox.ask({"calls": block})["samples_ms"]
                set_favor_dynmods(layout, True)
                try:
                    samples["agentkube_favordynmods"] += sandbox.ask({"calls": block})["samples_ms"]
                finally:
                    set_favor_dynmods(layout, favored_before)
                samples["cgroup_tools"] += timed(cgroup_tools, block)
                samples["agentcgroup_wrapper"] += timed(wrapper, block)
                done += block
        finally:
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

    stats = {name: summary(values) for name, values in samples.items()}
    bare = stats["bare"]["p50"]
    result = {
        "machine": machine(), "layout": layout.kind, "calls": args.calls, "tool": TOOL,
        "milliseconds": stats,
        "added_p50_ms_over_bare": {name: s["p50"] - bare for name, s in stats.items()},
        "p50_ratio_to_bare": {name: s["p50"] / bare for name, s in stats.items()},
        "agentkube_p50_ratio_to": {name: stats["agentkube"]["p50"] / s["p50"] for name, s in stats.items()},
        "goal": f"agentkube adds at most {GOAL_ADDED_P50_MS} ms at p50 over bare, and is faster than (c) and (d)",
    }
    labels = {"bare": "(a) bare fork+exec", "agentkube": "(b) agentkube tool call",
              "agentkube_favordynmods": "(b') agentkube, favordynmods",
              "cgroup_tools": "(c) cgcreate+cgexec+cgdelete", "agentcgroup_wrapper": "(d) AgentCgroup-style wrapper"}
    rows = [[labels[name], f"{s['p50']:.2f}", f"{s['p90']:.2f}", f"{s['p99']:.2f}",
             f"{result['added_p50_ms_over_bare'][name]:+.2f} ms", f"{result['agentkube_p50_ratio_to'][name]:.2f}"]
            for name, s in stats.items()]
    write_results("tool_call_overhead", result,
                  f"Overhead per tool call: `/bin/true` × {args.calls} ({layout.kind} cgroups, {machine()['cpus']} CPUs)",
                  ["method", "p50 ms", "p90 ms", "p99 ms", "added p50 over bare", "agentkube p50 / this p50"], rows,
                  f"Goal: {result['goal']}.")


if __name__ == "__main__":
    main_or_worker(main, worker)
