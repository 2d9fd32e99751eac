"""How fast the simulator runs one simulated day at 1 s resolution, per workload and policy.

Side by side in one run: generating the trace, simulating it under Knative's default target with 30 s
agent decisions (the training loop's granularity), under the shipped PPO policy (observation building
and NumPy inference included), and with spot capacity and interruptions on. The goal: one day in
under 2 s of wall time on one core. Writes bench/results/rl_simulator_speed.{json,md}.

    .venv/bin/python bench/rl_simulator_speed.py [--repeats 3]
"""

import argparse
import os
import platform
import statistics
import time

import report

from agentkube.rl.baselines import KnativeDefault
from agentkube.rl.episodes import run_episode
from agentkube.rl.policy import default_policy_path, load_policy
from agentkube.rl.traces import WORKLOADS, evaluation_trace

GOAL_SECONDS_PER_DAY = 2.0


def timed(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(repeats: int) -> dict:
    ppo = load_policy() if default_policy_path().exists() else None
    rows = []
    for workload in sorted(WORKLOADS):
        trace = evaluation_trace(workload)
        row = {"workload": workload, "requests": len(trace),
               "generate_trace_s": timed(lambda w=workload: evaluation_trace(w), repeats),
               "knative_default_s": timed(lambda t=trace: run_episode(KnativeDefault(), t), repeats),
               "knative_default_spot_s": timed(lambda t=trace: run_episode(KnativeDefault(), t, spot_allowed=True), repeats)}
        if ppo is not None:
            row["ppo_s"] = timed(lambda t=trace: run_episode(ppo, t, spot_allowed=True), repeats)
        rows.append(row)
    return {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "repeats": repeats,
            "goal_seconds_per_day": GOAL_SECONDS_PER_DAY, "rows": rows}


def markdown(result: dict) -> str:
    lines = ["| workload | requests/day | generate trace s | Knative default s | + spot s | PPO + spot s | worst / 2 s goal |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        simulated = [r["knative_default_s"], r["knative_default_spot_s"], r.get("ppo_s", 0.0)]
        lines.append(f"| {r['workload']} | {r['requests']:,} | {r['generate_trace_s']:.2f} | {r['knative_default_s']:.2f} | "
                     f"{r['knative_default_spot_s']:.2f} | {r.get('ppo_s', float('nan')):.2f} | "
                     f"{max(simulated) / GOAL_SECONDS_PER_DAY:.2f}× |")
    lines.append("")
    lines.append("One simulated day at 1 s resolution, 30 s agent decisions, median of "
                 f"{result['repeats']} runs, one core. Trace generation is separate (done once per trace).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = measure(args.repeats)
    report.save("rl_simulator_speed", result, "# Simulator speed\n\n" + markdown(result))


if __name__ == "__main__":
    main()
