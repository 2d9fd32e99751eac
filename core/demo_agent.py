"""The demo's scripted agent: what a coding agent does in its sandbox, one tool call at a time, through the
SDK. It writes a small project into the workspace, runs its test suite and builds it, then does the two
things a sandbox exists to contain: a memory hog (killed in its own call while the sandbox lives on) and an
attempt to reach the internet (blocked in the kernel and counted). Each step says what it expects, so the
demo can tell the user whether agentkube did what it promises."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agentkube.client import RunResult, Sandbox

WORKSPACE = "/workspace/app"
# A documentation address (TEST-NET-3): nothing routes it, and the call may not even try.
OUTSIDE = ("203.0.113.10", 443)

CALC = '''"""A tiny library the demo's agent works on."""


def mean(values):
    if not values:
        raise ValueError("mean of nothing")
    return sum(values) / len(values)
'''
TESTS = '''import unittest

from calc import mean


class MeanTest(unittest.TestCase):
    def test_mean(self):
        self.assertEqual(mean([1, 2, 3]), 2)

    def test_nothing(self):
        with self.assertRaises(ValueError):
            mean([])


if __name__ == "__main__":
    unittest.main()
'''
MAIN = '''from calc import mean

print(mean([4, 8, 15, 16, 23, 42]))
'''
HOG = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))\n"
CONNECT = f"import socket; socket.create_connection({OUTSIDE!r}, timeout=3)"


@dataclass(frozen=True)
class Step:
    """One tool call of the scripted agent and what agentkube should make of it."""

    title: str
    argv: Sequence[str]
    expect: str  # what should happen, in words
    check: Callable[[RunResult], bool]
    intent: dict[str, Any] = field(default_factory=dict)  # SDK keyword arguments: profile, memory, network, ...
    stdin: str | None = None


def _ok(result: RunResult) -> bool:
    return result.exit_code == 0


def _write(name: str, text: str) -> Step:
    return Step(f"write {name}", ["sh", "-c", f'mkdir -p {WORKSPACE} && cat > "{WORKSPACE}/{name}"'],
                "exit 0", _ok, {"profile": "shell"}, stdin=text)


def steps(quick: bool = False) -> list[Step]:
    """The agent's calls in order; `quick` (the test suite's demo) keeps one of each kind."""
    files = [("calc.py", CALC), ("test_calc.py", TESTS), ("__main__.py", MAIN)]
    writes = [_write(name, text) for name, text in files]
    work = [
        Step("run the test suite", ["python3", "-m", "unittest", "-v", "test_calc"], "2 tests pass",
             lambda r: r.exit_code == 0 and "Ran 2 tests" in r.stderr, {"profile": "test", "cwd": WORKSPACE}),
        Step("build a zipapp", ["python3", "-m", "zipapp", WORKSPACE, "-o", "/workspace/app.pyz"], "exit 0", _ok,
             {"profile": "build"}),
        Step("run the build", ["python3", "/workspace/app.pyz"], "prints 18.0",
             lambda r: r.exit_code == 0 and r.stdout.strip() == "18.0", {"profile": "shell"}),
    ]
    contained = [
        Step("memory hog (128Mi allowed)", ["python3", "-c", HOG], "OOM-killed in its own call, the sandbox lives",
             lambda r: r.signal == 9 and r.usage.oom_kills >= 1, {"memory": "128Mi", "timeout": 60}),
        Step(f"reach {OUTSIDE[0]}:{OUTSIDE[1]} (no egress granted)", ["python3", "-c", CONNECT],
             "blocked in the kernel and counted", lambda r: r.exit_code != 0 and r.usage.connections_blocked >= 1,
             {"timeout": 30}),
    ]
    return (writes[:2] + work[:1] + contained) if quick else (writes + work + contained)


@dataclass(frozen=True)
class Outcome:
    step: Step
    result: RunResult

    @property
    def as_expected(self) -> bool:
        return self.step.check(self.result)


def run_agent(sandbox: Sandbox, plan: Sequence[Step], on_step: Callable[[Outcome], None] = lambda _: None) -> list[Outcome]:
    """Run the plan's calls one after the other (as an agent would: each waits for the last)."""
    outcomes = []
    for step in plan:
        outcome = Outcome(step, sandbox.run(list(step.argv), stdin=step.stdin, **step.intent))
        on_step(outcome)
        outcomes.append(outcome)
    return outcomes


def usage_rows(outcomes: Sequence[Outcome]) -> list[tuple[str, ...]]:
    """One row per call for the summary table: what ran, how it ended, what it used, whether that was right."""
    rows: list[tuple[str, ...]] = []
    for outcome in outcomes:
        result, usage = outcome.result, outcome.result.usage
        ended = f"signal {result.signal}" if result.signal else f"exit {result.exit_code}"
        rows.append((outcome.step.title, ended, f"{usage.duration_seconds * 1000:.0f} ms",
                     f"{usage.peak_memory_bytes / 2**20:.1f} MiB", f"{result.limits.memory / 2**20:.0f} MiB",
                     str(usage.oom_kills), str(usage.connections_blocked),
                     "yes" if outcome.as_expected else f"NO (expected: {outcome.step.expect})"))
    return rows


USAGE_COLUMNS = ("call", "ended", "took", "peak memory", "memory limit", "OOM kills", "blocked", "as expected")
