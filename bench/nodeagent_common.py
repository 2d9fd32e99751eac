"""Shared by the node agent's benchmarks: a worker process inside a sandbox, percentiles, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import report

from agentkube.contract import Tools
from agentkube.ebpf.models import EnvelopeSpec, SandboxCreate
from agentkube.ebpf.unixhttp import request


def machine() -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()}


def summary(samples: list[float]) -> dict:
    ordered = sorted(samples)

    def pick(fraction: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]

    return {"n": len(samples), "p50": statistics.median(ordered), "p90": pick(0.90), "p99": pick(0.99),
            "mean": statistics.fmean(ordered), "min": ordered[0], "max": ordered[-1]}


# Benchmark sandboxes may reach anything: the benchmarks choose each call's network themselves.
TOOLS = {"default": {"network": {"egress": "none"}},
         "profiles": {"any": {"network": {"egress": "explicit", "allow": [{"cidr": "0.0.0.0/0"}, {"cidr": "::/0"}]}}}}


class SandboxWorker:
    """This script run again with --worker, as the main process of a fresh sandbox; the benchmark sends it
    one JSON command per line and reads one JSON answer per line."""

    def __init__(self, agent_socket: Path, name: str, script: str, **envelope):
        self.process = subprocess.Popen([sys.executable, script, "--worker", str(agent_socket), name],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        spec = SandboxCreate(name=name, envelope=EnvelopeSpec(**envelope),
                             tools=Tools.model_validate(TOOLS), pid=self.process.pid)
        request(agent_socket, "POST", "/v1/sandboxes", spec)
        self.agent_socket = agent_socket
        self.name = name

    def ask(self, command: dict) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with {self.process.wait()}")
        return json.loads(line)

    def close(self) -> None:
        try:
            request(self.agent_socket, "DELETE", f"/v1/sandboxes/default/{self.name}")  # kills the worker
        finally:
            self.process.kill()
            self.process.wait()


def serve_worker(handle) -> None:
    """The worker's loop: one JSON command per stdin line → one JSON answer per stdout line."""
    for line in sys.stdin:
        print(json.dumps(handle(json.loads(line))), flush=True)


def write_results(name: str, result: dict, title: str, header: list[str], rows: list[list[str]], notes: str) -> None:
    """results/NAME.json, and results/NAME.md: a title, one table (first column left-aligned), notes."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    markdown = f"# {title}\n\n" + "\n".join(lines) + f"\n\n{notes}\n"
    report.save(name, result, markdown)


def main_or_worker(main, worker) -> None:
    """A benchmark script is both the benchmark and, run with --worker AGENT_SOCKET NAME, its worker."""
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
