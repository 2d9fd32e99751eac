"""How long `agentkube dev up` takes from nothing to every component healthy, with binaries cached.

Runs `up`/`down` several times in one process and compares, side by side: a fresh start, a repeated
`up` on a running environment (must be a no-op), and each component's share of the start. Writes
bench/results/devenv_startup.{json,md}.

    .venv/bin/python bench/devenv_startup.py [--runs 5]
"""

import argparse
import os
import platform
import statistics
import time

import report

from agentkube.devenv import DevEnv, temporary_env
from agentkube.devenv.versions import KUBERNETES_VERSION

TARGET_SECONDS = 20.0  # the target for a warm `dev up`


def measure(runs: int) -> dict:
    fresh, repeated, components = [], [], []
    for _ in range(runs):
        env = temporary_env()
        try:
            started = time.monotonic()
            env.up()
            fresh.append(time.monotonic() - started)
            components.append(dict(env.startup_seconds))
            started = time.monotonic()
            DevEnv(env.layout.root).up()  # a second `up`, as from another command
            repeated.append(time.monotonic() - started)
        finally:
            env.down()
    names = list(components[0])
    return {
        "kubernetes_version": KUBERNETES_VERSION,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "runs": runs,
        "fresh_up_seconds": fresh,
        "repeated_up_seconds": repeated,
        "component_seconds_median": {n: statistics.median(c[n] for c in components) for n in names},
        "fresh_up_median": statistics.median(fresh),
        "repeated_up_median": statistics.median(repeated),
        "fresh_up_median_over_target": statistics.median(fresh) / TARGET_SECONDS,
    }


def markdown(result: dict) -> str:
    total = result["fresh_up_median"]
    rows = [
        "| step | median s | share of fresh `up` |",
        "|---|---:|---:|",
        *(f"| {name} | {s:.2f} | {s / total:.0%} |" for name, s in result["component_seconds_median"].items()),
        f"| **fresh `dev up`** | **{total:.2f}** | 100% ({result['fresh_up_median_over_target']:.2f}× the {TARGET_SECONDS:.0f} s target) |",
        f"| repeated `dev up` (no-op) | {result['repeated_up_median']:.2f} | {result['repeated_up_median'] / total:.1%} |",
    ]
    title = f"# dev up start-to-ready ({result['kubernetes_version']}, {result['runs']} runs, {result['machine']['cpus']} CPUs)"
    return title + "\n\n" + "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    result = measure(parser.parse_args().runs)
    report.save("devenv_startup", result, markdown(result))


if __name__ == "__main__":
    main()
