"""Density: how many agent sandboxes fit under one node memory budget at 100% survival, with static
container limits against agentkube's per-call limits, replaying real Claude Code memory traces.

The traces are AgentCgroup's (github.com/eunomia-bpf/agentcgroup, GPL-2.0 data, not in this repository):
`--traces DIR` is read recursively for `resources.json` + `tool_calls.json` pairs; with `--from-git GITDIR`
(a clone or mirror of that repository) they are first copied there from its HEAD. The default cache is
~/.cache/agentkube/agentcgroup-traces. Runs whose shell calls carry no end time are left out.

What runs, for real: a node agent (`--local`), whose sandboxes all sit under one parent cgroup; that
cgroup's memory limit is the node's budget. Each sandbox is a real process registered as the sandbox's
main process (the agent: it holds the memory its run shows outside shell commands), and each shell
command of the run is a real process holding what the container had above that while the command ran
(`agent_traces.py` splits a run so). Memory is real anonymous memory, touched page by page; the kernel
enforces every limit and picks every OOM victim.

  (a) static: every sandbox's container limit is sized as a platform sizes it, the highest peak of the
      task set (the only static size under which every task survives alone), and the node admits
      floor(budget / limit) sandboxes. Commands run in the sandbox's own cgroup, as `kubectl exec` does.
  (b) agentkube: the same container limit as the sandbox's envelope, every command a tool call through
      the runtime's warm pool in its own cgroup, with the limit its command class declares (the built-in
      profiles shell 256Mi, test 2Gi, build 4Gi, scaled with the memory; memory.high at 90% of it) and
      marked as the kernel's first OOM victim. N sandboxes are admitted for N over a sweep.
  (a'') static limits sized at the p95 of the peaks instead: more sandboxes fit, and the tasks above it die.
  (a') static limits at the first (b) count, for contrast: what overcommitting static containers does.

A sandbox survives if its main process is alive at the end. A command killed (OOM) is retried, as an agent
would, up to `RETRIES` more times; one that fails every time is lost. "Fits" = no main process killed.

Time is compressed `--speedup` times (default 10: a 5-minute task replays in 30 s; bursts keep their
height and rise 10× faster; the touch rate of the machine bounds the steepest ones); memory is scaled by
`--memory-scale` (default 0.5) to fit a shared machine, budget and declared intents alike. Each sandbox
replays tasks drawn from the set (seeded), back to back, from a random point of its first.
Writes bench/results/density.{json,md}. Needs root (cgroups, BPF) and the node lock.

    .venv/bin/python bench/density.py [--budget 3Gi] [--seconds 90] [--multiples 2,3,4,6]
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from agent_traces import Call, Step, Task, load_task, replay_steps, static_limit  # noqa: E402
from nodeagent_common import SandboxWorker, machine, main_or_worker, write_results  # noqa: E402

DEFAULT_TRACES = Path.home() / ".cache" / "agentkube" / "agentcgroup-traces"
RETRIES = 2  # a killed command is run again this many times, then given up
MAX_CALL_POINTS = 400  # memory points passed to one command (argv), the highest kept per bucket
START_MARGIN = 3.0  # seconds between the last sandbox's registration and the replay's start

# A command of the run: holds the given memory (bytes, beyond its own interpreter's) from each moment
# (seconds from its start) and ends at END. Touches one byte per page: the kernel charges every page.
CALL_PROGRAM = r"""
import mmap, sys, time
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
started, base = time.monotonic(), rss()
end, points = float(sys.argv[1]), [(float(t), int(m)) for t, m in zip(sys.argv[2::2], sys.argv[3::2])]
size = max([m for _, m in points] + [4096])
area, touched = mmap.mmap(-1, size), 0
for at, memory in points:
    time.sleep(max(0.0, started + at - time.monotonic()))
    want = max(0, memory - base) // 4096 * 4096
    if want > touched:
        for offset in range(touched, want, 4096):
            area[offset] = 1
    elif want < touched:
        area.madvise(mmap.MADV_DONTNEED, want, touched - want)
    touched = want
