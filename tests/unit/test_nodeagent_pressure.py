"""The memory.high watcher's arming (ebpf/pressure.py), on a v2-shaped directory: inotify works on any file,
so a plain `memory.events` stands in for the kernel's (the kernel side is tested in the integration tier)."""

from pathlib import Path

import pytest

from agentkube.ebpf.cgroups import Cgroup, CgroupLayout, Hierarchy
from agentkube.ebpf.pressure import PressureWatcher


@pytest.fixture
def call_cgroup(tmp_path: Path) -> Cgroup:
    layout = CgroupLayout("v2", (Hierarchy("unified", tmp_path, frozenset({"memory", "cpu", "pids"}), 2),))
    (tmp_path / "call-x").mkdir()
    (tmp_path / "call-x" / "memory.events").write_text("low 0\nhigh 0\nmax 0\n")
    return Cgroup(layout, {"unified": "/call-x"})


def test_a_call_that_ends_before_its_watch_is_due_is_never_armed(call_cgroup, eventually):
    watcher = PressureWatcher(lambda *_: None)
    try:
        watcher.watch("short", call_cgroup, high_bytes=1, arm_after=3600)
        assert watcher.unwatch("short") == 0
        watcher.watch("long", call_cgroup, high_bytes=1, arm_after=0.0)  # wakes the thread: "short" is gone by then
        eventually(lambda: watcher._watches, timeout=10, interval=0.01)
        assert [key for key, _, _ in watcher._watches.values()] == ["long"] and not watcher._pending
    finally:
        watcher.close()


def test_a_watch_armed_once_due_pushes_each_new_high_event(call_cgroup, eventually):
    seen: list[tuple[str, int]] = []
    watcher = PressureWatcher(lambda key, _, count: seen.append((key, count)))
    try:
        watcher.watch("call", call_cgroup, high_bytes=1, arm_after=0.05)
        eventually(lambda: watcher._watches, timeout=10, interval=0.01)
        (call_cgroup.unified_dir / "memory.events").write_text("low 0\nhigh 2\nmax 0\n")
        eventually(lambda: seen == [("call", 2)], timeout=10, interval=0.01)
        assert watcher.unwatch("call") == 2
    finally:
        watcher.close()
