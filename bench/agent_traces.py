"""Real coding-agent memory traces, turned into what a density replay runs: pure functions only.

The traces are AgentCgroup's (github.com/eunomia-bpf/agentcgroup, GPL-2.0 data: read from a cache outside
this repository, never committed): Claude Code solving SWE-rebench tasks in a container, one
`resources.json` per run (`{"samples": [{"epoch", "mem_usage": "185.3MB / 134.5GB", ...}]}`, about one
sample a second, the container's memory as `docker stats` shows it) and one `tool_calls.json` (each tool
use with its start `timestamp` and, in the `all_images_*` sets, its `end_timestamp` and input).

A run is split into what its sandbox's main process holds (the agent itself: the container's memory
outside every shell command) and its tool calls (each `Bash` use, holding what the container had above
that level while it ran). Read, Edit, Grep and the like run inside the agent's own process, so they are
the main process's. Overlapping shell commands are merged into one call (their memory cannot be told
apart). A sample is counted inside a call up to `SAMPLE_LAG` seconds after its end: `docker stats`
reports the interval before each sample.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime

SAMPLE_LAG = 1.0
UNITS = {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
# What the agent would declare for a command, by what it runs: agentkube's built-in profiles (contract's
# BUILTIN_PROFILES: shell 256Mi, test 2Gi, build 4Gi). First match wins.
PROFILE_PATTERNS = (
    ("test", re.compile(r"pytest|\btox\b|\bnox\b|unittest|make\s+(test|check)|npm\s+test|go\s+test|cargo\s+test")),
    ("build", re.compile(r"pip3?\s+install|setup\.py|\bmake\b|npm\s+(install|ci|run)|\bcargo\b|go\s+build|apt(-get)?\s|"
                         r"\bconda\b|\buv\s")),
)


def memory_bytes(text: str) -> int:
    """Bytes of a `docker stats` usage ("185.3MB / 134.5GB" → 185300000; the limit after "/" is ignored)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]+)\s*", text.split("/")[0])
    if not match or match.group(2) not in UNITS:
        raise ValueError(f"not a memory usage: {text!r}")
    return round(float(match.group(1)) * UNITS[match.group(2)])


def profile_for(command: str) -> str:
    for profile, pattern in PROFILE_PATTERNS:
        if pattern.search(command):
            return profile
    return "shell"


@dataclass(frozen=True)
class Call:
    """One shell command (or several that overlapped): seconds from the run's start, and the memory it held
    above its sandbox's main level at each sample (seconds from the call's own start)."""

    start: float
    end: float
    command: str
    profile: str
    memory: tuple[tuple[float, int], ...]

    @property
    def peak(self) -> int:
        return max((m for _, m in self.memory), default=0)


@dataclass(frozen=True)
class Task:
    """One run: the main process's memory over time (outside calls) and the calls, in order."""

    name: str
    duration: float
    main: tuple[tuple[float, int], ...]
    calls: tuple[Call, ...] = field(default=())
    peak: int = 0  # the container's highest sample: what a static limit must cover

    def main_at(self, moment: float) -> int:
        """The main process's memory at `moment` (its last sample at or before it; its first before that)."""
        level = self.main[0][1]
        for at, memory in self.main:
            if at > moment:
                break
            level = memory
        return level


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _merged(windows: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    merged: list[tuple[float, float, str]] = []
    for start, end, command in sorted(windows):
        if merged and start <= merged[-1][1]:
            previous = merged[-1]
            merged[-1] = (previous[0], max(previous[1], end), previous[2] + "; " + command)
        else:
            merged.append((start, end, command))
    return merged


def load_task(name: str, resources_json: str, tool_calls_json: str) -> Task | None:
    """A run from its two files; None when its calls carry no end times (then they cannot be delimited)."""
    samples = [(s["epoch"], memory_bytes(s["mem_usage"])) for s in json.loads(resources_json)["samples"]]
    uses = json.loads(tool_calls_json)
    shell = [u for u in uses if u.get("tool") == "Bash"]
    if not samples or any("end_timestamp" not in u for u in shell):
        return None
    origin = samples[0][0]
    windows = _merged([(_seconds(u["timestamp"]) - origin, _seconds(u["end_timestamp"]) - origin,
                        str((u.get("input") or {}).get("command", ""))) for u in shell])
    points = [(epoch - origin, memory) for epoch, memory in samples]
    main: list[tuple[float, int]] = []
    calls: list[Call] = []
    index = 0
    for start, end, command in windows:
        while index < len(points) and points[index][0] < start:
            main.append(points[index])
            index += 1
        level = main[-1][1] if main else points[0][1]
        inside = []
        while index < len(points) and points[index][0] <= end + SAMPLE_LAG:
            at, memory = points[index]
            inside.append((round(max(0.0, at - start), 3), max(0, memory - level)))
            index += 1
        calls.append(Call(start=max(0.0, start), end=max(start, end), command=command, profile=profile_for(command),
                          memory=tuple(inside)))
    main += points[index:]
    if not main:
        main = [(0.0, points[0][1])]
    return Task(name=name, duration=points[-1][0], main=tuple(main), calls=tuple(calls),
                peak=max(memory for _, memory in points))


@dataclass(frozen=True)
class Step:
    """One thing a replaying sandbox does at `at` seconds of replay time: set its main process's memory
    (`call` None), or run a call (which blocks the agent until it ends, as a foreground shell command does)."""

    at: float
    main_memory: int = 0
    call: Call | None = None


def replay_steps(tasks: list[Task], offset: float, speedup: float, memory_scale: float) -> list[Step]:
    """The tasks back to back, from `offset` seconds into the first (a node's sandboxes are at different
    points of their work), time divided by `speedup` and memory multiplied by `memory_scale`. A call under
    way at the offset is skipped."""
    steps: list[Step] = []
    shift = -offset
    for task in tasks:
        events: list[tuple[float, int, Call | None]] = [(at, memory, None) for at, memory in task.main]
        events += [(call.start, 0, call) for call in task.calls]
        events.sort(key=lambda e: (e[0], e[2] is not None))
        if shift < 0:  # the first task, entered at the offset
            steps.append(Step(at=0.0, main_memory=round(task.main_at(offset) * memory_scale)))
        for at, memory, call in events:
            moment = at + shift
            if moment < 0:
                continue
            if call is None:
                steps.append(Step(at=moment / speedup, main_memory=round(memory * memory_scale)))
            else:
                steps.append(Step(at=moment / speedup, call=Call(
                    start=moment / speedup, end=(call.end + shift) / speedup, command=call.command,
                    profile=call.profile,
                    memory=tuple((round(t / speedup, 4), round(m * memory_scale)) for t, m in call.memory))))
        shift += task.duration
    return steps


def static_limit(peaks: list[int], quantile: float = 1.0, granule: int = 64 * 2**20) -> int:
    """A container limit as a platform sizes it: the `quantile` of the tasks' peaks (1.0: the highest, the
    only choice under which every task survives alone), rounded up to `granule`."""
    ordered = sorted(peaks)
    pick = ordered[max(0, min(len(ordered) - 1, round(quantile * len(ordered)) - 1))]
    return -(-pick // granule) * granule