time.sleep(max(0.0, started + end - time.monotonic()))
"""


# --- the traces -------------------------------------------------------------------------------------------

def extract(git_dir: Path, target: Path) -> None:
    """Copy every run's resources.json and tool_calls.json from a clone of the traces' repository."""
    names = subprocess.run(["git", "-C", str(git_dir), "ls-tree", "-r", "--name-only", "HEAD", "experiments"],
                           check=True, capture_output=True, text=True).stdout.split()
    for name in names:
        if name.endswith(("/resources.json", "/tool_calls.json")):
            out = target / name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(subprocess.run(["git", "-C", str(git_dir), "show", f"HEAD:{name}"], check=True,
                                           capture_output=True).stdout)


def load_tasks(directory: Path) -> list[Task]:
    tasks = []
    for resources in sorted(directory.rglob("resources.json")):
        calls = resources.with_name("tool_calls.json")
        if calls.exists():
            task = load_task(str(resources.parent.relative_to(directory)), resources.read_text(), calls.read_text())
            if task is not None and task.duration > 0:
                tasks.append(task)
    return tasks


def call_argv(call: Call, python: str) -> list[str]:
    points = list(call.memory)
    if len(points) > MAX_CALL_POINTS:  # keep each bucket's highest: peaks are what matter here
        size = -(-len(points) // MAX_CALL_POINTS)
        points = [max(points[i:i + size], key=lambda p: p[1]) for i in range(0, len(points), size)]
    duration = max(0.0, call.end - call.start)
    return [python, "-S", "-c", CALL_PROGRAM, f"{duration:.4f}", *(str(v) for t, m in points for v in (f"{t:.4f}", m))]


# --- a sandbox: its main process replays one plan -------------------------------------------------------------

def rss_bytes() -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) * 1024


class Held:
    """Anonymous memory this process holds, grown and shrunk page by page."""

    def __init__(self, size: int):
        import mmap

        self.area = mmap.mmap(-1, max(size, 4096))
        self.touched = 0

    def set(self, size: int) -> None:
        import mmap

        want = min(len(self.area), max(0, size)) // 4096 * 4096
        for offset in range(self.touched, want, 4096):
            self.area[offset] = 1
        if want < self.touched:
            self.area.madvise(mmap.MADV_DONTNEED, want, self.touched - want)
        self.touched = want


def worker(agent_socket: str, name: str) -> None:
    # The plan comes once this process is the sandbox's main process: what it allocates from here on is
    # charged to the sandbox (on cgroup v1 a moved process's earlier pages stay where they were charged).
    plan = json.loads(sys.stdin.readline())
    from agentkube.contract import BUILTIN_PROFILES, quantity_bytes
    from agentkube.ebpf.held import held_binary
    from agentkube.ebpf.models import RunRequest, SandboxRef
    from agentkube.ebpf.runtime import WarmPool, favor_latency, run_call
    from agentkube.ebpf.unixhttp import ApiError

    favor_latency()
    steps = [Step(at=s["at"], main_memory=s["main_memory"], call=Call(**s["call"]) if s["call"] else None)
             for s in plan["steps"]]
    ref = SandboxRef(name=name)
    agentkube = plan["mode"] == "agentkube"
    program = held_binary()
    pool = WarmPool(Path(agent_socket), ref, program) if agentkube and program else None
    base = rss_bytes()
    held = Held(max((s.main_memory for s in steps), default=0))
    stats = {"calls": 0, "attempts_killed": 0, "calls_lost": 0, "calls_refused": 0, "late_seconds": 0.0,
             "call_peak_bytes": 0, "steps_done": 0}

    def run(call: Call) -> bool:
        """True if the command ended by itself (killed: False)."""
        argv = call_argv(call, plan["python"])
        if agentkube:
            declared = min(plan["envelope"], round(quantity_bytes(BUILTIN_PROFILES[call.profile].memory) * plan["memory_scale"]))
            intent = {"memory": declared, "network": {"egress": "none"}, "timeout": f"{int(call.end - call.start) + 120}s"}
            try:
                result = run_call(Path(agent_socket), ref, RunRequest(argv=argv, intent=intent), pool)
            except ApiError:  # refused (not killed): counted, and the run goes on as an agent's would
                stats["calls_refused"] += 1
                return True
            stats["call_peak_bytes"] = max(stats["call_peak_bytes"], result.usage.peak_memory_bytes)
            return result.signal is None
        pid = os.posix_spawn(argv[0], argv, os.environ)
        _, status = os.waitpid(pid, 0)
        return not os.WIFSIGNALED(status)

    origin = plan["start"]
    time.sleep(max(0.0, origin - time.time()))
    delay = 0.0
    for step in steps:
        due = origin + step.at + delay
        if due > plan["deadline"]:
            break
        late = time.time() - due
        if late < 0:
            time.sleep(-late)
        if step.call is None:
            held.set(step.main_memory - base)
        else:
            started = time.time()
            stats["calls"] += 1
            for _attempt in range(1 + RETRIES):
                if run(step.call):
                    break
                stats["attempts_killed"] += 1
            else:
                stats["calls_lost"] += 1
            # The agent waited for the command: what came after it moves by however long it overran.
            delay += max(0.0, (time.time() - started) - (step.call.end - step.call.start))
        stats["steps_done"] += 1
    stats["late_seconds"] = round(delay, 3)
    if pool:
        pool.close()
    print(json.dumps(stats), flush=True)
    sys.stdin.readline()  # stay (holding its memory) until the benchmark has read every sandbox's answer


# --- the node and its budget ------------------------------------------------------------------------------

class Budget:
    """The memory limit of the cgroup every sandbox of the node agent lives under."""

    def __init__(self, agent):
        from agentkube.ebpf.cgroups import Cgroup, detect_layout, local_root_paths, own_cgroups

        layout = detect_layout()
        root = Cgroup(layout, local_root_paths(layout, own_cgroups(agent.process.pid), agent.instance))
        self.dir = root.controller_dir("memory")
        self.v2 = layout.kind == "v2"

    def set(self, limit: int) -> None:
        (self.dir / ("memory.max" if self.v2 else "memory.limit_in_bytes")).write_text(str(limit))
        if not self.v2:
            (self.dir / "memory.max_usage_in_bytes").write_text("0")

    def peak(self) -> int:
        return int((self.dir / ("memory.peak" if self.v2 else "memory.max_usage_in_bytes")).read_text())

    def ooms(self) -> int:
        text = (self.dir / ("memory.events" if self.v2 else "memory.oom_control")).read_text()
        return next((int(line.split()[1]) for line in text.splitlines() if line.startswith("oom_kill ")), 0)


def run_scenario(agent, budget: Budget, mode: str, count: int, tasks: list[Task], args, envelope: int, seed: int) -> dict:
    budget.set(args.budget)
    oom_before = budget.ooms()
    rng = random.Random(seed)
    sandboxes, plans = [], []
    try:
        for i in range(count):
            sandboxes.append(SandboxWorker(agent.socket, f"density-{mode}-{i}", __file__, memory=str(envelope),
                                           cpu="1", pids=1024))
            chosen = [tasks[rng.randrange(len(tasks))] for _ in range(8)]
            offset = rng.uniform(0, chosen[0].duration)
            steps = replay_steps(chosen, offset, args.speedup, args.memory_scale)
            plans.append({"steps": [{"at": s.at, "main_memory": s.main_memory,
                                     "call": s.call.__dict__ if s.call else None} for s in steps]})
        start = time.time() + START_MARGIN + 0.3 * count  # each main process imports its runtime first
        for sandbox, plan in zip(sandboxes, plans, strict=True):
            plan.update(mode=mode, start=start, deadline=start + args.seconds, envelope=envelope,
                        memory_scale=args.memory_scale, python=args.call_python)
            try:
                sandbox.process.stdin.write(json.dumps(plan) + "\n")
                sandbox.process.stdin.flush()
            except BrokenPipeError:  # gone before it started: counted as killed below
                pass
        answers = []
        for sandbox in sandboxes:
            line = sandbox.process.stdout.readline()
            answers.append(json.loads(line) if line else None)
        node_peak = budget.peak()
    finally:
        for sandbox in sandboxes:
            try:
                sandbox.close()
            except Exception as error:  # noqa: BLE001 - a sandbox whose main process died is gone already
                print(f"closing {sandbox.name}: {error}", file=sys.stderr)
    alive = [a for a in answers if a is not None]
    total = {key: sum(a[key] for a in alive) for key in ("calls", "attempts_killed", "calls_lost", "calls_refused")}
    return {"mode": mode, "sandboxes": count, "container_limit_bytes": envelope, "main_killed": count - len(alive),
            "survival": len(alive) / count, **total,
            "late_seconds_max": max((a["late_seconds"] for a in alive), default=0.0),
            "node_peak_bytes": node_peak, "budget_oom_kills": budget.ooms() - oom_before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=Path, default=DEFAULT_TRACES)
    parser.add_argument("--from-git", type=Path, help="copy the traces from this clone of eunomia-bpf/agentcgroup first")
    parser.add_argument("--budget", default="3Gi", help="the node's memory budget (a quantity)")
    parser.add_argument("--seconds", type=float, default=90.0, help="wall seconds each scenario replays")
    parser.add_argument("--speedup", type=float, default=10.0)
    parser.add_argument("--memory-scale", type=float, default=0.5)
    parser.add_argument("--multiples", default="2,3,4,6", help="agentkube's sandbox counts, as multiples of static's")
    parser.add_argument("--call-python", default="/usr/bin/python3", help="the interpreter of the replayed commands")
    parser.add_argument("--seed", type=int, default=15)
    args = parser.parse_args()
    from agentkube.contract import quantity_bytes
    from agentkube.ebpf.local import LocalNodeAgent

    args.budget = quantity_bytes(args.budget)
    if args.from_git:
        extract(args.from_git, args.traces)
    tasks = load_tasks(args.traces)
    if not tasks:
        sys.exit(f"no traces under {args.traces}: give --from-git with a clone of eunomia-bpf/agentcgroup")
    peaks = [round(t.peak * args.memory_scale) for t in tasks]
    envelope = static_limit(peaks)
    static_count = args.budget // envelope
    p95_limit = static_limit(peaks, 0.95)
    over_p95 = sum(1 for p in peaks if p > p95_limit)
    counts = [static_count * int(m) for m in args.multiples.split(",")]
    # (mode, sandboxes, container limit): static at the highest peak; agentkube with that as the envelope;
    # static sized at the p95 of peaks instead (more fit, the tasks above it die); static overcommitted.
    scenarios = [("static", static_count, envelope), *(("agentkube", n, envelope) for n in counts),
                 ("static", args.budget // p95_limit, p95_limit), ("static", counts[0], envelope)]
    load_before = os.getloadavg()
    results = []
    with LocalNodeAgent() as agent:
        budget = Budget(agent)
        for index, (mode, count, limit) in enumerate(scenarios):
            print(f"{mode} × {count} at {limit} ...", file=sys.stderr, flush=True)
            results.append(run_scenario(agent, budget, mode, count, tasks, args, limit, args.seed + index))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    fits = [r["sandboxes"] for r in results if r["mode"] == "agentkube" and r["main_killed"] == 0]
    best = max(fits, default=0)
    clean = max((r["sandboxes"] for r in results if r["mode"] == "agentkube" and r["main_killed"] == 0
                 and r["calls_lost"] == 0), default=0)
    result = {
        "machine": machine(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "traces": {"source": "github.com/eunomia-bpf/agentcgroup experiments/*/*/attempt_*/ (GPL-2.0; not committed)",
                   "tasks": len(tasks), "peak_max_bytes": max(peaks), "peak_p95_limit_bytes": p95_limit,
                   "tasks_over_p95_limit": over_p95},
        "budget_bytes": args.budget, "memory_scale": args.memory_scale, "speedup": args.speedup,
        "seconds_per_scenario": args.seconds, "static_limit_bytes": envelope, "static_admitted": static_count,
        "scenarios": results, "agentkube_fits_at_full_survival": best,
        "agentkube_fits_with_no_command_lost": clean,
        "ratio": best / static_count if static_count else None,
        "goal": "agentkube fits at least 2x the sandboxes of static limits at 100% survival",
    }
    mib = 2**20

    def label(r: dict) -> str:
        if r["mode"] == "agentkube":
            return "(b) agentkube"
        if r["container_limit_bytes"] != envelope:
            return "(a'') static at the p95 of peaks"
        return "(a) static" if r["sandboxes"] == static_count else "(a') static, overcommitted"

    rows = [[label(r), str(r["sandboxes"]), f"{r['container_limit_bytes'] / mib:.0f}", f"{r['survival']:.0%}",
             str(r["main_killed"]), str(r["calls"]), str(r["attempts_killed"]), str(r["calls_lost"]),
             f"{r['node_peak_bytes'] / mib:.0f}", f"{r['late_seconds_max']:.1f}"] for r in results]
    write_results(
        "density", result,
        f"Density: sandboxes under a {args.budget / mib:.0f} MiB node budget, replaying {len(tasks)} Claude Code runs "
        f"(×{args.memory_scale} memory, {args.speedup:.0f}× time, {args.seconds:.0f} s each)",
        ["scenario", "sandboxes", "limit MiB", "survival", "main killed", "commands", "attempts OOM-killed", "commands lost",
         "node peak MiB", "most behind s"], rows,
        f"Static limit: the highest peak of the task set, {envelope / mib:.0f} MiB (the p95 of peaks would be "
        f"{p95_limit / mib:.0f} MiB, above which {over_p95} of {len(tasks)} tasks would die alone): the node admits "
        f"{static_count}. agentkube at 100% survival: {best} sandboxes ({result['ratio']:.2f}× static; with no command "
        f"lost after {RETRIES} retries: {clean}). Goal ≥ 2×: {'met' if result['ratio'] and result['ratio'] >= 2 else 'not met'}. "
        f"Load average before/after: {load_before[0]:.2f} / {result['load_average_after'][0]:.2f}.")


if __name__ == "__main__":
    main_or_worker(main, worker)
