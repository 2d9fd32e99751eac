"""Two versions of the tool-call path side by side in one window: bench/tool_call_stages.py run in turns with
each version's package, the order rotated every round, so that this machine's noise (other work on its two
CPUs) falls on both alike. A version is a git ref: a copy of the installed package with `ebpf/`, `contract.py`
and `client.py` as at that ref, put first on PYTHONPATH (the benchmark script itself is this checkout's).

Writes bench/results/NAME.{json,md}: per path and stage, the median over rounds of each run's median, for
both versions, and the load averages seen.

    .venv/bin/python bench/tool_call_ab.py --base main [--head HEAD] [--rounds 6] [--calls 150]

With --head the same as --base, it measures one version against itself: the window's noise, which the rounds'
own ratios (a column of the results) show for any pair.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from nodeagent_common import machine, write_results  # noqa: E402

from agentkube import contract  # noqa: E402

HERE = Path(__file__).parent
CHECKOUT = HERE.parent


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=CHECKOUT, check=True, capture_output=True, text=True).stdout


def package_at(ref: str, into: Path) -> Path:
    """A copy of the installed package whose node-agent and runtime modules, the contract they share and the
    SDK are as at `ref`; returns the directory to put on PYTHONPATH."""
    root = into / ref.replace("/", "_")
    shutil.copytree(Path(contract.__file__).parent, root / "agentkube", ignore=shutil.ignore_patterns("__pycache__"))
    ebpf = root / "agentkube" / "ebpf"
    for stale in ebpf.glob("*.py"):
        stale.unlink()
    for path in git("ls-tree", "--name-only", ref, "ebpf/").split():
        if path.endswith(".py"):
            (root / "agentkube" / path).write_text(git("show", f"{ref}:{path}"))
    (ebpf / "programs" / "held.c").write_text(git("show", f"{ref}:ebpf/programs/held.c"))
    for module in ("contract.py", "client.py"):  # what they share, and the SDK that the socket path calls through
        (root / "agentkube" / module).write_text(git("show", f"{ref}:core/{module}"))
    return root


def run_stages(pythonpath: Path, calls: int, name: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    subprocess.run([sys.executable, str(HERE / "tool_call_stages.py"), "--calls", str(calls), "--name", name],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    results = HERE / "results"
    data = json.loads((results / f"{name}.json").read_text())
    for suffix in (".json", ".md"):
        (results / f"{name}{suffix}").unlink()
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git ref of the version to compare against")
    parser.add_argument("--head", default="HEAD", help="git ref of the version under test")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=150, help="per path and run")
    parser.add_argument("--name", default="tool_call_ab", help="results file name (bench/results/NAME.*)")
    args = parser.parse_args()
    versions = {"base": args.base, "head": args.head}
    runs: dict[str, list[dict]] = {label: [] for label in versions}
    with tempfile.TemporaryDirectory(prefix="agentkube-ab-") as scratch:
        trees = {label: package_at(ref, Path(scratch) / label) for label, ref in versions.items()}
        labels = list(versions)
        for round_ in range(args.rounds):
            for label in labels[round_ % 2:] + labels[:round_ % 2]:
                runs[label].append(run_stages(trees[label], args.calls, f"_ab_{label}_{os.getpid()}"))
                print(f"round {round_ + 1}/{args.rounds} {label}: load {runs[label][-1]['load_average_before'][0]:.2f}",
                      flush=True)

    def medians(label: str, pick) -> float | None:
        values = [v for v in (pick(run) for run in runs[label]) if v is not None]
        return statistics.median(values) if values else None

    def round_ratios(pick) -> list[float]:
        """Head ÷ base of each round, whose two runs were next to each other in time: how far one round's
        ratio strays from another's is this window's noise, against which the median ratio is to be read."""
        pairs = zip((pick(run) for run in runs["base"]), (pick(run) for run in runs["head"]), strict=True)
        return [head / base for base, head in pairs if base and head is not None]

    paths = runs["head"][0]["paths"]
    rows, table, spread = [], {}, {}

    def with_rounds(row: str, pick) -> None:
        """A row whose rounds' own ratios are kept beside its medians."""
        table[row] = {label: medians(label, pick) for label in versions}
        spread[row] = round_ratios(pick)

    for path in paths:
        for what, key in (("whole call p50", "median_us"), ("whole call p99", "p99_us")):
            with_rounds(f"{path}: {what}", lambda run, p=path, k=key: run["whole"][p][k])
    # The direct path's timeline (hand-offs between the processes), where the stages script has it.
    segments = list(dict.fromkeys(segment for run in runs["head"] + runs["base"]
                                  for segment in run.get("direct_timeline", {}).get("segments_median_us", {})))
    for segment in segments:
        table[f"timeline: {segment}"] = {
            label: medians(label, lambda run, s=segment: run.get("direct_timeline", {}).get("segments_median_us", {}).get(s))
            for label in versions}
    for who in dict.fromkeys(who for run in runs["head"] + runs["base"] for who in run.get("direct_cpu_per_call_us", {})):
        table[f"CPU per call: {who} @direct"] = {
            label: medians(label, lambda run, w=who: run.get("direct_cpu_per_call_us", {}).get(w)) for label in versions}
    with_rounds("CPU per call: whole machine (kernel threads and others' work too) @direct",
                lambda run: run.get("direct_machine_cpu_per_call_us"))
    stages = list(dict.fromkeys(stage for run in runs["head"] + runs["base"] for stage in run["stages"]))
    for stage in stages:
        for path in paths:
            cells = {label: medians(label, lambda run, s=stage, p=path: (run["stages"].get(s, {}).get(p) or {}).get("median_us"))
                     for label in versions}
            if any(value is not None for value in cells.values()):
                table[f"{stage} @{path}"] = cells
    for row, cells in table.items():
        base, head = cells["base"], cells["head"]
        ratios = spread.get(row)
        rows.append([row if row.split(":")[0] not in paths else f"**{row}**",
                     f"{base:.0f}" if base is not None else "–", f"{head:.0f}" if head is not None else "–",
                     f"{head / base:.2f}" if base and head is not None else "–",
                     f"{min(ratios):.2f}–{max(ratios):.2f}" if ratios else "–"])
    loads = {label: [run["load_average_before"][0] for run in runs[label]] for label in versions}
    write_results(args.name, {"machine": machine(), "versions": versions, "rounds": args.rounds, "calls": args.calls,
                              "load_average_before_each_run": loads, "median_of_run_medians_us": table,
                              "head_over_base_each_round": spread},
                  f"Two versions of the tool-call path in turns: base `{args.base}` against head `{args.head}`, "
                  f"{args.rounds} rounds × {args.calls} calls per path, µs (median of each run's median)",
                  ["path / stage", "base µs", "head µs", "head ÷ base", "head ÷ base, each round (lowest–highest)"], rows,
                  "Each round runs bench/tool_call_stages.py once per version, the order alternating (module doc); "
                  "its three paths take turns inside each run. Where the rounds' own ratios lie on both sides of "
                  "1.00, the versions did not differ the same way in every round: the median ratio is then within "
                  "this window's noise. "
                  "Load average at the start of each run: "
                  + "; ".join(f"{label} {', '.join(f'{x:.1f}' for x in loads[label])}" for label in versions)
                  + " (other work on the machine included).")


if __name__ == "__main__":
    main()
