"""The density benchmark's reading of agent memory traces (bench/agent_traces.py): pure functions."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
from agent_traces import load_task, memory_bytes, profile_for, replay_steps, static_limit  # noqa: E402

EPOCH = 1770457475.0  # 2026-02-07T09:44:35Z


def resources(*megabytes: float) -> str:
    return json.dumps({"samples": [{"epoch": EPOCH + i, "mem_usage": f"{mb}MB / 134.5GB"} for i, mb in enumerate(megabytes)]})


def use(tool: str, start: float, end: float | None, command: str = "") -> dict:
    def stamp(offset: float) -> str:
        from datetime import UTC, datetime

        return datetime.fromtimestamp(EPOCH + offset, UTC).isoformat().replace("+00:00", "Z")

    entry = {"timestamp": stamp(start), "tool": tool, "input": {"command": command}}
    if end is not None:
        entry["end_timestamp"] = stamp(end)
    return entry


def test_docker_stats_usages_are_read_in_their_units():
    assert memory_bytes("185.3MB / 134.5GB") == 185_300_000
    assert memory_bytes("1.5GiB / 2GiB") == 3 * 2**29
    assert memory_bytes("512B / 1GB") == 512
    with pytest.raises(ValueError):
        memory_bytes("lots")


def test_commands_get_the_profile_an_agent_would_declare():
    assert profile_for("cd /testbed && python -m pytest tests/test_x.py -q") == "test"
    assert profile_for("pip install -e .") == "build"
    assert profile_for("grep -rn foo src | head") == "shell"


def test_a_run_splits_into_its_main_process_and_its_shell_calls():
    # 200 MB idle; a shell command from 2.5 s to 4.2 s takes the container to 900 MB; a Read (in the agent's own
    # process) is the main process's; samples up to 1 s after the command's end still count as the command's.
    text = resources(200, 200, 210, 600, 900, 215, 212, 205)
    calls = json.dumps([use("Read", 0.5, 0.6), use("Bash", 2.5, 4.2, "pytest -x")])
    task = load_task("t", text, calls)
    assert task is not None and task.peak == 900_000_000 and task.duration == 7
    assert [m for _, m in task.main] == [200e6, 200e6, 210e6, 212e6, 205e6]
    (call,) = task.calls
    assert (call.start, call.end, call.profile) == (2.5, pytest.approx(4.2), "test")  # ms stamps
    assert [m for _, m in call.memory] == [390e6, 690e6, 5e6]  # above the 210 MB the agent held before it
    assert task.main_at(4.0) == 210e6 and task.main_at(100) == 205e6


def test_overlapping_calls_merge_and_runs_without_end_times_are_left_out():
    calls = json.dumps([use("Bash", 1, 3, "make"), use("Bash", 2, 4, "ls")])
    (call,) = load_task("t", resources(100, 100, 300, 300, 100, 100, 100), calls).calls
    assert (call.start, call.end, call.command) == (1, 4, "make; ls")
    assert load_task("t", resources(100, 100), json.dumps([use("Bash", 1, None)])) is None


def test_replay_starts_at_the_offset_compresses_time_and_scales_memory():
    first = load_task("a", resources(100, 100, 100, 400, 100, 100), json.dumps([use("Bash", 2.5, 3.2, "pytest")]))
    second = load_task("b", resources(50, 60), "[]")
    steps = replay_steps([first, second], offset=1.0, speedup=10, memory_scale=0.5)
    assert steps[0].at == 0 and steps[0].main_memory == 50e6  # the level at the offset
    calls = [s for s in steps if s.call]
    assert len(calls) == 1 and calls[0].at == pytest.approx(0.15) and calls[0].call.end == pytest.approx(0.22)
    assert calls[0].call.memory[0] == (0.05, 150e6)
    # the second run follows the first's 5 s (4 s after the offset): 0.4 s, then its own second sample at 0.5 s
    assert [(round(s.at, 3), s.main_memory) for s in steps[-2:]] == [(0.4, 25e6), (0.5, 30e6)]
    # a call under way at the offset is skipped
    assert not [s for s in replay_steps([first], offset=3.0, speedup=1, memory_scale=1) if s.call]


def test_static_limits_are_a_quantile_of_the_peaks_rounded_up():
    peaks = [100 * 2**20] * 19 + [900 * 2**20]
    assert static_limit(peaks) == 960 * 2**20  # the highest, in 64 MiB steps
    assert static_limit(peaks, 0.95) == 128 * 2**20
