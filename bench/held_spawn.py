"""What a held process (the warm pool's, programs/held.c) costs the runtime to make: spawned from the runtime's
interpreter (`runtime.spawn_held` through posix_spawn) against forked by the held program's forker
(`held.Forker`), in turns, each one started, seen ready, let go (EOF on its release pipe) and reaped.
CPU counts this process, its reaped children and the forker itself (/proc/PID/stat). No node agent, no root.

    .venv/bin/python bench/held_spawn.py [--rounds 6] [--per-round 400]

Writes bench/results/held_spawn.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from nodeagent_common import machine, write_results  # noqa: E402

from agentkube.ebpf import runtime  # noqa: E402
from agentkube.ebpf.held import Forker, held_binary  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(forker: Forker) -> float:
    """This process's CPU, its reaped children's and the forker's (not reaped until the end)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    fields = Path(f"/proc/{forker.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime + (int(fields[11]) + int(fields[12])) / TICKS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per-round", type=int, default=400)
    args = parser.parse_args()
    program = held_binary()
    assert program, "no held program (make ebpf-host builds it)"
    forker = Forker(program)
    ways = {"spawned by the runtime (posix_spawn)": None, "forked by the forker": forker}
    samples: dict[str, list[tuple[float, float]]] = {way: [] for way in ways}
    load_before = os.getloadavg()
    try:
        for round_ in range(args.rounds):
            order = list(ways) if round_ % 2 == 0 else list(reversed(ways))
            for way in order:
                started, cpu = time.perf_counter(), cpu_seconds(forker)
                for _ in range(args.per_round):
                    runtime.spawn_held(program, ways[way]).close()
                samples[way].append(((time.perf_counter() - started) / args.per_round * 1e6,
                                     (cpu_seconds(forker) - cpu) / args.per_round * 1e6))
    finally:
        forker.close()
    medians = {way: {"wall_us": statistics.median(w for w, _ in runs), "cpu_us": statistics.median(c for _, c in runs)}
               for way, runs in samples.items()}
    spawned, forked = (medians[way] for way in ways)
    rows = [[way, f"{m['wall_us']:.0f}", f"{m['cpu_us']:.0f}"] for way, m in medians.items()]
    rows.append(["forked ÷ spawned", f"{forked['wall_us'] / spawned['wall_us']:.2f}", f"{forked['cpu_us'] / spawned['cpu_us']:.2f}"])
    write_results("held_spawn", {"machine": machine(), "rounds": args.rounds, "per_round": args.per_round,
                                 "load_average_before": load_before, "load_average_after": os.getloadavg(),
                                 "median_of_rounds_us": medians},
                  f"A held process made and let go, µs per process (median of {args.rounds} rounds × {args.per_round})",
                  ["how", "wall µs", "CPU µs"], rows,
                  "In turns, the order alternating each round. CPU: this process, its reaped children and the forker. "
                  f"Load average before/after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f} (other work included).")


if __name__ == "__main__":
    main()
